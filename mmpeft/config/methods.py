"""Recipe settings of every PEFT method: ``encoders.<name>.peft``.

They live here, in the config layer, and not beside each method's code, so that a recipe
is validated without importing torch (``mmpeft validate`` answers in a fraction of a
second). Each class is registered under the method's name; the method's implementation
(``mmpeft/methods/<name>.py``) registers under the same name and points at it. A test
checks that the two registries agree.

``keeps_base_frozen`` is declared here because the recipe check needs it (a quantized
base can only carry a method that leaves the base weights alone); the method classes
inherit it from their settings.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from ..registry import Registry

# Settings that are a regex over module names when given as a string: checked here, so a bad
# pattern is a recipe error at validate time and not a failure when the model is built.
REGEX_SETTINGS = ("target_modules", "feedforward_modules", "attention_modules", "ffn_modules")


def _compiles(value):
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
    return value


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: True when the base weights stay frozen (so the base may be quantized).
    keeps_base_frozen: ClassVar[bool] = True

    @field_validator(*REGEX_SETTINGS, check_fields=False)
    @classmethod
    def _regex_compiles(cls, value):
        return _compiles(value)


METHOD_SETTINGS: Registry[type[MethodSettings]] = Registry("PEFT method")


@METHOD_SETTINGS.register("none")
class NoneSettings(MethodSettings):
    """Linear probing: nothing to set."""


@METHOD_SETTINGS.register("full")
class FullSettings(MethodSettings):
    """Full fine-tuning: nothing to set."""

    keeps_base_frozen = False


@METHOD_SETTINGS.register("bitfit")
class BitFitSettings(MethodSettings):
    """BitFit: nothing to set."""


@METHOD_SETTINGS.register("lora")
class LoraSettings(MethodSettings):
    rank: PositiveInt = Field(8, le=4096, description="rank r of the update B @ A")
    alpha: PositiveFloat = Field(16.0, description="scaling numerator: update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: Optional[Union[list[str], str]] = Field(None, description="module names (list) or a regex; default per architecture")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude vector too")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r)")


@METHOD_SETTINGS.register("ia3")
class IA3Settings(MethodSettings):
    target_modules: Optional[Union[list[str], str]] = Field(None, description="layers to rescale; default per architecture")
    feedforward_modules: Optional[Union[list[str], str]] = Field(None, description="subset rescaled at the input (FFN); default per architecture")


@METHOD_SETTINGS.register("adapter")
class AdapterSettings(MethodSettings):
    placement: Literal["houlsby", "pfeiffer"] = Field("houlsby", description="houlsby: after attention and FFN; pfeiffer: after FFN only")
    reduction_factor: PositiveInt = Field(16, le=65536, description="bottleneck = hidden size / reduction_factor")
    bottleneck_size: Optional[PositiveInt] = Field(None, le=65536, description="explicit bottleneck width (overrides reduction_factor)")
    activation: Literal["relu", "gelu", "tanh", "swish"] = Field("relu", description="non-linearity inside the bottleneck")
    layers: Optional[list[int]] = Field(None, description="layer/block indices that get adapters (default: all)")
    attention_modules: Optional[str] = Field(None, description="regex of attention-output layers (default per architecture)")
    ffn_modules: Optional[str] = Field(None, description="regex of feed-forward-output layers / CNN blocks (default per architecture)")


@METHOD_SETTINGS.register("prompt")
class PromptSettings(MethodSettings):
    num_tokens: PositiveInt = Field(10, le=4096, description="soft-prompt / visual-prompt tokens")
    deep: bool = Field(False, description="ViT: fresh prompt tokens at every layer (VPT-deep)")
    pad_size: Optional[PositiveInt] = Field(None, le=4096, description="CNN: border width in pixels (default: 30/224 of the image size)")
