"""Write and read adapter bundles.

Layout of ``adapters/<run>/``::

    manifest.json          versions, per-encoder model/method/fingerprint/files, vocabulary, file hashes
    recipe.yaml            the fully resolved recipe
    encoders/<name>/       the method's trained weights (LoRA: peft's adapter_config.json +
                           adapter_model.safetensors; others: weights.safetensors)
    head.safetensors       the fusion head
    metrics.json           test metrics (and validation history)
    train_log.jsonl        one line per evaluation
    README.md              model card
    *.png                  training curves, per-group accuracy

Bundles are untrusted when shared: they are read as JSON, YAML (safe loader) and
safetensors only; every file named in the manifest must lie inside the bundle and
match its recorded sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import BundleError, MMPeftError
from ..methods.base import check_state, count_parameters, read_safetensors
from .fingerprint import file_sha256

FORMAT = "mmpeft-bundle"
FORMAT_VERSION = 1


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``target``.

    An interrupted write leaves only a hidden ``.tmp`` directory, never a half bundle.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise MMPeftError(f"{target} already exists; choose another output name or pass --overwrite / output.overwrite=true")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_text_file(target: Path, newline: Optional[str] = None) -> Iterator:
    """Yield a text handle on a hidden sibling of ``target``, renamed onto it once the
    block completes: an interrupted write keeps the old file (or none), never half one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline=newline) as handle:
            yield handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"mmpeft": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_bundle_files(directory: Path, model, recipe, vocab: Sequence[str], metrics: dict, extra: Optional[dict] = None) -> dict:
    """Write a bundle's files into ``directory`` (already created) and return its manifest."""
    from ..config import dump_recipe
    from ..quant import quantized_layers

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
    head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head_state, str(directory / "head.safetensors"))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "run_name": recipe.run_name,
        "task": recipe.task.type,
        "encoders": enc_entries,
        "head": {"type": recipe.fusion["type"], "file": "head.safetensors", "parameters": count_parameters(model.head)},
        "vocabulary": list(vocab),
        **(extra or {}),
    }
    manifest["files"] = file_table(directory)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def file_table(directory: Path) -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of every file but the manifest itself."""
    table = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            table[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return table


def refresh_file_hashes(directory: Path) -> None:
    """Re-hash the files after adding some (README, plots) and rewrite the manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = file_table(directory)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} (expected a directory written by 'mmpeft finetune')")
    if not path.is_file():
        raise BundleError(f"{bundle} is not an mmpeft bundle: no manifest.json")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not an mmpeft bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest['format_version']} is newer than this mmpeft understands; upgrade mmpeft")
    return manifest


def verify_files(bundle: Path, manifest: dict) -> None:
    """Every listed file lies inside the bundle and has its recorded hash."""
    root = Path(bundle).resolve()
    listed = manifest.get("files", {})
    names = set(listed)
    for entry in manifest.get("encoders", {}).values():
        names.update(entry.get("files", []))
    names.add(manifest.get("head", {}).get("file", "head.safetensors"))
    for rel in sorted(names):
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{bundle}/manifest.json names a path outside the bundle: {rel!r}; refusing to load")
        full = (root / rel).resolve()
        if root not in full.parents:
            raise BundleError(f"{bundle}/manifest.json names a path outside the bundle: {rel!r}; refusing to load")
        if not full.is_file():
            raise BundleError(f"bundle file missing: {full}")
        info = listed.get(rel)
        if info is None:
            raise BundleError(f"{bundle}/manifest.json: {rel} has no recorded hash; the bundle was altered")
        if file_sha256(full) != info.get("sha256"):
            raise BundleError(f"{full} does not match the hash in manifest.json: the bundle was modified after it was written")


@dataclass
class LoadedBundle:
    path: Path
    manifest: dict
    recipe: object
    model: object
    vocab: list[str]


def load_bundle(path, *, device: str = "cpu", allow_base_mismatch: bool = False, overrides: Sequence[str] = (),
                verify_base: bool = True) -> LoadedBundle:
    """Rebuild the model from its base encoders and a bundle's trained weights.

    Args:
        path: bundle directory.
        device: where to put the model.
        allow_base_mismatch: load even if a base encoder's fingerprint differs (warns).
        overrides: dotted recipe overrides that do not change the architecture (e.g. ``data.root=...``).
        verify_base: compare base fingerprints (internal merges of a de-quantized copy turn it off).

    Raises:
        BundleError: missing/tampered files, wrong shapes, or a different base encoder.
    """
    from ..config import load_recipe
    from ..model import build_model

    bundle = Path(path)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    overrides = list(overrides)
    if manifest.get("merged"):
        # A merged model carries its own base encoders, named relative to the directory.
        root = bundle.resolve()
        for name, entry in manifest.get("encoders", {}).items():
            base = (root / str(entry.get("model", ""))).resolve()
            if root not in base.parents or not base.is_dir():
                raise BundleError(f"{bundle}/manifest.json: encoder {name!r} base {entry.get('model')!r} is not a directory inside the bundle")
            overrides.insert(0, f"encoders.{name}.model={base}")
    recipe = load_recipe(bundle / "recipe.yaml", overrides)
    vocab = manifest.get("vocabulary")
    if not isinstance(vocab, list) or not vocab:
        raise BundleError(f"{bundle}/manifest.json: missing answer vocabulary")
    if set(manifest.get("encoders", {})) != set(recipe.encoders):
        raise BundleError(f"{bundle}: manifest encoders {sorted(manifest.get('encoders', {}))} differ from the recipe's {sorted(recipe.encoders)}")
    model = build_model(recipe, len(vocab), device=device)
    for name, enc in model.encoders.items():
        entry = manifest["encoders"][name]
        recorded = entry.get("fingerprint")
        if verify_base and recorded and recorded != enc.base_fingerprint:
            message = (
                f"encoder {name!r}: the base model {recipe.encoders[name].model!r} loaded here has fingerprint "
                f"{enc.base_fingerprint[:19]}..., but the bundle was trained on a base with {recorded[:19]}... "
                "(another checkpoint or revision)"
            )
            if not allow_base_mismatch:
                raise BundleError(message + "; pass --allow-base-mismatch to load anyway")
            print(f"warning: {message}; loading anyway (--allow-base-mismatch)")
        model.methods[name].load(enc, bundle / "encoders" / name)
    head_state = read_safetensors(bundle / manifest["head"]["file"])
    expected = model.head.state_dict()
    check_state(head_state, {k: v.shape for k, v in expected.items()}, bundle / manifest["head"]["file"])
    model.head.load_state_dict(head_state)
    model.to(device)
    model.train(False)
    return LoadedBundle(bundle, manifest, recipe, model, vocab)
