"""VeRA through peft: one pair of frozen random matrices shared by every adapted layer,
and per-layer trained scaling vectors.

Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
The update of a layer is ``diag(b) B diag(d) A``: ``A`` and ``B`` are drawn once from
``projection_seed`` and stored with the adapter (so plain peft rebuilds the same model), only
``b`` and ``d`` train. ``b`` starts at zero, so the adapted encoder equals the frozen one at
init; the update folds into the weights on merge. Linear layers only (peft has no VeRA for
convolutions), so CNN encoders are refused.
"""

from __future__ import annotations

from ..config.methods import VeraSettings
from .base import METHODS
from .peft_tuner import PeftTuner, is_linear


@METHODS.register("vera")
class VeRA(PeftTuner):
    """VeRA: shared frozen random low-rank matrices, trained per-layer scaling vectors."""

    Settings = VeraSettings
    layer_kinds = "Linear layers"
    dropout_modules = ("vera_dropout",)
    # only two vectors per layer train: they take learning rates far above LoRA's
    default_lr = 4e-3
    paper = "Kopiczko et al. 2024, arXiv:2310.11454"

    def adapts(self, module):
        return is_linear(module)

    def peft_config(self, targets):
        from peft import VeraConfig

        s = self.settings
        return VeraConfig(r=s.rank, target_modules=targets, projection_prng_key=s.projection_seed,
                          save_projection=True, vera_dropout=s.dropout, d_initial=s.d_initial, bias="none")
