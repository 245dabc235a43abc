"""LoRA (and its DoRA / rsLoRA variants, PiSSA / OLoRA initialisations) through Hugging Face peft.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
rsLoRA: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
PiSSA: Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models", NeurIPS 2024. OLoRA: Büyükakyüz, "OLoRA: Orthonormal Low-Rank
Adaptation of Large Language Models", 2024.

By default ``B`` starts at zero, so the adapted encoder equals the frozen one at init. PiSSA
(the weight's top-r singular triplets) and OLoRA (its first r QR factors) start ``A`` and
``B`` from the weight and subtract ``B A`` from it: the model still equals its base at init
(up to rounding), but the base weights differ. Those residuals depend only on the base and
the settings, so a bundle rebuilds them from the pristine base (its fingerprint checked
first) and keeps the trained ``A``, ``B`` (``lora_trained.safetensors``, what checkpoints and
our loading read). For everyone else it also stores the update relative to the *original*
base, as peft converts PiSSA / OLoRA adapters: rank 2r, ``A' = [A; A0]``, ``B' = [B, -B0]``,
so plain peft on the plain base gives the same model and merging needs nothing else.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config.methods import LoraSettings
from ..files import read_safetensors
from .base import METHODS
from .peft_tuner import PeftTuner, is_linear

TRAINED = "lora_trained.safetensors"


@METHODS.register("lora")
class LoRA(PeftTuner):
    """LoRA (and its DoRA / rsLoRA variants) through Hugging Face peft: a low-rank update `B @ A`."""

    Settings = LoraSettings
    paper = ("Hu et al. 2022, arXiv:2106.09685 (DoRA: arXiv:2402.09353, rsLoRA: arXiv:2312.03732, "
             "PiSSA: arXiv:2404.02948, OLoRA: arXiv:2406.01775)")
    dropout_modules = ("lora_dropout",)
    layer_kinds = "Linear and convolution layers (init: pissa / olora: unquantized Linear layers)"

    @property
    def moves_base(self) -> bool:
        """True when the init moves part of each adapted weight into ``A``, ``B`` (PiSSA, OLoRA)."""
        return self.settings.init != "default"

    def adapts(self, module):
        # the SVD / QR inits are defined on plain matrices: not on convolutions, nor on 4/8-bit
        # weights (bitsandbytes' layers subclass nn.Linear)
        if not self.moves_base:
            return True
        weight = getattr(module, "weight", None)
        return is_linear(module) and weight is not None and weight.dtype.is_floating_point and \
            getattr(weight, "quant_state", None) is None

    def peft_config(self, targets):
        from peft import LoraConfig

        s = self.settings
        return LoraConfig(
            r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
            use_dora=s.use_dora, use_rslora=s.use_rslora, bias="none",
            init_lora_weights=True if s.init == "default" else s.init,
        )

    def apply(self, encoder) -> None:
        super().apply(encoder)
        # the starting A0, B0: what the update relative to the original base subtracts
        self.initial = {n: t.clone() for n, t in self._lora_state(encoder).items()} if self.moves_base else {}

    @staticmethod
    def _lora_state(encoder) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {n: t.detach().cpu().contiguous() for n, t in get_peft_model_state_dict(encoder.model).items()}

    def save(self, encoder, directory: Path) -> list[str]:
        written = super().save(encoder, directory)
        if not self.moves_base:
            return written
        trained = self._lora_state(encoder)
        save_file(trained, str(directory / TRAINED))
        save_file(self._against_original_base(trained), str(directory / "adapter_model.safetensors"))
        s = self.settings
        # twice the rank at the same scale: alpha / r (rsLoRA: alpha / sqrt(r)) must not change
        alpha = 2 * s.alpha if not s.use_rslora else math.sqrt(2) * s.alpha
        cfg = replace(encoder.model.peft_config["default"], r=2 * s.rank, lora_alpha=alpha, init_lora_weights=True)
        cfg.save_pretrained(str(directory))
        return written + [TRAINED]

    def _against_original_base(self, trained: dict) -> dict:
        out = {}
        for name, tensor in trained.items():
            start = self.initial[name]
            if ".lora_A." in name:
                out[name] = torch.cat([tensor, start], 0).contiguous()
            elif ".lora_B." in name:
                out[name] = torch.cat([tensor, -start], 1).contiguous()
            else:
                out[name] = tensor
        return out

    def stored_settings(self):
        return {"r": ("rank", self.settings.rank * (2 if self.moves_base else 1))}  # PiSSA / OLoRA store 2r

    def load(self, encoder, directory: Path) -> None:
        if not self.moves_base:
            return super().load(encoder, directory)
        from peft import set_peft_model_state_dict

        self.read_config(directory)
        # the residual base was rebuilt from the pristine base by apply(); the trained A, B go on it
        set_peft_model_state_dict(encoder.model, read_safetensors(directory / TRAINED, self._lora_state(encoder)))
