"""Write adapter bundles: one writer for finetune and merge, sealed when it closes.

Layout of ``adapters/<run>/``::

    manifest.json          versions, per-encoder model/method/fingerprint/files, tasks and their state
                           (vocabulary, thresholds, target statistics), file hashes
    recipe.yaml            the fully resolved recipe
    encoders/<name>/       the method's trained weights (methods built on peft: peft's
                           adapter_config.json + adapter_model.safetensors, and PiSSA / OLoRA's
                           lora_trained.safetensors; others: weights.safetensors)
    head.safetensors       the head (several tasks: every task's, under heads.<task>.)
    metrics.json           test metrics (and validation history)
    train_log.jsonl        one line per evaluation
    README.md              model card
    *.png                  training curves, per-group accuracy

Everything is written into a temporary sibling folder; when the ``with`` block ends, the
manifest gets the size and sha256 of every file the block wrote and the folder is renamed
into place. An interrupted write leaves no bundle, and no file escapes the hash table.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file

from ..config import dump_recipe
from ..errors import MMPeftError
from ..files import Sealing, sealed_directory
from ..methods import count_parameters
from ..quant import quantized_layers
from ..tasks import vocabulary_tasks
from ..version import __version__
from .manifest import FORMAT, FORMAT_VERSION


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"mmpeft": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


class BundleWriter:
    """A bundle being written; ``path`` is its temporary folder (see :func:`bundle_writer`)."""

    def __init__(self, sealing: Sealing):
        self._sealing = sealing
        self.path = sealing.path

    @property
    def manifest(self) -> dict:
        return self._sealing.manifest

    def add_model(self, model, recipe, tasks: dict | Sequence[str], metrics: dict, extra: Optional[dict] = None) -> dict:
        """Write the recipe, each encoder's method files, the head and the metrics; returns the
        manifest (its file table is added when the bundle is sealed). ``tasks``: the recipe's
        tasks, or the answer vocabulary of its one vqa / classification task."""
        if not isinstance(tasks, dict):
            tasks = vocabulary_tasks(recipe, tasks)
        directory = self.path
        (directory / "recipe.yaml").write_text(dump_recipe(recipe))
        enc_entries = {}
        for name, enc in model.encoders.items():
            method = model.methods[name]
            sub = directory / "encoders" / name
            sub.mkdir(parents=True, exist_ok=True)
            files = [f"encoders/{name}/{f}" for f in method.save(enc, sub)]
            cfg = recipe.encoders[name]
            enc_entries[name] = {
                "model": cfg.model,
                "modality": enc.modality,
                "arch": enc.arch,
                "method": method.name,
                "settings": cfg.peft,
                "files": files,
                "fingerprint": enc.base_fingerprint,
                "trainable_parameters": count_parameters(enc, trainable_only=True),
                "total_parameters": count_parameters(enc),
                "quantization": cfg.quantization.model_dump() if cfg.quantization else None,
                "quantized_layers": quantized_layers(enc),
            }
        extra_files = {name: t.save_files(t.head, directory, f"heads/{name}") for name, t in tasks.items() if t.head is not None}
        head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head_state, str(directory / "head.safetensors"))
        self.write_json("metrics.json", metrics)
        self.manifest.clear()
        self.manifest.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "run_name": recipe.run_name,
            "task": "+".join(dict.fromkeys(t.settings.registry_name for t in tasks.values())),
            "tasks": {name: {"type": t.settings.registry_name, "state": t.state} for name, t in tasks.items()},
            "encoders": enc_entries,
            "head": {"type": recipe.fusion["type"], "file": "head.safetensors", "parameters": count_parameters(model.head)},
            "head_files": {name: files for name, files in extra_files.items() if files},  # e.g. a decoder's peft adapter
            "vocabulary": next(iter(tasks.values())).labels,  # the first task's output names (earlier versions' only vocabulary)
            **(extra or {}),
        })
        return self.manifest

    def write_text(self, rel: str, text: str) -> Path:
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_json(self, rel: str, data) -> Path:
        return self.write_text(rel, json.dumps(data, indent=2))


@contextmanager
def bundle_writer(target: Path, overwrite: bool = False) -> Iterator[BundleWriter]:
    """Write a bundle at ``target``: call :meth:`BundleWriter.add_model` (and add any other
    files) inside the block; on leaving it the manifest is sealed and the folder renamed
    into place. Nothing is left at ``target`` if the block fails."""
    with sealed_directory(target, "manifest.json", overwrite=overwrite) as sealing:
        writer = BundleWriter(sealing)
        yield writer
        if "format" not in writer.manifest:
            raise MMPeftError(f"{target}: a bundle needs its model (BundleWriter.add_model) before it is sealed")


def write_bundle(target: Path, model, recipe, tasks: dict | Sequence[str], metrics: dict, extra: Optional[dict] = None,
                 overwrite: bool = False) -> dict:
    """A bundle holding only the model's files (no log, plots or card); returns its sealed manifest."""
    with bundle_writer(target, overwrite=overwrite) as writer:
        manifest = writer.add_model(model, recipe, tasks, metrics, extra)
    return manifest
