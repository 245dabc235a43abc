"""Scoring speed for ``mmpeft bench throughput``: the pass ``mmpeft evaluate`` makes over a
bundle's test rows (model loading excluded), timed cold (every image decoded and resized
first, as one ``evaluate`` does) and warm (the decoded images and pixel tensors cached, as a
training epoch after the first is), so the row says where an evaluation's time goes."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..bundle.io import load_bundle
from ..data import recipe_splits
from ..data.batching import Collator, ImageStore, make_loader
from ..runtime import fresh_accelerator, inference_autocast
from ..scoring import predict_logits, prepare_tasks


def scoring_speed(bundle: Path) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_bundle(bundle, device=device)
    recipe, model, tasks = loaded.recipe, loaded.model, loaded.tasks
    test = recipe_splits(recipe).test
    store = ImageStore.for_encoders(model.encoders.values(), recipe.data.image_cache_mb)
    accelerator = fresh_accelerator(cpu=device == "cpu")
    prepare_tasks(model, tasks, torch.device(device), recipe)
    passes = []
    for name in ("cold", "warm"):
        start = time.perf_counter()
        checked = store.check({"test": test}, recipe.data.on_bad_image, on_bad_audio=recipe.data.on_bad_audio)["test"]
        opened = time.perf_counter()
        loader = make_loader(checked, Collator(checked, dict(model.encoders.items()), tasks, store),
                             recipe.train.eval_batch_size, False, 0)
        with inference_autocast(recipe, device):
            predict_logits(model, accelerator.prepare(loader), accelerator, desc=f"scoring ({name})")
        seconds = time.perf_counter() - start
        passes.append({"pass": name, "rows": len(checked), "rows_per_second": round(len(checked) / seconds, 2),
                       "opening_images_seconds": round(opened - start, 2), "seconds": round(seconds, 2)})
    return {"batch_size": recipe.train.eval_batch_size, "passes": passes}
