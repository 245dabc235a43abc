"""Prompt tuning, one variant per encoder kind.

- Text: soft prompts prepended to the token embeddings, attention mask extended
  (Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt
  Tuning", EMNLP 2021). Initialised from randomly drawn vocabulary embeddings, as in the paper.
- ViT-style (ViT, DeiT, DINOv2, CLIP/SigLIP towers): visual prompt tuning (Jia et al.,
  "Visual Prompt Tuning", ECCV 2022): ``shallow`` inserts tokens after [CLS] behind the
  patch embedding; ``deep`` replaces them with fresh tokens before every layer.
- CNNs: a learnable pixel-space border added around the image (Bahng et al., "Exploring
  Visual Prompts for Adapting Large-Scale Models", 2022, the "padding" prompt).

Prompt outputs are excluded from pooling and from the tokens given to the fusion head
(Lester and VPT classify from the original tokens / [CLS]). Prompts change attention,
so text and ViT prompt tuning are not the identity at init; the CNN border starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.methods import PromptSettings
from ..errors import RecipeError
from .base import METHODS, PeftMethod


class SoftPrompt(nn.Module):
    """Prepends ``P`` learned embeddings: ``([B,T,D], [B,T]) -> ([B,P+T,D], [B,P+T])``."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.clone())

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor):
        b = embeds.shape[0]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        ones = torch.ones(b, prompt.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat([prompt, embeds], 1), torch.cat([ones, mask], 1)


class BorderPrompt(nn.Module):
    """Adds a learned border of width ``pad`` to ``[B,3,H,W]`` pixels (zero-initialised)."""

    def __init__(self, shape: tuple[int, int], pad: int):
        super().__init__()
        height, width = shape
        self.prompt_border = nn.Parameter(torch.zeros(1, 3, height, width))
        mask = torch.ones(1, 1, height, width)
        mask[..., pad : height - pad, pad : width - pad] = 0
        self.register_buffer("border_mask", mask, persistent=False)

    def forward(self, pixels: torch.Tensor, mask=None):
        return pixels + self.prompt_border * self.border_mask, mask


class VisualPrompts(nn.Module):
    """VPT token sets: one (shallow) or one per layer (deep), ``[P, D]`` each."""

    def __init__(self, num_layers: int, num_tokens: int, dim: int, deep: bool):
        super().__init__()
        # Jia et al. use a uniform Xavier-style init; std 0.02 matches the scale of ViT embeddings.
        self.prompt_tokens = nn.ParameterList(
            nn.Parameter(torch.randn(num_tokens, dim) * 0.02) for _ in range(num_layers if deep else 1)
        )


def _layer_list(model: nn.Module, where: str) -> nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            return module
    raise RecipeError([f"{where}: visual prompt tuning found no transformer layer list in this model"])


@METHODS.register("prompt")
class PromptTuning(PeftMethod):
    """Prompt tuning: soft prompts (text), visual prompt tokens (ViT-style), a learned pixel border (CNNs)."""

    Settings = PromptSettings
    identity_at_init = False
    default_lr = 3e-3
    paper = "Lester et al. 2021 (arXiv:2104.08691); Jia et al. 2022 (arXiv:2203.12119); Bahng et al. 2022 (arXiv:2203.17274)"

    def unavailable(self, encoder):
        if encoder.family.prompt == "none":
            return "their attention masks follow the input length; choose another method, e.g. lora, ia3, adapter or bitfit"
        return None

    def apply(self, encoder) -> None:
        s = self.settings
        for p in encoder.parameters():
            p.requires_grad_(False)
        if encoder.modality == "text":
            table = encoder.base_model().get_input_embeddings().weight
            g = torch.Generator().manual_seed(0)
            rows = torch.randint(0, table.shape[0], (s.num_tokens,), generator=g)
            encoder.input_prompt = SoftPrompt(table[rows].detach().float())
            encoder.num_prompt_tokens = s.num_tokens
            self.touched = ["(input embeddings)"]
        elif encoder.family.prompt == "vpt":
            self._apply_vpt(encoder)
        else:
            shape = encoder.pixel_shape  # audio: mel bins x frames
            pad = s.pad_size or max(1, round(min(shape) * 30 / 224))
            if 2 * pad >= min(shape):
                raise RecipeError([f"{self.where}.pad_size: {pad} leaves no image inside a {shape[0]}x{shape[1]} input"])
            encoder.input_prompt = BorderPrompt(shape, pad)
            self.touched = [f"(pixels: {pad}px border)"]

    def _apply_vpt(self, encoder) -> None:
        s = self.settings
        base = encoder.base_model()
        layers = _layer_list(base, self.where)
        offset = encoder.family.prompt_offset
        vpt = VisualPrompts(len(layers), s.num_tokens, encoder.hidden_size, s.deep)
        encoder.visual_prompt = vpt
        encoder.num_prompt_tokens = s.num_tokens

        def insert(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            prompt = vpt.prompt_tokens[0].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :offset], prompt, hidden[:, offset:]], 1)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        base.embeddings.register_forward_hook(insert)
        if s.deep:
            def replace(index):
                def hook(module, args, kwargs):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    prompt = vpt.prompt_tokens[index].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
                    hidden = torch.cat([hidden[:, :offset], prompt, hidden[:, offset + s.num_tokens :]], 1)
                    if args:
                        return (hidden,) + tuple(args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": hidden}
                return hook

            for i, layer in enumerate(layers):
                if i > 0:
                    layer.register_forward_pre_hook(replace(i), with_kwargs=True)
        self.touched = ["embeddings"] + ([f"layers 1..{len(layers) - 1} (deep)"] if s.deep else [])
