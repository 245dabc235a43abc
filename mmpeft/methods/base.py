"""The interface every PEFT method implements, and the method registry.

A method is one module with one ``@METHODS.register("name")`` class. It owns:
its recipe settings (a strict pydantic model), how it attaches to an
:class:`~mmpeft.encoders.Encoder`, which of its parameters train, how they are
saved/loaded (safetensors only), and whether/how they fold into base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import BundleError
from ..registry import Registry

METHODS: Registry[type["PeftMethod"]] = Registry("PEFT method")


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeftMethod:
    """Base class. Subclasses override :meth:`apply` and, where needed, save/load/merge."""

    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    #: True when the base weights stay frozen (so the base may be quantized).
    keeps_base_frozen: ClassVar[bool] = True
    #: True when :meth:`merge` folds the method into the base weights.
    mergeable: ClassVar[bool] = False
    #: True when the adapted encoder equals the frozen one before training.
    identity_at_init: ClassVar[bool] = True
    #: Paper or source the method follows (shown in docs and dry runs).
    paper: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init__(self, settings: dict, where: str = "peft"):
        clean = {k: v for k, v in settings.items() if k != "method"}
        self.settings = self.Settings.model_validate(clean)
        self.where = where  # recipe path, for error messages
        self.touched: list[str] = []

    @property
    def name(self) -> str:
        return self.registry_name

    # --- attach ----------------------------------------------------------
    def apply(self, encoder) -> None:
        """Attach to ``encoder`` in place and mark exactly the method's parameters trainable."""
        raise NotImplementedError

    def train_modules(self, encoder) -> list[nn.Module]:
        """Modules switched to train mode while training (the frozen rest stays in eval)."""
        return []

    # --- persistence -----------------------------------------------------
    def trainable_state(self, encoder) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in encoder.named_parameters() if p.requires_grad}

    def save(self, encoder, directory: Path) -> list[str]:
        """Write the trained parameters; returns the file names written."""
        state = self.trainable_state(encoder)
        if not state:
            return []
        save_file(state, str(directory / "weights.safetensors"))
        return ["weights.safetensors"]

    def load(self, encoder, directory: Path) -> None:
        """Load parameters written by :meth:`save`, checking names and shapes exactly."""
        expected = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
        if not expected:
            return
        state = read_safetensors(directory / "weights.safetensors")
        check_state(state, {n: p.shape for n, p in expected.items()}, directory / "weights.safetensors")
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor.to(expected[name].dtype))

    # --- merge -----------------------------------------------------------
    def merge(self, encoder) -> bool:
        """Fold the method into the base weights if possible; True when folded."""
        return False


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read an untrusted tensor file: safetensors only, never pickle."""
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a valid safetensors file ({exc})") from None


def check_state(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], path) -> None:
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    bad = [f"{n}: file {tuple(state[n].shape)} vs model {tuple(shapes[n])}" for n in state if n in shapes and state[n].shape != shapes[n]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
        if bad:
            parts.append(f"shape mismatch {bad[:5]}")
        raise BundleError(f"{path} does not match the model its recipe builds: " + "; ".join(parts))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Logical parameter count (4-bit weights counted by their unpacked shape, not their bytes)."""
    total = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None and getattr(state, "shape", None) is not None else p.numel()
    return total
