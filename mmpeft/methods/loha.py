"""LoHa through peft: a low-rank update made of the Hadamard product of two low-rank pairs.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022; as adapted for fine-tuning by LyCORIS (Yeh et al., "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024).
The update ``(B1 A1) * (B2 A2)`` reaches rank r^2 with 2 x LoRA's parameters of rank r. One
factor starts at zero, so the adapted encoder equals the frozen one at init; it folds into
the weights on merge. Linear and convolution layers (our CNN encoders too).
"""

from __future__ import annotations

from ..config.methods import LoHaSettings
from .base import METHODS
from .lycoris import LycorisTuner


@METHODS.register("loha")
class LoHa(LycorisTuner):
    """LoHa: the Hadamard product of two low-rank updates."""

    Settings = LoHaSettings
    paper = "Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS: Yeh et al. 2024, arXiv:2309.14859"

    def peft_config(self, targets):
        from peft import LoHaConfig

        s = self.settings
        return LoHaConfig(r=s.rank, alpha=s.alpha, rank_dropout=s.rank_dropout, module_dropout=s.module_dropout,
                          use_effective_conv2d=s.use_effective_conv2d, target_modules=targets)
