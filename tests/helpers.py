"""Shared helpers for building tiny models in tests."""

from __future__ import annotations

import torch

from mmpeft.config import load_recipe
from tests import tiny

ENCODER_KINDS = ["bert", "vit", "clip", "resnet", "effnet"]
IMAGE_KINDS = ["vit", "clip", "resnet", "effnet"]


def recipe_for(assets, kind: str, method: str | dict, out_dir, fusion="gated", other="none", **train):
    """A tiny recipe where ``kind``'s encoder gets ``method`` and the other encoder ``other``."""
    image_kind = kind if kind in IMAGE_KINDS else "vit"
    raw = tiny.recipe_dict(assets["bert"], assets[image_kind], assets["data"], out_dir, fusion=fusion, **train)
    m = method if isinstance(method, dict) else {"method": method}
    o = {"method": other}
    raw["encoders"]["text"]["peft"] = m if kind == "bert" else o
    raw["encoders"]["image"]["peft"] = o if kind == "bert" else m
    return load_recipe(raw)


def fixed_batch(model, n: int = 8, seed: int = 0):
    """A deterministic batch of random pixels and questions through the encoders' own preprocessing."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs = {}
    for name, enc in model.encoders.items():
        if enc.modality == "text":
            questions = ["what color is the shape ?", "is there a red shape ?", "what is the shape ?"]
            inputs[name] = enc.preprocess([questions[i % 3] for i in range(n)])
        else:
            images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(n)]
            inputs[name] = enc.preprocess(images)
    labels = torch.tensor([i % 3 for i in range(n)])  # learnable from the question
    return inputs, labels


def train_steps(model, inputs, labels, steps: int = 8, lr: float = 1e-3) -> list[float]:
    """AdamW steps on one fixed batch; returns the loss seen at each step."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), labels)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train(False)
    return losses


def write_and_reload(model, recipe, directory):
    """Write ``model`` as a bundle in ``directory`` and load it back; returns (manifest, loaded)."""
    from mmpeft.bundle.io import load_bundle
    from mmpeft.bundle.writer import write_bundle

    manifest = write_bundle(directory, model, recipe, ["a", "b", "c"], {"test": {}})
    return manifest, load_bundle(directory)
