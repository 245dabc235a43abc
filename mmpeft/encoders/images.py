"""Image preprocessing shared by every image encoder.

We read the encoder's own normalisation (mean/std) and input size from its
preprocessor config and apply them with PIL + torch, so the same fast,
deterministic path serves transformers models and plain torch CNNs alike
(no torchvision needed).
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance


def to_pixels(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize to ``size x size`` (bicubic) and normalise. Returns ``[3, size, size]`` float32."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Light augmentation that keeps left/right meaning: a small random crop
    (up to 8% per side) and brightness/contrast jitter. Never flips."""
    image = image.convert("RGB")
    w, h = image.size
    dx, dy = int(w * 0.08), int(h * 0.08)
    left, top = rng.randint(0, dx), rng.randint(0, dy)
    right, bottom = w - rng.randint(0, dx), h - rng.randint(0, dy)
    image = image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    return image
