"""What mmpeft knows about each model family, in one table.

Module names differ by family (transformers 5: BERT ``query``/``value``, ViT and CLIP
``q_proj``/``v_proj``), and so do where adapters go, where prompts go, how the output is
pooled and whether gradient checkpointing works. The methods, the encoders and the dry
run read this table; a recipe overrides any default (``target_modules``,
``attention_modules``, ...). A new architecture is one :class:`Architecture` row in
:data:`TABLE`, listed under every ``model_type`` it covers.

Defaults follow the methods' papers: LoRA on the query and value projections (Hu et al.
2021), on the pointwise (1x1) convolutions for CNNs; IA3 rescales keys, values and the
feed-forward input (Liu et al. 2022); Houlsby adapters after the attention output and
the feed-forward output (Houlsby et al. 2019); residual adapters after each CNN block
(Rebuffi et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

Targets = Union[list[str], str]  # module names (a name or a ``.suffix`` of one), or one regex over full names


@dataclass(frozen=True)
class Architecture:
    """One model family.

    Attributes:
        modality: what it reads ("text", "image", "audio"); None: decided from the model's config.
        lora: default LoRA / DoRA targets.
        ia3: default IA3 ``(targets, feedforward subset)``; None: IA3 falls back to the LoRA
            targets with no feed-forward subset.
        adapter_attention, adapter_ffn: regexes of the attention-output and feed-forward-output
            layers that get bottleneck adapters.
        cnn_blocks: regex of CNN blocks that get a residual 1x1-convolution adapter after them
            (set for CNNs instead of the two above).
        prompt: "soft" (prepended to text embeddings), "vpt" (visual prompt tokens after the
            patch embedding), "border" (a learned pixel border, for CNNs) or "none" (prompt
            tuning is not available for the family).
        prompt_offset: where VPT tokens are inserted (1: after [CLS]).
        pooling: what ``pooling: auto`` means: "mean" (over real tokens), "cls" (first token)
            or "pooler" (the model's own pooled output).
        checkpointing: whether gradient checkpointing works; None: ask the model.
        text_input: "padded" (to the batch's longest text, with the attention mask) or "fixed"
            (every text padded to the model's position count and read without a mask, as
            SigLIP's text tower was trained: it pools the last position).
    """

    modality: Optional[str] = None
    lora: Optional[Targets] = None
    ia3: Optional[tuple[Targets, Targets]] = None
    adapter_attention: Optional[str] = None
    adapter_ffn: Optional[str] = None
    cnn_blocks: Optional[str] = None
    prompt: Literal["soft", "vpt", "border", "none"] = "soft"
    prompt_offset: int = 0
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    checkpointing: Optional[bool] = None
    text_input: Literal["padded", "fixed"] = "padded"


_QV = ["q_proj", "v_proj"]
_VIT_IA3 = (["k_proj", "v_proj", "fc2"], ["fc2"])

# BERT-style encoders. The IA3 regexes keep BERT's attention output projection
# (attention.output.dense) out of the feed-forward set: IA3 rescales the FFN's
# intermediate activation, i.e. the input of the layer's output.dense.
BERT = Architecture(
    modality="text", lora=["query", "value"],
    ia3=(r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    adapter_attention=r".*\.attention\.output\.dense", adapter_ffn=r".*\.layer\.\d+\.output\.dense",
)
VIT = Architecture(
    modality="image", lora=_QV, ia3=_VIT_IA3, adapter_attention=r".*\.attention\.o_proj", adapter_ffn=r".*\.mlp\.fc2",
    prompt="vpt", prompt_offset=1, pooling="cls",
)
CLIP_VISION = Architecture(
    modality="image", lora=_QV, ia3=_VIT_IA3, adapter_attention=r".*\.self_attn\.out_proj", adapter_ffn=r".*\.mlp\.fc2",
    prompt="vpt", prompt_offset=1, pooling="pooler",
)

TABLE: dict[str, Architecture] = {
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "electra": BERT,
    "distilbert": Architecture(modality="text", lora=["q_lin", "v_lin"]),
    "deberta-v2": Architecture(modality="text", lora=["query_proj", "value_proj"]),
    "vit": VIT,
    "deit": VIT,
    "dinov2": Architecture(modality="image", lora=_QV, ia3=_VIT_IA3, prompt="vpt", prompt_offset=1, pooling="cls"),
    "clip_vision_model": CLIP_VISION,
    # CLIP's text tower pools its end-of-text token (found from the input ids): no soft prompts
    "clip_text_model": Architecture(modality="text", lora=_QV, ia3=_VIT_IA3, adapter_attention=CLIP_VISION.adapter_attention,
                                    adapter_ffn=CLIP_VISION.adapter_ffn, prompt="none", pooling="pooler"),
    # SigLIP's text tower pools its last position through a linear head, on texts padded to its
    # fixed length; no soft prompts (they would push the text off its positions)
    "siglip_text_model": Architecture(modality="text", lora=_QV, ia3=_VIT_IA3, adapter_attention=CLIP_VISION.adapter_attention,
                                      adapter_ffn=CLIP_VISION.adapter_ffn, prompt="none", pooling="pooler", text_input="fixed"),
    # SigLIP has no [CLS] token: its prompts go first, its output is the attention-pooled head
    "siglip_vision_model": Architecture(
        modality="image", lora=_QV, ia3=_VIT_IA3, adapter_attention=CLIP_VISION.adapter_attention,
        adapter_ffn=CLIP_VISION.adapter_ffn, prompt="vpt", prompt_offset=0, pooling="pooler"),
    "convnext": Architecture(modality="image", lora=["pwconv1", "pwconv2"], ia3=(["pwconv1", "pwconv2"], ["pwconv2"]),
                             prompt="border", pooling="pooler"),
    "resnet": Architecture(modality="image", lora=["convolution"], ia3=(["convolution"], []),
                           cnn_blocks=r".*stages\.\d+\.layers\.\d+", prompt="border", pooling="pooler", checkpointing=False),
    "efficientnet_lite": Architecture(
        modality="image", lora=["_expand_conv", "_project_conv", "_conv_head"], ia3=(["_expand_conv", "_project_conv"], ["_project_conv"]),
        cnn_blocks=r"net\._blocks\.\d+", prompt="border", pooling="mean", checkpointing=True),
}
# transformers audio models (encoders/hf_audio.py). Waveform models and Whisper's encoder take
# no prompts here (their attention masks are derived from the input length); AST is a ViT
# over filter-bank patches with two leading tokens ([CLS], distillation).
WAV2VEC2 = Architecture(
    modality="audio", lora=_QV, ia3=(["k_proj", "v_proj", "output_dense"], ["output_dense"]),
    adapter_attention=r".*\.attention\.out_proj", adapter_ffn=r".*\.feed_forward\.output_dense", prompt="none", pooling="mean")
TABLE.update({
    "wav2vec2": WAV2VEC2, "hubert": WAV2VEC2, "wavlm": WAV2VEC2,
    "whisper": Architecture(modality="audio", lora=_QV, ia3=(["k_proj", "v_proj", "fc2"], ["fc2"]),
                            adapter_attention=r".*\.self_attn\.out_proj", adapter_ffn=r".*\.fc2", prompt="none", pooling="mean"),
    "audio-spectrogram-transformer": replace(VIT, modality="audio", prompt_offset=2, pooling="pooler"),
    # CLAP's audio tower (Wu et al. 2023): HTSAT, a Swin transformer over the log-mel image,
    # BERT-style module names inside its windowed blocks; pooled by its own head; transformers
    # cannot checkpoint it
    "clap_audio_model": Architecture(
        modality="audio", lora=["query", "value"],
        ia3=(r".*\.attention\.self\.(key|value)|.*\.blocks\.\d+\.output\.dense", r".*\.blocks\.\d+\.output\.dense"),
        adapter_attention=r".*\.attention\.output\.dense", adapter_ffn=r".*\.blocks\.\d+\.output\.dense",
        prompt="none", pooling="pooler", checkpointing=False),
})
# The same CNN reading log-mel spectrograms (encoders/audio.py): every default carries over.
TABLE["efficientnet_lite_audio"] = replace(TABLE["efficientnet_lite"], modality="audio")
# Full dual-encoder checkpoints: mmpeft keeps the image tower, or the text tower of one read
# with ``modality: text`` (see HFImageEncoder, HFTextEncoder); the value is the default.
DUAL_ENCODERS = {"clip": "image", "siglip": "image", "clap": "audio"}

UNKNOWN = Architecture()


def architecture(arch: str) -> Architecture:
    """The table row for a ``model_type`` (or mmpeft's own arch name); an empty row for
    architectures the table does not know (every default then has to come from the recipe)."""
    return TABLE.get(arch, UNKNOWN)


def known(arch: str) -> bool:
    return arch in TABLE
