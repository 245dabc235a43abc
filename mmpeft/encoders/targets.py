"""Default PEFT target modules per architecture.

Module names differ by family (transformers 5: BERT ``query``/``value``, ViT and
CLIP ``q_proj``/``v_proj``); recipes override with ``target_modules``.
"""

from __future__ import annotations

import re

from torch import nn

# LoRA/IA3 defaults follow the LoRA paper (Hu et al. 2021): query and value projections;
# for CNNs, the pointwise (1x1) convolutions.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "clip_vision_model": ["q_proj", "v_proj"],
    "siglip_vision_model": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
    "resnet": ["convolution"],
    "efficientnet_lite": ["_expand_conv", "_project_conv", "_conv_head"],
}
# IA3 (Liu et al. 2022) scales keys, values and the feed-forward input.
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "dinov2": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "clip_vision_model": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "siglip_vision_model": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "convnext": (["pwconv1", "pwconv2"], ["pwconv2"]),
    "resnet": (["convolution"], []),
    "efficientnet_lite": (["_expand_conv", "_project_conv"], ["_project_conv"]),
}
_FAMILY = {"roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "deit": "vit"}

_ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)


def default_targets(arch: str, method: str = "lora"):
    if method == "ia3":
        return IA3_TARGETS.get(arch) or IA3_TARGETS.get(_FAMILY.get(arch, ""))
    return LORA_TARGETS.get(arch)


def leaf_names(model: nn.Module) -> list[str]:
    """Short names (last dotted part) of the layers a LoRA-style method can adapt."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, _ADAPTABLE) and name}
    return sorted(names)


def match_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of modules matched with peft's rules: a string is a regex on the
    full name, a list matches a name equal to an entry or ending in ``.entry``."""
    found = []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, _ADAPTABLE):
            continue
        if isinstance(targets, str):
            ok = re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok:
            found.append(name)
    return found
