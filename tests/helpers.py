"""Shared helpers for building tiny models in tests."""

from __future__ import annotations

import torch

from mmpeft.config import load_recipe
from tests import tiny

ENCODER_KINDS = ["bert", "vit", "clip", "resnet", "effnet", "effnet_audio", "wav2vec2", "whisper", "ast", "clap"]
# the kinds that sit in a recipe's second encoder slot
IMAGE_KINDS = ["vit", "clip", "resnet", "effnet", "effnet_audio", "wav2vec2", "whisper", "ast", "clap"]


def refuses(enc, method: str) -> bool:
    """Whether ``method``, with its default settings, says it cannot adapt this encoder (prompt
    tuning where the architecture row says ``prompt: none``, VeRA on a CNN): the method loops
    check the refusal instead."""
    from mmpeft.methods import build_method

    return build_method({"method": method}).unavailable(enc) is not None


def copy_of(bundle, tmp_path, name="copy"):
    """A copy of ``bundle`` under ``tmp_path`` to change (the shared fixture stays as written)."""
    import shutil

    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


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
        elif enc.modality == "audio":  # noise clips of different lengths, so the frame mask matters
            rate = enc.audio.sample_rate
            waves = [(0.1 * rng.standard_normal(int(rate * (0.2 + 0.1 * (i % 4))))).astype(np.float32) for i in range(n)]
            inputs[name] = enc.preprocess(waves)
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
        loss = F.cross_entropy(model.logits(inputs), labels)
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


TIMING = ("epoch_seconds", "samples_per_second", "data_seconds", "ended_at")  # history columns that differ between identical runs


def bundle_results(bundle) -> tuple[dict, dict]:
    """(metrics without timings, every tensor of the bundle): what identical runs share."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    bundle = Path(bundle)
    metrics = json.loads((bundle / "metrics.json").read_text())
    for row in metrics["history"]:
        for key in TIMING:
            row.pop(key)
    tensors = {f"{f.relative_to(bundle)}:{k}": v for f in sorted(bundle.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return metrics, tensors
