"""IA3 through peft: learned vectors that rescale keys, values and feed-forward activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (T-Few / IA3), NeurIPS 2022. Vectors start at one, so the
adapted encoder equals the frozen one at init; they fold into the weights on merge.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import Field

from ..encoders.targets import match_targets
from ..errors import MMPeftError
from .base import METHODS, MethodSettings
from .lora import LoRA, load_peft_weights, resolve_targets

# Regexes keep BERT's attention output projection (attention.output.dense) out of the
# feed-forward set: IA3 rescales the FFN's intermediate activation, i.e. the input of output.dense.
_BERT = (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")


class IA3Settings(MethodSettings):
    target_modules: Optional[Union[list[str], str]] = Field(None, description="layers to rescale; default per architecture")
    feedforward_modules: Optional[Union[list[str], str]] = Field(None, description="subset rescaled at the input (FFN); default per architecture")


@METHODS.register("ia3")
class IA3(LoRA):
    Settings = IA3Settings
    mergeable = True
    paper = "Liu et al. 2022, arXiv:2205.05638"

    def _targets(self, encoder):
        s = self.settings
        if s.target_modules is None and encoder.arch in ("bert", "roberta", "xlm-roberta", "electra"):
            targets, ff = _BERT
        else:
            from ..encoders.targets import default_targets

            default = default_targets(encoder.arch, "ia3")
            targets = s.target_modules or (default[0] if default else None)
            ff = s.feedforward_modules if s.feedforward_modules is not None else (default[1] if default and not s.target_modules else [])
        targets, matched = resolve_targets(self, encoder, targets, kind="lora")
        ff_matched = set(match_targets(encoder.model, ff)) if ff else set()
        if not ff_matched <= set(matched):
            raise MMPeftError(f"{self.where}.feedforward_modules must be a subset of target_modules")
        return targets, (ff or []), matched

    def apply(self, encoder) -> None:
        from peft import IA3Config, get_peft_model

        targets, ff, matched = self._targets(encoder)
        encoder.model = get_peft_model(encoder.model, IA3Config(target_modules=targets, feedforward_modules=ff))
        self.touched = matched

    def train_modules(self, encoder):
        return []

    def load(self, encoder, directory) -> None:
        load_peft_weights(encoder, directory)
