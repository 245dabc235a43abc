"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022. Every bias trains (attention,
feed-forward, LayerNorm, and batch-norm biases in CNNs, whose running statistics
stay fixed because the frozen encoder runs in eval mode).
"""

from __future__ import annotations

from ..config.methods import BitFitSettings
from ..errors import RecipeError
from .base import METHODS, PeftMethod


@METHODS.register("bitfit")
class BitFit(PeftMethod):
    """BitFit: train only the bias terms (Ben Zaken et al. 2022)."""

    Settings = BitFitSettings
    mergeable = True  # the biases live in the base model: nothing to fold
    default_lr = 1e-3
    paper = "Ben Zaken et al. 2022, arXiv:2106.10199"

    def apply(self, encoder) -> None:
        touched = set()
        for name, p in encoder.model.named_parameters():
            is_bias = name.endswith(".bias") or name == "bias"
            p.requires_grad_(is_bias)
            if is_bias:
                touched.add(name.rsplit(".", 1)[0])
        if not touched:
            raise RecipeError([f"{self.where}.method: bitfit found no bias parameters in {encoder.source!r}"])
        self.touched = sorted(touched)

    def merge(self, encoder) -> bool:
        return True
