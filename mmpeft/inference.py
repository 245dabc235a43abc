"""Use a trained bundle: evaluate it on its test data, or answer new questions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from pydantic import BaseModel, Field, ValidationError

from .bundle.io import load_bundle
from .data import Collator, ImageStore, Sample, make_loader, read_rows, recipe_splits
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
    splits = recipe_splits(recipe)
    store = ImageStore.for_encoders(bundle.model.encoders.values(), recipe.data.image_cache_mb)
    checked = store.check({"test": splits.test}, recipe.data.on_bad_image, on_bad_audio=recipe.data.on_bad_audio)
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

    @property
    def reads(self) -> list[str]:
        """The inputs this bundle's encoders read, of "image", "text", "audio"."""
        kinds = {enc.modality for enc in self.model.encoders.values()}
        return [m for m in ("image", "text", "audio") if m in kinds]

    @torch.no_grad()
    def predict(self, images: Sequence[str], texts: Sequence[str], top_k: int = 3, batch_size: int = 32,
                audios: Sequence[str] = ()) -> list[dict]:
        """Top-k answers with probabilities for each input: the i-th image path, text and
        audio path (a list the bundle does not read may be empty)."""
        n = max(len(images), len(texts), len(audios))
        images, texts, audios = (list(x) if len(x) else [""] * n for x in (images, texts, audios))
        rows = [Sample(str(i), str(t), "", {}, f"input {k + 1}", str(a)) for k, (i, t, a) in enumerate(zip(images, texts, audios))]
        self.store.check({"input": rows}, "error", hint="check the file path")
        answers = answer_rows(self.model, self.vocab, self.bundle.recipe, rows, self.store, top_k, self.device, batch_size,
                              where=str(self.bundle.path))
        fields = {"image": "image", "text": "question", "audio": "audio"}
        return [{**{fields[m]: getattr(row, m) for m in self.reads}, **a} for row, a in zip(rows, answers)]


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
                     text_field="question", audio_field="audio") -> list[dict]:
    """Predict every row of a manifest. Each output row is the input row with every column
    as it was, plus ``prediction`` (the top answer), ``probability`` (its probability) and
    ``top_k`` (a list of ``{answer, probability}``; a JSON string in CSV). Written as JSONL
    or CSV (by ``out``'s suffix) atomically; returns the output rows."""
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"input manifest not found: {path.resolve()}")
    rows = read_rows(path)
    columns = {"image": image_field, "text": text_field, "audio": audio_field}
    needed = [columns[m] for m in predictor.reads]
    values: dict[str, list[str]] = {m: [] for m in columns}
    for number, row in rows:
        if not isinstance(row, dict) or any(row.get(f) in (None, "") and not (f == text_field and f in row) for f in needed):
            raise DataError(f"{path}, row {number}: needs field(s) {', '.join(map(repr, needed))} "
                            "(--image-field / --text-field / --audio-field)")
        for m in predictor.reads:
            value = str(row[columns[m]])
            if m != "text":  # file paths are relative to the manifest
                value = str(Path(value) if Path(value).is_absolute() else path.parent / value)
            values[m].append(value)
    results = predictor.predict(values["image"], values["text"], top_k, audios=values["audio"])
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
