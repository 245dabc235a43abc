"""LoRA (and its DoRA / rsLoRA variants) through Hugging Face peft.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
rsLoRA: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.

``B`` starts at zero so the adapted encoder equals the frozen one at init. Saved in
peft's own layout (``adapter_config.json`` + ``adapter_model.safetensors``) so that
``peft.PeftModel.from_pretrained(base_encoder, path)`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.methods import LoraSettings
from ..encoders.targets import leaf_names, match_targets
from ..errors import BundleError, RecipeError
from ..files import read_safetensors
from .base import METHODS, PeftMethod


def resolve_targets(method: PeftMethod, encoder, requested):
    """Targets from the recipe or the architecture's LoRA default; an error listing the
    real module names when none is known or none matches."""
    targets = requested or encoder.family.lora
    available = leaf_names(encoder.model)
    if not targets:
        raise RecipeError([
            f"{method.where}.target_modules: no default targets for architecture {encoder.arch!r}; "
            f"set it to some of: {', '.join(available)}"
        ])
    matched = match_targets(encoder.model, targets)
    if not matched:
        raise RecipeError([
            f"{method.where}.target_modules: {targets!r} matches no layer of {encoder.source!r} ({encoder.arch}); "
            f"available module names: {', '.join(available)}"
        ])
    return targets, matched


def load_peft_weights(encoder, directory: Path) -> None:
    """Load ``adapter_model.safetensors`` (read as safetensors, never pickle) into a peft model,
    after checking its tensor names and shapes against what the recipe built."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    state = read_safetensors(directory / "adapter_model.safetensors", get_peft_model_state_dict(encoder.model))
    set_peft_model_state_dict(encoder.model, state)


@METHODS.register("lora")
class LoRA(PeftMethod):
    """LoRA (and its DoRA / rsLoRA variants) through Hugging Face peft: a low-rank update ``B @ A``."""

    Settings = LoraSettings
    mergeable = True
    paper = "Hu et al. 2022, arXiv:2106.09685 (DoRA: arXiv:2402.09353, rsLoRA: arXiv:2312.03732)"

    def peft_config(self, targets):
        from peft import LoraConfig

        s = self.settings
        return LoraConfig(
            r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
            use_dora=s.use_dora, use_rslora=s.use_rslora, bias="none",
        )

    def apply(self, encoder) -> None:
        from peft import get_peft_model

        targets, matched = resolve_targets(self, encoder, self.settings.target_modules)
        encoder.model = get_peft_model(encoder.model, self.peft_config(targets))
        self.touched = matched

    def train_modules(self, encoder):
        # lora_dropout lives inside each LoRA layer: switch those on, keep the base in eval.
        return [m for n, m in encoder.model.named_modules() if n.endswith("lora_dropout")]

    def save(self, encoder, directory: Path) -> list[str]:
        encoder.model.save_pretrained(str(directory), safe_serialization=True)
        card = directory / "README.md"
        if card.exists():  # peft's generic card; the bundle has its own
            card.unlink()
        return ["adapter_config.json", "adapter_model.safetensors"]

    def load(self, encoder, directory: Path) -> None:
        cfg_path = directory / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{cfg_path}: unreadable adapter config ({exc})") from None
        if cfg.get("r") != self.settings.rank:
            raise BundleError(f"{cfg_path}: rank {cfg.get('r')} differs from the recipe's {self.settings.rank}")
        load_peft_weights(encoder, directory)

    def merge(self, encoder) -> bool:
        encoder.model = encoder.model.merge_and_unload()
        return True
