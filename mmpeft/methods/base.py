"""The interface every PEFT method implements, and the method registry.

A method is one module with one ``@METHODS.register("name")`` class. It owns: how it
attaches to an :class:`~mmpeft.encoders.Encoder`, which of its parameters train, how
they are saved/loaded (safetensors only), and whether/how they fold into base weights.
Its recipe settings are a strict pydantic class registered under the same name in
:mod:`mmpeft.config.methods` (torch-free, so recipes validate without torch).

Code outside this package asks a method what it can do through the flags below, never
by its name.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..config.methods import MethodSettings
from ..errors import RecipeError
from ..files import read_safetensors
from ..registry import Registry

METHODS: Registry[type["PeftMethod"]] = Registry("PEFT method")


class PeftMethod:
    """Base class. Subclasses override :meth:`apply` and, where needed, save/load/merge."""

    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    #: True when the base weights stay frozen (so the base may be quantized); declared
    #: once, on the settings class, because the torch-free recipe check needs it too.
    keeps_base_frozen: ClassVar[bool] = True
    #: True when the method runs on a 4/8-bit base (declared on the settings class too).
    quantized_base: ClassVar[bool] = True
    #: True when the method adapts a generate task's decoder too (declared on the settings class).
    for_decoder: ClassVar[bool] = True
    #: The layer kinds the method adapts, in words (docs and refusals; empty: not layer-based).
    layer_kinds: ClassVar[str] = ""
    #: True when the method trains anything inside the encoder. An encoder whose method
    #: does not is a fixed feature extractor: its outputs can be cached between epochs.
    trains_encoder: ClassVar[bool] = True
    #: True when :meth:`merge` folds the method into the base weights.
    mergeable: ClassVar[bool] = False
    #: True when the adapted encoder equals the frozen one before training.
    identity_at_init: ClassVar[bool] = True
    #: A learning rate that suits the method when it adapts a pretrained encoder; the
    #: benchmarks use it to compare methods, a recipe sets its own (``train.lr``).
    default_lr: ClassVar[float] = 5e-4
    #: Paper or source the method follows (shown in docs and dry runs).
    paper: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.keeps_base_frozen = cls.Settings.keeps_base_frozen
        cls.quantized_base = cls.Settings.quantized_base
        cls.for_decoder = cls.Settings.for_decoder

    def __init__(self, settings: dict, where: str = "peft"):
        clean = {k: v for k, v in settings.items() if k != "method"}
        self.settings = self.Settings.model_validate(clean)
        self.where = where  # recipe path, for error messages
        self.touched: list[str] = []

    @property
    def name(self) -> str:
        return self.registry_name

    # --- attach ----------------------------------------------------------
    def unavailable(self, encoder) -> str | None:
        """Why the method cannot adapt ``encoder`` with these settings (None: it can). Asked
        before :meth:`apply`, so a recipe that cannot work is refused when the model is built."""
        return None

    def attach(self, encoder) -> None:
        """:meth:`apply`, after a refusal naming the reason where the method cannot adapt ``encoder``."""
        reason = self.unavailable(encoder)
        if reason:
            raise RecipeError([f"{self.where}: {self.name} is not available for {encoder.arch} models: {reason}"])
        self.apply(encoder)

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
        state = read_safetensors(directory / "weights.safetensors", expected)
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor.to(expected[name].dtype))

    # --- merge -----------------------------------------------------------
    def merge(self, encoder) -> bool:
        """Fold the method into the base weights if possible; True when folded."""
        return False

    @contextmanager
    def base_only(self, encoder) -> Iterator[None]:
        """Inside the block, the base model holds none of the method's own modules, so it
        can be saved as a plain model (a merge keeps unfoldable methods beside it)."""
        yield


def build_method(settings: dict, where: str = "peft") -> PeftMethod:
    """Instantiate the method named by ``settings['method']`` with its settings."""
    return METHODS.get(settings.get("method", "lora"))(settings, where)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Logical parameter count (4-bit weights counted by their unpacked shape, not their bytes)."""
    total = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None and getattr(state, "shape", None) is not None else p.numel()
    return total
