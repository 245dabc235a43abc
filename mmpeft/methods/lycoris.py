"""What LoHa and LoKr share: peft's LyCORIS layers (Yeh et al., "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024) wrap Linear and
convolution layers, and apply rank and module dropout only while they are in training mode.
"""

from __future__ import annotations

from torch import nn

from .peft_tuner import PeftTuner


class LycorisTuner(PeftTuner):
    """A peft LyCORIS tuner: Linear and Conv1d / Conv2d layers, dropout inside each layer."""

    layer_kinds = "Linear and Conv1d / Conv2d layers"

    def adapts(self, module):
        return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d))

    def train_modules(self, encoder):
        # the adapted layers themselves: their base is a plain Linear / convolution, with
        # nothing that trains differently
        from peft.tuners.lycoris_utils import LycorisLayer

        return [m for m in encoder.model.modules() if isinstance(m, LycorisLayer)]
