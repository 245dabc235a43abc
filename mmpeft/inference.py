"""Use a trained bundle: evaluate it on its test data, or answer new questions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from pydantic import BaseModel, Field, ValidationError

from .bundle.io import load_bundle
from .data import Collator, ImageStore, Sample, load_splits, make_loader, read_rows
from .config.loading import describe_error
from .errors import BundleError, DataError, MMPeftError
from .files import MAX_MANIFEST_BYTES, atomic_text_file, read_text
from .runtime import fresh_accelerator, groups_to_report, inference_autocast, predict_logits, score
from .tasks import Vocabulary


class _Group(BaseModel):
    accuracy: float


class _TestMetrics(BaseModel):
    accuracy: float
    macro_f1: float
    groups: dict[str, dict[str, _Group]] = Field(default_factory=dict)


class _StoredMetrics(BaseModel):
    test: _TestMetrics
    group_fields: Optional[list[str]] = None
    eval_batch_size: Optional[int] = Field(None, ge=1, le=65536)


def stored_metrics(bundle: Path) -> dict:
    """A bundle's ``metrics.json``, its shape checked (a bundle is untrusted)."""
    path = Path(bundle) / "metrics.json"
    if not path.is_file():
        raise BundleError(f"{path}: missing; evaluate needs the metrics the bundle was trained to")
    try:
        stored = json.loads(read_text(path, BundleError, max_bytes=MAX_MANIFEST_BYTES))
        _StoredMetrics.model_validate(stored)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    except ValidationError as exc:
        raise BundleError(f"{path} is damaged or was edited: " +
                          "; ".join(describe_error(e, _StoredMetrics) for e in exc.errors()[:5])) from None
    return stored


def evaluate_bundle(path, overrides: Sequence[str] = (), device: str = "cpu", allow_base_mismatch: bool = False) -> dict:
    """Rebuild the bundle's model, score its recipe's test split, compare to the stored metrics.

    Returns:
        ``{"metrics": ..., "stored": ..., "max_abs_diff": float}`` (diff over headline numbers).
    """
    bundle = load_bundle(path, device=device, allow_base_mismatch=allow_base_mismatch, overrides=overrides)
    recipe = bundle.recipe
    vocab = Vocabulary(bundle.vocab)
    splits = load_splits(recipe.data, recipe.task.group_fields, recipe.train.seed)
    store = ImageStore.for_encoders(bundle.model.encoders.values(), recipe.data.image_cache_mb)
    checked = store.check({"test": splits.test}, recipe.data.on_bad_image)
    test = checked["test"]
    stored = stored_metrics(bundle.path)
    group_fields = stored.get("group_fields") or groups_to_report(recipe, test)
    loader = make_loader(test, Collator(test, dict(bundle.model.encoders.items()), vocab, store),
                         stored.get("eval_batch_size", recipe.train.eval_batch_size), False, 0)
    accelerator = fresh_accelerator(cpu=device == "cpu")
    with inference_autocast(recipe, device):
        logits, index = predict_logits(bundle.model, accelerator.prepare(loader), accelerator, desc="test")
    metrics = score(logits, index, test, vocab, group_fields)
    old = stored["test"]
    diffs = [abs(metrics["accuracy"] - old["accuracy"]), abs(metrics["macro_f1"] - old["macro_f1"])]
    for field, values in old.get("groups", {}).items():
        for value, m in values.items():
            new = metrics["groups"].get(field, {}).get(value)
            diffs.append(abs(new["accuracy"] - m["accuracy"]) if new else 1.0)
    return {"metrics": metrics, "stored": old, "max_abs_diff": max(diffs), "group_fields": group_fields}


class Predictor:
    """Answers questions about images with a loaded bundle."""

    def __init__(self, path, device: str = "cpu", allow_base_mismatch: bool = False):
        self.bundle = load_bundle(path, device=device, allow_base_mismatch=allow_base_mismatch)
        self.model = self.bundle.model
        self.vocab = Vocabulary(self.bundle.vocab)
        # same downsizing as training and `evaluate`, so predict gives the probabilities evaluate scored
        self.store = ImageStore.for_encoders(self.model.encoders.values(), self.bundle.recipe.data.image_cache_mb)
        self.device = device

    @torch.no_grad()
    def predict(self, images: Sequence[str], texts: Sequence[str], top_k: int = 3, batch_size: int = 32) -> list[dict]:
        """Top-k answers with probabilities for each (image path, text) pair."""
        rows = [Sample(str(i), str(t), "", {}, f"input {n + 1}") for n, (i, t) in enumerate(zip(images, texts))]
        self.store.check({"input": rows}, "error", hint="check the image path")
        answers = answer_rows(self.model, self.vocab, self.bundle.recipe, rows, self.store, top_k, self.device, batch_size,
                              where=str(self.bundle.path))
        return [{"image": row.image, "question": row.text, **a} for row, a in zip(rows, answers)]


@torch.no_grad()
def answer_rows(model, vocab: Vocabulary, recipe, rows: list, store: ImageStore, top_k: int, device: str,
                batch_size: int = 32, where: str = "") -> list[dict]:
    """``{answer, top_k: [{answer, probability}]}`` per row, the images already in ``store``:
    what ``predict`` and the server both answer (same preprocessing, autocast and rounding)."""
    collator = Collator(rows, dict(model.encoders.items()), vocab, store)
    results = []
    for start in range(0, len(rows), batch_size):
        batch = collator(list(range(start, min(start + batch_size, len(rows)))))
        inputs = {k: {n: t.to(device) for n, t in v.items()} for k, v in batch["inputs"].items()}
        with inference_autocast(recipe, device):
            probs = model(inputs).float().softmax(-1).cpu()
        if not bool(torch.isfinite(probs).all()):
            raise MMPeftError(f"{where}: the model answered NaN for input(s) {start + 1}-{start + len(probs)}; "
                              "no prediction is given")
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for p, idx in zip(top.values.tolist(), top.indices.tolist()):
            results.append({"answer": vocab.answers[idx[0]],
                            "top_k": [{"answer": vocab.answers[j], "probability": round(q, 6)} for j, q in zip(idx, p)]})
    return results


PREDICTION_COLUMNS = ("prediction", "probability", "top_k")


def predict_manifest(predictor: Predictor, manifest: Path, out: Optional[Path], top_k: int, image_field="image",
                     text_field="question") -> list[dict]:
    """Predict every row of a manifest. Each output row is the input row with every column
    as it was, plus ``prediction`` (the top answer), ``probability`` (its probability) and
    ``top_k`` (a list of ``{answer, probability}``; a JSON string in CSV). Written as JSONL
    or CSV (by ``out``'s suffix) atomically; returns the output rows."""
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"input manifest not found: {path.resolve()}")
    rows = read_rows(path)
    images, texts = [], []
    for number, row in rows:
        if not isinstance(row, dict) or row.get(image_field) in (None, "") or text_field not in row:
            raise DataError(f"{path}, row {number}: needs fields {image_field!r} and {text_field!r} (--image-field / --text-field)")
        img = Path(str(row[image_field]))
        images.append(str(img if img.is_absolute() else path.parent / img))
        texts.append(str(row[text_field]))
    results = predictor.predict(images, texts, top_k)
    replaced = sorted({c for _, row in rows for c in PREDICTION_COLUMNS if c in row})
    if replaced:
        print(f"note: the input's column(s) {', '.join(replaced)} are replaced by this prediction's")
    output = [{**{k: v for k, v in row.items() if k not in PREDICTION_COLUMNS}, "prediction": r["answer"],
               "probability": r["top_k"][0]["probability"], "top_k": r["top_k"]} for (_, row), r in zip(rows, results)]
    if out is not None:
        write_rows(Path(out), output)
    return output


def write_rows(out: Path, rows: list[dict]) -> None:
    """Rows as JSONL, or as CSV (columns in order of first appearance; lists and mappings as
    JSON) when ``out`` ends in ``.csv``; written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_text_file(out, newline="") as handle:
        if out.suffix.lower() == ".csv":
            columns = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(handle, columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        else:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
