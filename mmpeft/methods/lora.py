"""LoRA (and its DoRA / rsLoRA variants) through Hugging Face peft.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
rsLoRA: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.

``B`` starts at zero so the adapted encoder equals the frozen one at init. Saved in
peft's own layout (``adapter_config.json`` + ``adapter_model.safetensors``) so that
``peft.PeftModel.from_pretrained(base_encoder, path)`` loads it.
"""

from __future__ import annotations

from ..config.methods import LoraSettings
from .base import METHODS
from .peft_tuner import PeftTuner, check_rank


@METHODS.register("lora")
class LoRA(PeftTuner):
    """LoRA (and its DoRA / rsLoRA variants) through Hugging Face peft: a low-rank update ``B @ A``."""

    Settings = LoraSettings
    paper = "Hu et al. 2022, arXiv:2106.09685 (DoRA: arXiv:2402.09353, rsLoRA: arXiv:2312.03732)"
    dropout_modules = ("lora_dropout",)

    def peft_config(self, targets):
        from peft import LoraConfig

        s = self.settings
        return LoraConfig(
            r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
            use_dora=s.use_dora, use_rslora=s.use_rslora, bias="none",
        )

    def check_config(self, cfg, cfg_path) -> None:
        check_rank(cfg, cfg_path, self.settings.rank)
