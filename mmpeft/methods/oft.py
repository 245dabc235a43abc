"""OFT through peft: each adapted layer's input is rotated by a learned block-diagonal
orthogonal matrix, which keeps the angles between its neurons (hyperspherical energy).

Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023.
The rotation is the Cayley transform of a skew-symmetric matrix that starts at zero, so the
adapted encoder equals the frozen one at init; it folds into the weights on merge.

Layers: Linear, and 1x1 Conv2d (our CNNs' pointwise convolutions), whose input width the
block size divides. Wider convolution kernels are left out: peft 0.21 rotates unfolded
patches and folds them back by summing the overlaps, so with a kernel larger than 1x1 the
output is not the base's even at init (a 3x3 convolution differed by 6.2 at init here).
"""

from __future__ import annotations

from torch import nn

from ..config.methods import OFTSettings
from .base import METHODS
from .peft_tuner import PeftTuner


def input_width(module: nn.Module) -> int | None:
    """The width an orthogonal method rotates: a Linear's input features, a Conv2d's
    ``in_channels x kernel area`` (None for other layers, or for grouped convolutions)."""
    if isinstance(module, nn.Linear):  # peft's OFT / BOFT wrap nn.Linear, not transformers' Conv1D
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw if kh == kw else None
    return None


@METHODS.register("oft")
class OFT(PeftTuner):
    """OFT: a learned block-diagonal orthogonal rotation of each layer's input."""

    Settings = OFTSettings
    layer_kinds = "Linear and 1x1 Conv2d layers whose input width block_size divides"
    dropout_modules = ("oft_dropout",)
    default_lr = 1e-3
    paper = "Qiu et al. 2023, arXiv:2306.07280"

    def adapts(self, module):
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            return False
        width = input_width(module)
        return width is not None and width % self.settings.block_size == 0

    def peft_config(self, targets):
        from peft import OFTConfig

        s = self.settings
        return OFTConfig(r=0, oft_block_size=s.block_size, coft=s.coft, eps=s.eps, block_share=s.block_share,
                         module_dropout=s.module_dropout, target_modules=targets, bias="none")

    def stored_settings(self):
        return {"oft_block_size": ("block size", self.settings.block_size)}
