"""Recipe settings of every fusion head: the ``fusion:`` block.

Torch-free for the same reason as :mod:`mmpeft.config.methods`; each head's
implementation (``mmpeft/fusion/``) registers under the same name and points at its class
here. Settings that name modalities are checked against the recipe's encoders when the
recipe is loaded (:meth:`FusionSettings.modality_problems`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ..registry import Registry


class FusionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: PositiveInt = Field(256, le=65536, description="width of the fused representation")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside the head")

    def modality_problems(self, encoders: list[str]) -> list[str]:
        """Settings that name modalities are checked against the recipe's encoders when
        the recipe is loaded (so a typo is a recipe error, not a failure mid-build)."""
        return []


FUSION_SETTINGS: Registry[type[FusionSettings]] = Registry("fusion head")
FUSION_SETTINGS.register("concat")(FusionSettings)


@FUSION_SETTINGS.register("gated")
class GatedSettings(FusionSettings):
    gate_input: Literal["inputs", "projections"] = Field(
        "inputs", description="what the gates see: the normalised encoder outputs (the paper) or the tanh projections "
        "(N*hidden wide: far fewer parameters when an encoder's output is wide)")


@FUSION_SETTINGS.register("hadamard")
class HadamardSettings(FusionSettings):
    attend: list[str] = Field(
        default_factory=list, description="modalities whose tokens are pooled by attention guided by the other "
        "modalities (MLB's attention model, e.g. [image]); empty: every modality uses its pooled vector")
    glimpses: int = Field(1, ge=1, le=4, description="attention maps per attended modality; the fused glimpses are "
                          "concatenated, so the classifier grows to glimpses*hidden_size")

    def modality_problems(self, encoders: list[str]) -> list[str]:
        problems = [f"fusion.attend: {m!r} is not an encoder of this recipe (have: {', '.join(encoders)})"
                    for m in self.attend if m not in encoders]
        if not problems and self.attend and len(set(self.attend)) >= len(encoders):
            problems.append("fusion.attend: at least one modality must stay pooled to guide the attention; "
                            "list fewer modalities")
        return problems


@FUSION_SETTINGS.register("transformer")
class AttentionSettings(FusionSettings):
    num_layers: PositiveInt = Field(1, le=64, description="attention layers")
    num_heads: PositiveInt = Field(4, le=1024, description="attention heads (must divide hidden_size)")


@FUSION_SETTINGS.register("cross_attention")
class CrossAttentionSettings(AttentionSettings):
    query: str = Field("text", description="modality whose tokens attend to the others")
    bidirectional: bool = Field(False, description="also let the other modalities attend to the query modality")

    def modality_problems(self, encoders: list[str]) -> list[str]:
        if self.query not in encoders:
            return [f"fusion.query: {self.query!r} is not an encoder of this recipe (have: {', '.join(encoders)})"]
        return []
