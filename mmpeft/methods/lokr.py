"""LoKr through peft: a weight update that is the Kronecker product of a small matrix and a
low-rank one.

Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation" (LyCORIS), ICLR 2024; the Kronecker-product adapter follows Edalati et al.,
"KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022. The second factor starts at
zero, so the adapted encoder equals the frozen one at init; it folds into the weights on merge.
Linear and convolution layers (our CNN encoders too).
"""

from __future__ import annotations

from ..config.methods import LoKrSettings
from .base import METHODS
from .lycoris import LycorisTuner


@METHODS.register("lokr")
class LoKr(LycorisTuner):
    """LoKr: the Kronecker product of a small factor and a low-rank factor."""

    Settings = LoKrSettings
    paper = "Yeh et al. 2024 (LyCORIS), arXiv:2309.14859; Edalati et al. 2022 (KronA), arXiv:2212.10650"

    def peft_config(self, targets):
        from peft import LoKrConfig

        s = self.settings
        return LoKrConfig(r=s.rank, alpha=s.alpha, rank_dropout=s.rank_dropout, module_dropout=s.module_dropout,
                          decompose_both=s.decompose_both, decompose_factor=s.decompose_factor,
                          use_effective_conv2d=s.use_effective_conv2d, target_modules=targets)
