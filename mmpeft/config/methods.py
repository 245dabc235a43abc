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

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

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
    #: True when the method runs on a 4/8-bit bitsandbytes base (implies keeps_base_frozen).
    quantized_base: ClassVar[bool] = True
    #: True when the method adapts a generate task's decoder too (prompts and bottleneck
    #: adapters hook into encoders only).
    for_decoder: ClassVar[bool] = True

    def quantized_conflict(self) -> str | None:
        """Why these settings (beyond the method's flag) cannot run on a 4/8-bit base; None: they can."""
        return None

    @field_validator(*REGEX_SETTINGS, check_fields=False)
    @classmethod
    def _regex_compiles(cls, value):
        return _compiles(value)


METHOD_SETTINGS: Registry[type[MethodSettings]] = Registry("PEFT method")


def quantized_problem(where: str, method: str, parsed: MethodSettings, decoder: bool = False) -> str | None:
    """The recipe problem of a quantized base (a decoder's, with ``decoder``) under ``method``
    with settings ``parsed``; None when they run on one."""
    if parsed.quantized_base:
        conflict = parsed.quantized_conflict()
        return f"{where}: {conflict}" if conflict else None
    ok = [n for n in METHOD_SETTINGS.names() if METHOD_SETTINGS.get(n).quantized_base
          and (METHOD_SETTINGS.get(n).for_decoder or not decoder)]
    why = ("trains the base weights, which cannot be done on" if not METHOD_SETTINGS.get(method).keeps_base_frozen
           else "does not run on")
    return (f"{where}: method {method!r} {why} a 4/8-bit quantized base; remove the quantization or choose "
            f"{', '.join(ok[:-1])} or {ok[-1]}")


@METHOD_SETTINGS.register("none")
class NoneSettings(MethodSettings):
    """Linear probing: nothing to set."""


@METHOD_SETTINGS.register("full")
class FullSettings(MethodSettings):
    """Full fine-tuning: nothing to set."""

    keeps_base_frozen = False
    quantized_base = False


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
    init: Literal["default", "pissa", "olora"] = Field(
        "default", description="default: B = 0; pissa: A, B from the weight's top singular vectors; olora: from its QR "
                               "factors (both move that part out of the base weight, Linear layers only)")

    def quantized_conflict(self):
        if self.init != "default":
            return (f"init: {self.init} rewrites the base weights, which a 4/8-bit base cannot hold exactly; "
                    "remove the quantization or use init: default")
        return None

    @model_validator(mode="after")
    def _init_combinations(self):
        if self.init != "default" and self.use_dora:
            raise ValueError(f"init: {self.init} and use_dora cannot be combined; pick one")
        return self


@METHOD_SETTINGS.register("ia3")
class IA3Settings(MethodSettings):
    target_modules: Optional[Union[list[str], str]] = Field(None, description="layers to rescale; default per architecture")
    feedforward_modules: Optional[Union[list[str], str]] = Field(None, description="subset rescaled at the input (FFN); default per architecture")


@METHOD_SETTINGS.register("adapter")
class AdapterSettings(MethodSettings):
    for_decoder: ClassVar[bool] = False

    placement: Literal["houlsby", "pfeiffer"] = Field("houlsby", description="houlsby: after attention and FFN; pfeiffer: after FFN only")
    reduction_factor: PositiveInt = Field(16, le=65536, description="bottleneck = hidden size / reduction_factor")
    bottleneck_size: Optional[PositiveInt] = Field(None, le=65536, description="explicit bottleneck width (overrides reduction_factor)")
    activation: Literal["relu", "gelu", "tanh", "swish"] = Field("relu", description="non-linearity inside the bottleneck")
    layers: Optional[list[int]] = Field(None, description="layer/block indices that get adapters (default: all)")
    attention_modules: Optional[str] = Field(None, description="regex of attention-output layers (default per architecture)")
    ffn_modules: Optional[str] = Field(None, description="regex of feed-forward-output layers / CNN blocks (default per architecture)")


@METHOD_SETTINGS.register("prompt")
class PromptSettings(MethodSettings):
    for_decoder: ClassVar[bool] = False

    num_tokens: PositiveInt = Field(10, le=4096, description="soft-prompt / visual-prompt tokens")
    deep: bool = Field(False, description="ViT: fresh prompt tokens at every layer (VPT-deep)")
    pad_size: Optional[PositiveInt] = Field(None, le=4096, description="CNN: border width in pixels (default: 30/224 of the image size)")


def _targets():
    return Field(None, description="module names (list) or a regex; default per architecture")


@METHOD_SETTINGS.register("vera")
class VeraSettings(MethodSettings):
    rank: PositiveInt = Field(256, le=8192, description="rank of the shared frozen random matrices A and B")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the VeRA input")
    d_initial: float = Field(0.1, gt=0.0, description="initial value of the trained vector d (b starts at zero)")
    projection_seed: int = Field(0, ge=0, description="seed of the shared random matrices (stored in the bundle too)")
    target_modules: Optional[Union[list[str], str]] = _targets()


class LycorisSettings(MethodSettings):
    """What LoHa and LoKr share (not a method of its own)."""

    # peft's LyCORIS layers read the base weight's shape, which bitsandbytes packs
    quantized_base: ClassVar[bool] = False

    rank: PositiveInt = Field(8, le=4096, description="rank of the low-rank factors")
    alpha: PositiveFloat = Field(8.0, description="scaling numerator: update is scaled by alpha / r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the update's rank dimension")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of skipping a layer's update in training")
    use_effective_conv2d: bool = Field(False, description="Conv2d (kernel > 1): decompose as in FedPara's proposition 3")
    target_modules: Optional[Union[list[str], str]] = _targets()


@METHOD_SETTINGS.register("loha")
class LoHaSettings(LycorisSettings):
    """LoHa: the rank of each of the two low-rank pairs."""


@METHOD_SETTINGS.register("lokr")
class LoKrSettings(LycorisSettings):
    """LoKr: the rank of the decomposed Kronecker factor."""

    decompose_both: bool = Field(False, description="decompose the first Kronecker factor too")
    decompose_factor: int = Field(-1, ge=-1, description="size of the first factor's dimensions (-1: as square as possible)")


@METHOD_SETTINGS.register("oft")
class OFTSettings(MethodSettings):
    block_size: PositiveInt = Field(32, le=4096, description="size of each orthogonal block; layers whose input width it does not divide are left out")
    coft: bool = Field(False, description="constrained OFT: keep the rotation within eps of the identity")
    eps: PositiveFloat = Field(6e-5, description="COFT's constraint radius")
    block_share: bool = Field(False, description="one block shared by every block position of a layer")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="multiplicative dropout on the blocks")
    target_modules: Optional[Union[list[str], str]] = _targets()


@METHOD_SETTINGS.register("boft")
class BOFTSettings(MethodSettings):
    block_size: PositiveInt = Field(4, le=4096, description="size of each butterfly block; layers whose input width it does not divide are left out")
    butterfly_factor: PositiveInt = Field(1, le=16, description="number of butterfly factors (1: block-diagonal, as OFT)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="multiplicative dropout on the blocks")
    target_modules: Optional[Union[list[str], str]] = _targets()


@METHOD_SETTINGS.register("ln_tuning")
class LNTuningSettings(MethodSettings):
    target_modules: Optional[Union[list[str], str]] = Field(
        None, description="normalisation layers to tune (names or a regex); default every LayerNorm / RMSNorm")
