"""IA3 through peft: learned vectors that rescale keys, values and feed-forward activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (T-Few / IA3), NeurIPS 2022. Vectors start at one, so the
adapted encoder equals the frozen one at init; they fold into the weights on merge.
"""

from __future__ import annotations

from ..config.methods import IA3Settings
from ..encoders.targets import match_targets
from ..errors import RecipeError
from .base import METHODS
from .peft_tuner import PeftTuner, resolve_targets


@METHODS.register("ia3")
class IA3(PeftTuner):
    """IA3 through peft: learned vectors that rescale keys, values and feed-forward activations."""

    Settings = IA3Settings
    default_lr = 3e-3  # the T-Few paper's learning rate for IA3
    paper = "Liu et al. 2022, arXiv:2205.05638"

    def _targets(self, encoder):
        """The recipe's targets, else the architecture's IA3 default (an architecture with
        none falls back to its LoRA targets, with no feed-forward subset)."""
        s = self.settings
        default = encoder.family.ia3
        targets = s.target_modules or (default[0] if default else None)
        ff = s.feedforward_modules if s.feedforward_modules is not None else (default[1] if default and not s.target_modules else [])
        targets, matched = resolve_targets(self, encoder, targets)
        ff_matched = set(match_targets(encoder.model, ff)) if ff else set()
        if not ff_matched <= set(matched):
            raise RecipeError([f"{self.where}.feedforward_modules: must be a subset of target_modules"])
        return targets, (ff or []), matched

    def unavailable(self, encoder):
        return None  # every layer its targets match is one IA3 rescales

    def apply(self, encoder) -> None:
        from peft import IA3Config, get_peft_model

        targets, ff, matched = self._targets(encoder)
        encoder.model = get_peft_model(encoder.model, IA3Config(target_modules=targets, feedforward_modules=ff))
        self.touched = matched
