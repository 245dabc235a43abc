"""What every method built on Hugging Face peft shares: target layers from the recipe or the
architecture table, layer kinds the method can adapt, peft's own file layout, and merging.

A method here is a peft tuner (LoRA, IA3, VeRA, LoHa, LoKr, OFT, BOFT, LN tuning): it says
which peft config the recipe's settings make and which layers it adapts; attaching, saving
in peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto the plain encoder), loading and merging live
here once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..encoders.targets import leaf_names, match_targets
from ..errors import BundleError, RecipeError
from ..files import read_safetensors
from .base import PeftMethod


def resolve_targets(method: PeftMethod, encoder, requested, default=None):
    """Targets from the recipe or the architecture's default (LoRA's unless given); an error
    listing the real module names when none is known or none matches."""
    targets = requested or (default if default is not None else encoder.family.lora)
    available = leaf_names(encoder.model)
    if not targets:
        raise RecipeError([
            f"{method.where}.target_modules: no default targets for architecture {encoder.arch!r}; "
            f"set it to some of: {', '.join(available)}"
        ])
    matched = match_targets(encoder.model, targets)
    if not matched:
        raise RecipeError([
            f"{method.where}.target_modules: {targets!r} matches no layer of {encoder.source!r} ({encoder.arch}); "
            f"available module names: {', '.join(available)}"
        ])
    return targets, matched


def load_peft_weights(encoder, directory: Path) -> None:
    """Load ``adapter_model.safetensors`` (read as safetensors, never pickle) into a peft model,
    after checking its tensor names and shapes against what the recipe built."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    state = read_safetensors(directory / "adapter_model.safetensors", get_peft_model_state_dict(encoder.model))
    set_peft_model_state_dict(encoder.model, state)


def is_linear(module: nn.Module) -> bool:
    """A Linear layer, or transformers' Conv1D (a transposed Linear, in GPT-2-style decoders)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    return isinstance(module, (nn.Linear, Conv1D))


class PeftTuner(PeftMethod):
    """A peft tuner: subclasses give :meth:`peft_config` and, where they adapt fewer layer
    kinds than peft's LoRA, :meth:`adapts` and :attr:`layer_kinds`."""

    mergeable = True
    #: The layer kinds the method adapts, in words (for refusals).
    layer_kinds: ClassVar[str] = "Linear and convolution layers"
    #: Suffixes of the method's own dropout modules, switched to train mode while training.
    dropout_modules: ClassVar[tuple[str, ...]] = ()

    def peft_config(self, targets):
        raise NotImplementedError

    def adapts(self, module: nn.Module) -> bool:
        """Whether the method can adapt this layer (one the target rules matched)."""
        return True

    def default_targets(self, encoder):
        """The architecture table's targets for this method (LoRA's, unless it has its own)."""
        return encoder.family.lora

    def _matched(self, encoder):
        """(the target rule, adaptable full names, not adaptable ones) of the layers it matches."""
        spec, matched = resolve_targets(self, encoder, self.settings.target_modules, self.default_targets(encoder))
        modules = dict(encoder.model.named_modules())
        ok = [n for n in matched if self.adapts(modules[n])]
        return spec, ok, [n for n in matched if n not in ok]

    def unavailable(self, encoder):
        if self.settings.target_modules:
            return None  # named layers it cannot adapt are named in targets()' error
        _, ok, skipped = self._matched(encoder)
        if not ok:
            return (f"none of the {len(skipped)} target layers is one it adapts ({self.layer_kinds}); "
                    "set target_modules to such layers or choose another method")
        return None

    def targets(self, encoder):
        """(what peft's config gets, full names of the layers to adapt). Layers the method
        cannot adapt are left out of the architecture's defaults (peft then gets the names
        that remain), and are an error when the recipe names them."""
        spec, ok, skipped = self._matched(encoder)
        if skipped and self.settings.target_modules:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            raise RecipeError([f"{self.where}.target_modules: {self.name} adapts {self.layer_kinds} only; "
                               f"it cannot adapt {shown}"])
        return (ok if skipped else spec), ok

    def apply(self, encoder) -> None:
        from peft import get_peft_model

        spec, names = self.targets(encoder)
        try:
            encoder.model = get_peft_model(encoder.model, self.peft_config(spec))
        except (ValueError, TypeError) as exc:  # peft's own refusal of a layer kind, shape or setting
            raise RecipeError([f"{self.where}: {self.name} cannot adapt {encoder.source!r}: {exc}"]) from None
        self.touched = names

    def train_modules(self, encoder):
        # dropout lives inside each adapted layer: switch those on, keep the base in eval
        if not self.dropout_modules:
            return []
        return [m for n, m in encoder.model.named_modules() if n.endswith(self.dropout_modules)]

    def save(self, encoder, directory: Path) -> list[str]:
        encoder.model.save_pretrained(str(directory), safe_serialization=True)
        card = directory / "README.md"
        if card.exists():  # peft's generic card; the bundle has its own
            card.unlink()
        return ["adapter_config.json", "adapter_model.safetensors"]

    def stored_settings(self) -> dict[str, tuple[str, object]]:
        """``adapter_config.json`` key -> (its name in words, the value the recipe implies): what
        a stored adapter must agree on beyond its tensors' shapes."""
        return {"r": ("rank", self.settings.rank)} if "rank" in type(self.settings).model_fields else {}

    def check_config(self, cfg: dict, cfg_path: Path) -> None:
        for key, (what, value) in self.stored_settings().items():
            if cfg.get(key) != value:
                raise BundleError(f"{cfg_path}: {what} {cfg.get(key)} differs from the recipe's {value}")

    def read_config(self, directory: Path) -> dict:
        """The stored ``adapter_config.json``, checked against the recipe."""
        cfg_path = directory / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{cfg_path}: unreadable adapter config ({exc})") from None
        if not isinstance(cfg, dict):
            raise BundleError(f"{cfg_path}: the adapter config is not a JSON object")
        self.check_config(cfg, cfg_path)
        return cfg

    def load(self, encoder, directory: Path) -> None:
        self.read_config(directory)
        load_peft_weights(encoder, directory)

    def merge(self, encoder) -> bool:
        encoder.model = encoder.model.merge_and_unload()
        return True
