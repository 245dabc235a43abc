"""BOFT through peft: orthogonal fine-tuning whose rotation is a product of butterfly
factors, each block-diagonal after a fixed permutation, so a few small blocks mix every
input dimension.

Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR
2024. Each block is the Cayley transform of a skew-symmetric matrix that starts at zero (and
the output scale at one), so the adapted encoder equals the frozen one at init; it folds into
the weights on merge. Layers: Linear and Conv2d whose rotated width (input features, or
channels x kernel area) the butterfly structure divides.
"""

from __future__ import annotations

from ..config.methods import BOFTSettings
from .base import METHODS
from .oft import input_width
from .peft_tuner import PeftTuner


@METHODS.register("boft")
class BOFT(PeftTuner):
    """BOFT: orthogonal fine-tuning with a butterfly-factorised rotation."""

    Settings = BOFTSettings
    layer_kinds = "Linear and square-kernel Conv2d layers whose rotated width block_size x 2^(butterfly_factor-1) divides"
    dropout_modules = ("boft_dropout",)
    default_lr = 1e-3
    paper = "Liu et al. 2024, arXiv:2311.06243"

    def adapts(self, module):
        width = input_width(module)
        b, extra = self.settings.block_size, self.settings.butterfly_factor - 1
        if width is None or width % (b * 2**extra):
            return False
        # more than one factor: blocks of even size, an even number of them (peft's layout)
        return extra == 0 or (b % 2 == 0 and (width // b) % 2 == 0)

    def peft_config(self, targets):
        from peft import BOFTConfig

        s = self.settings
        return BOFTConfig(boft_block_size=s.block_size, boft_block_num=0, boft_n_butterfly_factor=s.butterfly_factor,
                          boft_dropout=s.dropout, target_modules=targets, bias="none")

    def stored_settings(self):
        return {"boft_block_size": ("block size", self.settings.block_size)}
