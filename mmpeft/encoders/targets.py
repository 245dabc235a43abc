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


def name_matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex on the full name, a list matches a name equal to an
    entry or ending in ``.entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def match_targets(model: nn.Module, targets: str | list[str], kinds: tuple = _ADAPTABLE) -> list[str]:
    """Full names of the modules of ``kinds`` (by default the layers a LoRA-style method can
    adapt) that ``targets`` matches by peft's rules (:func:`name_matches`)."""
    return [name for name, mod in model.named_modules() if name and isinstance(mod, kinds) and name_matches(name, targets)]
