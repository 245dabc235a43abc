"""Find the layers a LoRA-style method adapts, by peft's matching rules.

The defaults per architecture live in :mod:`mmpeft.encoders.architectures`.
"""

from __future__ import annotations

import re

from torch import nn

def _adaptable() -> tuple:
    try:  # GPT-2-style decoders keep their projections in transformers' Conv1D (a transposed Linear), which peft adapts
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)
    return (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding, Conv1D)


_ADAPTABLE = _adaptable()


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
