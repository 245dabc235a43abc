"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a sealed folder ``<output.dir>/.checkpoints/<run>/ckpt-e<epoch>-s<step>/``
(written to a temporary folder and renamed, its files hashed in ``checkpoint.json``):

- ``state.safetensors``: the trainable parameters (each encoder's method state, the head),
  the optimizer's tensors, the best state so far, the frozen-feature caches;
- ``checkpoint.json``: versions, the resolved settings and a fingerprint of the data rows
  (a checkpoint is only resumed into the same run), the loop position (epoch, batches done
  in it, step), the optimizer's and scheduler's other state, the gradient scaler, early
  stopping, the history, and every RNG state (Python, NumPy, torch CPU and CUDA, the data
  order's generator; one entry per process), at the last step and at the epoch's start.

Resuming rebuilds the model from the recipe, loads this, replays the epoch's data order
from its start and skips the batches already done, so a resumed run computes exactly what
the uninterrupted one does (bit for bit on CPU). Everything is safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from . import faults
from .errors import BundleError, RecipeError
from .files import check_integrity, read_safetensors, sealed_directory, verify_sealed
from .version import __version__

FORMAT = "mmpeft-checkpoint"
# Settings that do not change what a run computes: a checkpoint resumes across them.
NEUTRAL_SETTINGS = {"output", "data.root", "train.log_every", "train.report_to", "train.num_workers", "train.checkpoint_every",
                    "train.checkpoint_minutes", "train.keep_checkpoints", "train.device", "train.profile_steps",
                    "train.profile_skip"}


def _flatten(value, prefix: str, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value
    return out


def run_settings(recipe) -> dict:
    """The resolved settings a run's result depends on, as ``{dotted key: value}``."""
    flat = _flatten(recipe.model_dump(mode="json"), "", {})
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NEUTRAL_SETTINGS)}


def data_fingerprint(splits) -> str:
    """sha256 over every row of every split (image, text, answer, groups, audio, encoders' own columns), row by row (a
    million rows are hashed without building one large string)."""
    digest = hashlib.sha256()
    for name in ("train", "eval", "test"):
        digest.update(f"[{name}]".encode())
        for s in getattr(splits, name):
            row = ([s.image, s.text, s.answer, sorted(s.groups.items())] + ([s.audio] if s.audio else [])
                   + ([sorted(s.extra.items())] if s.extra else []) + ([s.dataset] if s.dataset else [])
                   + ([sorted(s.inputs.items())] if s.inputs else []))
            digest.update(json.dumps(row).encode())
    return digest.hexdigest()


# --- RNG states -------------------------------------------------------------


def _bytes(t: torch.Tensor) -> list[int]:
    return t.to(torch.uint8).tolist()


def capture_rng(generator: Optional[torch.Generator] = None, sampler=None) -> dict:
    """Every RNG state this process has, as JSON: Python, NumPy, torch CPU and CUDA, and the
    data order's own generator and sampler epoch."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = _bytes(generator.get_state())
    if sampler is not None and hasattr(sampler, "epoch"):
        state["sampler_epoch"] = sampler.epoch
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None, sampler=None, data_order: bool = True) -> None:
    """Set the states :func:`capture_rng` saved; ``data_order=False`` leaves the loader's
    generator and the sampler alone (they were replayed from the epoch's start)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if data_order:
        if generator is not None and "loader" in state:
            generator.set_state(torch.tensor(state["loader"], dtype=torch.uint8))
        if sampler is not None and "sampler_epoch" in state:
            sampler.set_epoch(state["sampler_epoch"])


# --- the loop's position and history ---------------------------------------


@dataclass
class LoopState:
    """Where the loop is and what it has seen; ``epoch`` is the epoch to run next (or the one
    in progress when ``batches_done`` > 0)."""

    epoch: int = 1
    batches_done: int = 0
    step: int = 0
    seen: int = 0
    running: float = 0.0
    task_running: dict = field(default_factory=dict)  # multi-task: each task's running loss
    history: list = field(default_factory=list)
    best_value: Optional[float] = None
    best_epoch: int = 0
    stale: int = 0
    finished: bool = False
    accelerator_step: int = 0


class RunningLoss:
    """The loop's running losses (an exponential moving average, 0.9 / 0.1) kept on the
    device. Reading a loss as a Python float (``loss.item()``) waits for the GPU to finish
    the step, so the host cannot queue the next step's kernels meanwhile; the averages reach
    the host only where they are shown or saved (:meth:`sync`). float64, like the Python
    float they replace, so every figure is bit-identical to averaging ``loss.item()``."""

    def __init__(self, loop: LoopState):
        self.loop = loop
        self.total: Optional[torch.Tensor] = None  # None until this process's first step
        self.tasks: dict[str, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, losses: dict, counts: dict) -> None:
        """After step ``loop.step`` (already counted): ``loss`` the weighted total, ``losses``
        each task's, ``counts`` each task's rows in the batch (a task without rows learns
        nothing from it, so its average skips the batch)."""
        value = loss.detach().double()
        if self.loop.step == 1:
            self.total = value
        else:
            if self.total is None:  # resumed: continue the saved average
                self.total = torch.tensor(self.loop.running, dtype=torch.float64, device=value.device)
            self.total = 0.9 * self.total + 0.1 * value
        if len(losses) > 1:
            for name, task_loss in losses.items():
                if counts[name]:
                    v = task_loss.detach().double()
                    if name not in self.tasks:
                        saved = self.loop.task_running.get(name)
                        self.tasks[name] = v if saved is None else torch.tensor(saved, dtype=torch.float64, device=v.device)
                    self.tasks[name] = 0.9 * self.tasks[name] + 0.1 * v

    def sync(self) -> None:
        """Copy the averages into the loop's state (a host-device sync: at log steps, epoch
        ends and checkpoints only)."""
        if self.total is not None:
            self.loop.running = self.total.item()
        for name, value in self.tasks.items():
            self.loop.task_running[name] = value.item()


# --- writing ----------------------------------------------------------------


def model_state(model) -> dict[str, torch.Tensor]:
    """What training changes in the model: each encoder's method state and the head."""
    state = {}
    for name, enc in model.encoders.items():
        for key, value in model.methods[name].trainable_state(enc).items():
            state[f"encoders.{name}.{key}"] = value
    for key, value in model.head.state_dict().items():
        state[f"head.{key}"] = value.detach().cpu().contiguous()
    return state


def load_model_state(model, tensors: dict[str, torch.Tensor], path) -> None:
    for name, enc in model.encoders.items():
        prefix = f"encoders.{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        result = enc.load_state_dict(own, strict=False)
        if result.unexpected_keys:
            raise BundleError(f"{path}: tensors {result.unexpected_keys[:5]} do not belong to encoder {name!r}")
    model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})


def _optimizer_parts(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _cache_parts(model) -> tuple[dict, dict]:
    tensors, keys = {}, {}
    for name, cache in model.feature_caches.items():
        if not cache.store:
            continue
        items = list(cache.store.items())
        keys[name] = [k for k, _ in items]
        tensors[f"cache.{name}.tokens"] = torch.cat([v[0] for _, v in items]).contiguous()
        tensors[f"cache.{name}.lengths"] = torch.tensor([v[0].shape[0] for _, v in items], dtype=torch.int64)
        tensors[f"cache.{name}.pooled"] = torch.stack([v[1] for _, v in items]).contiguous()
    return tensors, keys


def _load_caches(model, tensors: dict, keys: dict, device) -> None:
    for name, names in keys.items():
        cache = model.feature_caches.get(name)
        if cache is None:
            continue
        tokens = tensors[f"cache.{name}.tokens"].to(device)
        pooled = tensors[f"cache.{name}.pooled"].to(device)
        starts = torch.cumsum(tensors[f"cache.{name}.lengths"], 0).tolist()
        begin = 0
        for i, (key, end) in enumerate(zip(names, starts)):
            cache.store[key] = (tokens[begin:end], pooled[i])
            begin = end


CHECKPOINT_FILES = frozenset({"checkpoint.json", "state.safetensors"})


def write_checkpoint(folder: Path, *, model, optimizer, scheduler, scaler, loop: LoopState, rng: list, epoch_rng: Optional[list],
                     best_state: Optional[dict], settings: dict, data_fp: str, keep: int) -> Path:
    """Write one checkpoint (atomically) and keep only the newest ``keep``; returns its path."""
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    tensors.update(opt_tensors)
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    cache_tensors, cache_keys = _cache_parts(model)
    tensors.update(cache_tensors)
    target = Path(folder) / f"ckpt-e{loop.epoch:04d}-b{loop.batches_done:06d}-s{loop.step:08d}"
    # a checkpoint of ours whose checkpoint.json was damaged (resume fell back past it) is replaced
    with sealed_directory(target, "checkpoint.json", overwrite=True, ours=CHECKPOINT_FILES) as sealing:
        save_file(tensors, str(sealing.path / "state.safetensors"))
        sealing.manifest.update({
            "format": FORMAT, "versions": {"mmpeft": __version__, "torch": torch.__version__},
            "settings": settings, "data_fingerprint": data_fp, "loop": asdict(loop), "rng": rng, "epoch_rng": epoch_rng,
            "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "has_best": best_state is not None, "cache_keys": cache_keys,
        })
        faults.point("checkpoint.writing")
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


# --- reading ----------------------------------------------------------------


def list_checkpoints(folder: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("ckpt-e*") if p.is_dir()) if folder.is_dir() else []


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    tensors: dict

    @property
    def loop(self) -> LoopState:
        return LoopState(**self.meta["loop"])

    def restore(self, model, optimizer, scheduler, scaler, device) -> Optional[dict]:
        """Load the model, optimizer, scheduler, scaler and caches; returns the best state so far."""
        load_model_state(model, {k[6:]: v for k, v in self.tensors.items() if k.startswith("model.")}, self.path)
        _load_optimizer(optimizer, self.tensors, self.meta["optimizer"])
        scheduler.load_state_dict(self.meta["scheduler"])
        if scaler is not None and self.meta["scaler"]:
            scaler.load_state_dict(self.meta["scaler"])
        _load_caches(model, self.tensors, self.meta.get("cache_keys", {}), device)
        if not self.meta["has_best"]:
            return None
        return {k[5:]: v.to(device) for k, v in self.tensors.items() if k.startswith("best.")}


def _major(version: str) -> str:
    return version.split(".")[0]


def _read(path: Path, settings: dict, data_fp: str) -> Checkpoint:
    """One checkpoint, verified; RecipeError when it belongs to another run, BundleError when damaged."""
    manifest_path = path / "checkpoint.json"
    try:
        meta = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an mmpeft checkpoint")
    check_integrity(meta, manifest_path)
    verify_sealed(path, meta.get("files"), set(meta.get("files") or {}), str(manifest_path))
    versions = meta.get("versions", {})
    for lib, now in (("mmpeft", __version__), ("torch", torch.__version__)):
        if _major(str(versions.get(lib, "?"))) != _major(now):
            raise RecipeError([f"{path} was written by {lib} {versions.get(lib)}; this is {lib} {now}, whose results "
                               "may differ: start the run again (without --resume)"])
    old = meta.get("settings", {})
    differ = sorted(k for k in set(old) | set(settings) if old.get(k, "<absent>") != settings.get(k, "<absent>"))
    if differ:
        raise RecipeError([f"{k}: {old.get(k, '<absent>')!r} in the checkpoint, {settings.get(k, '<absent>')!r} now"
                           for k in differ[:20]] + [f"{path} is a checkpoint of this run with other settings; resume with "
                                                    "the settings above, or start again (without --resume)"])
    if meta.get("data_fingerprint") != data_fp:
        raise RecipeError([f"{path}: the data rows (train, validation or test) changed since this checkpoint was "
                           "written; resume with the same data, or start again (without --resume)"])
    tensors = read_safetensors(path / "state.safetensors", finite=False)  # as written, NaN of a diverging run included
    return Checkpoint(path, meta, tensors)


def newest_checkpoint(folder: Path, settings: dict, data_fp: str, notice=print) -> Optional[Checkpoint]:
    """The newest valid checkpoint of a run. A damaged one (a crash mid-write never leaves
    one, but a disk can) is skipped for the one before, and said so; one made with other
    settings or data stops the resume with the differences named."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return _read(path, settings, data_fp)
        except BundleError as exc:
            notice(f"checkpoint {path.name} is damaged ({exc}); trying the one before")
    return None


def remove_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    parent = Path(folder).parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def is_final(checkpoint: Path) -> bool:
    """Whether a checkpoint was written after training finished (only the test pass and the bundle were left)."""
    try:
        return bool(json.loads((checkpoint / "checkpoint.json").read_text())["loop"]["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters (the best epoch's, kept while training goes on)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
