"""LN tuning through peft: only the normalisation layers' scales and shifts train.

Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
ICLR 2024. peft trains a copy of each LayerNorm (or RMSNorm), which starts equal to it, so
the adapted encoder equals the frozen one at init; merging swaps the tuned copies in.
Encoders without such layers (our CNNs normalise with batch-norm) are refused; BitFit tunes
those CNNs' batch-norm shifts instead.
"""

from __future__ import annotations

from torch import nn

from ..config.methods import LNTuningSettings
from ..encoders.targets import name_matches
from ..errors import RecipeError
from .base import METHODS
from .peft_tuner import PeftTuner


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and its relatives (transformers' RMSNorm classes, T5's LayerNorm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def norm_layers(model: nn.Module, targets=None) -> list[str]:
    """Full names of the normalisation layers ``targets`` matches (peft's rules), or all of them."""
    return [name for name, module in model.named_modules()
            if name and is_norm(module) and (targets is None or name_matches(name, targets))]


@METHODS.register("ln_tuning")
class LNTuning(PeftTuner):
    """LN tuning: train the LayerNorm / RMSNorm scales and shifts only."""

    Settings = LNTuningSettings
    layer_kinds = "LayerNorm / RMSNorm layers"
    default_lr = 1e-3
    paper = "Zhao et al. 2024, arXiv:2312.11420"

    def unavailable(self, encoder):
        if not norm_layers(encoder.model):
            return "it has no LayerNorm or RMSNorm layers to tune; choose another method, e.g. bitfit or lora"
        return None

    def targets(self, encoder):
        requested = self.settings.target_modules
        names = norm_layers(encoder.model, requested)
        if not names:
            available = sorted({n.rsplit(".", 1)[-1] for n in norm_layers(encoder.model)})
            raise RecipeError([f"{self.where}.target_modules: {requested!r} matches no LayerNorm / RMSNorm layer of "
                               f"{encoder.source!r}; its normalisation layers are named: {', '.join(available)}"])
        return names, names

    def peft_config(self, targets):
        from peft import LNTuningConfig

        return LNTuningConfig(target_modules=targets)
