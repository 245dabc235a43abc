"""Use a trained bundle: evaluate it on its test data, or answer new questions."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate.utils import send_to_device
from pydantic import BaseModel, Field, ValidationError

from .bundle.io import load_bundle
from .config.tasks import recipe_own_columns
from .data import Sample, read_rows, recipe_splits
from .data.batching import Collator, ImageStore, make_loader
from .config.problems import describe_error
from .errors import BundleError, DataError, MMPeftError, UsageError
from .files import MAX_MANIFEST_BYTES, atomic_text_file, read_text
from .runtime import fresh_accelerator, inference_autocast
from .scoring import groups_to_report, predict_logits, prepare_tasks, score
from .tasks import TASK_INPUTS, Vocabulary


class _StoredMetrics(BaseModel):
    test: dict[str, Any]
    tasks: Optional[dict[str, dict[str, Any]]] = None
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


def evaluate_bundle(path, overrides: Sequence[str] = (), device: str = "cpu", allow_base_mismatch: bool = False,
                    expect_digest: Optional[str] = None) -> dict:
    """Rebuild the bundle's model, score its recipe's test split, compare to the stored metrics.

    Returns:
        ``{"metrics": {task: ...}, "stored": {task: ...}, "max_abs_diff": float, "tasks": {name: Task}}``
        (the difference over every task's headline numbers and per-group accuracies).
    """
    bundle = load_bundle(path, device=device, allow_base_mismatch=allow_base_mismatch, overrides=overrides,
                         expect_digest=expect_digest)
    recipe, tasks = bundle.recipe, bundle.tasks
    splits = recipe_splits(recipe)
    store = ImageStore.for_encoders(bundle.model.encoders.values(), recipe.data.image_cache_mb)
    checked = store.check({"test": splits.test}, recipe.data.on_bad_image, on_bad_audio=recipe.data.on_bad_audio,
                          on_bad_video=recipe.data.on_bad_video)
    test = checked["test"]
    for task in tasks.values():
        task.check({"test": test}, required=False)  # a bad target is named by file and row
    stored = stored_metrics(bundle.path)
    first = next(iter(tasks))
    old_all = stored.get("tasks") or {first: stored["test"]}
    group_fields = groups_to_report(recipe, test)
    if stored.get("group_fields") is not None:
        group_fields[first] = stored["group_fields"]
    loader = make_loader(test, Collator(test, dict(bundle.model.encoders.items()), tasks, store),
                         stored.get("eval_batch_size", recipe.train.eval_batch_size), False, 0)
    accelerator = fresh_accelerator(cpu=device == "cpu")
    prepare_tasks(bundle.model, tasks, torch.device(device), recipe)  # under the recipe's autocast, as in training
    with inference_autocast(recipe, device):
        outputs, index = predict_logits(bundle.model, accelerator.prepare(loader), accelerator, desc="test")
    metrics = score(outputs, index, test, tasks, group_fields)
    diffs = []
    for name, task in tasks.items():
        old = old_all.get(name)
        if not isinstance(old, dict):
            raise BundleError(f"{bundle.path}/metrics.json: no stored metrics of task {name!r}")
        for key, value in task.headline(metrics[name]).items():
            before = old.get(key)
            diffs.append(_diff(value, before))
        for field, values in old.get("groups", {}).items():
            for value, m in values.items():
                new = metrics[name].get("groups", {}).get(field, {}).get(value)
                key = "accuracy" if "accuracy" in m else "mae"
                diffs.append(_diff(new.get(key), m.get(key)) if new else 1.0)
    return {"metrics": metrics, "stored": old_all, "max_abs_diff": max(diffs) if diffs else 0.0, "group_fields": group_fields,
            "tasks": tasks}


def _diff(new, old) -> float:
    """|new - old| of a stored headline number; two NaNs agree, anything unreadable is a full miss."""
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)):
        return 1.0
    if math.isnan(new) and math.isnan(old):
        return 0.0
    return abs(new - old) if math.isfinite(new - old) else 1.0


class Predictor:
    """Answers questions about images with a loaded bundle."""

    def __init__(self, path, device: str = "cpu", allow_base_mismatch: bool = False, expect_digest: Optional[str] = None):
        self.bundle = load_bundle(path, device=device, allow_base_mismatch=allow_base_mismatch, expect_digest=expect_digest)
        self.model = self.bundle.model
        self.tasks = self.bundle.tasks
        self.vocab = Vocabulary(self.bundle.vocab)
        # same downsizing as training and `evaluate`, so predict gives the probabilities evaluate scored
        self.store = ImageStore.for_encoders(self.model.encoders.values(), self.bundle.recipe.data.image_cache_mb)
        self.device = device
        # {encoder: (modality, column)} of the encoders reading a column of their own (data.encoder_fields)
        self.own: dict[str, tuple[str, str]] = recipe_own_columns(self.bundle.recipe)

    @property
    def reads(self) -> list[str]:
        """The modalities this bundle's encoders read from their modality's input, of "image",
        "text", "audio", "video" (encoders with a column of their own: :attr:`own`)."""
        kinds = {enc.modality for name, enc in self.model.encoders.items() if name not in self.own}
        kinds |= {m for task in self.tasks.values() for m in task.reads()}  # a prompt filled from the question
        return [m for m in ("image", "text", "audio", "video") if m in kinds]

    def decode_with(self, **options) -> None:
        """Decoding settings of the bundle's generating tasks for this predictor (``max_new_tokens``,
        ``num_beams``, ``temperature``, ``top_p``; None leaves one as the recipe set it)."""
        generating = [name for name, task in self.tasks.items() if task.feeds_head]
        if not generating:
            raise UsageError(f"{self.bundle.path}: no task of it generates text, so decoding options do not apply")
        for name in generating:
            self.tasks[name].decode_with(**options)
            self.model.widths[name] = self.tasks[name].width

    @torch.no_grad()
    def stream(self, image: str, text: str, on_text, audio: str = "", task: Optional[str] = None, video: str = "") -> None:
        """One input's generated text, each piece passed to ``on_text`` as it is decoded."""
        name = task or next((n for n, t in self.tasks.items() if t.feeds_head), None)
        if name is None or name not in self.tasks or not self.tasks[name].feeds_head:
            raise UsageError(f"{self.bundle.path}: {'task ' + repr(name) if name else 'no task'} that generates text")
        row = Sample(str(image or ""), str(text or ""), "", {}, "input 1", str(audio or ""), video=str(video or ""))
        self.store.check({"input": [row]}, "error", hint="check the file path")
        batch = Collator([row], dict(self.model.encoders.items()), self.tasks, self.store)([0])
        inputs = send_to_device(batch["inputs"], self.device)
        with inference_autocast(self.bundle.recipe, self.device):
            outputs = self.model.encode(inputs)
            self.tasks[name].stream(self.model.task_head(name), outputs, inputs[TASK_INPUTS][name], [on_text])

    @torch.no_grad()
    def predict(self, images: Sequence[str], texts: Sequence[str], top_k: int = 3, batch_size: int = 32,
                audios: Sequence[str] = (), task: Optional[str] = None,
                inputs: Optional[dict[str, Sequence[str]]] = None, videos: Sequence[str] = ()) -> list[dict]:
        """What the bundle's task answers for each input: the i-th image path, text, audio path
        and video path (a list the bundle does not read may be empty), and the i-th value of each
        encoder reading a column of its own (``inputs``: encoder -> values; :attr:`own`).
        One task: its answer (vqa: ``answer`` and ``top_k``); several: ``{"tasks": {name:
        answer}}``, or only ``task``'s."""
        inputs, own = dict(inputs or {}), self.own
        unknown = [name for name in inputs if name not in own]
        if unknown:
            raise UsageError(f"--encoder-input: {', '.join(map(repr, unknown))} " +
                             (f"is not an encoder with a column of its own (those are: {', '.join(own)})" if own else
                              f"given, but every encoder of {self.bundle.path} reads its modality's input "
                              "(--image / --question / --audio / --video)"))
        missing = [name for name in own if name not in inputs]
        if missing:
            raise UsageError(f"{self.bundle.path}: encoder(s) {', '.join(map(repr, missing))} read column(s) of their own: "
                             "give " + " ".join(f"--encoder-input {n}=<{own[n][0]}>" for n in missing))
        n = max([len(images), len(texts), len(audios), len(videos)] + [len(v) for v in inputs.values()])
        images, texts, audios, videos = (list(x) if len(x) else [""] * n for x in (images, texts, audios, videos))
        rows = [Sample(str(i), str(t), "", {}, f"input {k + 1}", str(a),
                       inputs={name: (own[name][0], own[name][1], str(values[k])) for name, values in inputs.items()},
                       video=str(v))
                for k, (i, t, a, v) in enumerate(zip(images, texts, audios, videos))]
        self.store.check({"input": rows}, "error", hint="check the file path")
        if task is not None and task not in self.tasks:
            raise UsageError(f"--task: {task!r} is not a task of {self.bundle.path} (it has: {', '.join(self.tasks)})")
        answers = answer_rows(self.model, self.tasks, self.bundle.recipe, rows, self.store, top_k, self.device, batch_size,
                              where=str(self.bundle.path), only=task)
        fields = {"image": "image", "text": "question", "audio": "audio", "video": "video"}
        return [{**{fields[m]: getattr(row, m) for m in self.reads}, **{c: v for _, c, v in row.inputs.values()}, **a}
                for row, a in zip(rows, answers)]


@torch.no_grad()
def answer_rows(model, tasks: dict, recipe, rows: list, store: ImageStore, top_k: int, device: str,
                batch_size: int = 32, where: str = "", only: Optional[str] = None) -> list[dict]:
    """Each row's answer (:meth:`~mmpeft.tasks.Task.answer`; vqa: ``{answer, top_k: [{answer,
    probability}]}``), the images already in ``store``: what ``predict`` and the server both
    answer (same preprocessing, autocast and rounding). Several tasks: ``{"tasks": {name:
    answer}}``; ``only``: that task's answer alone."""
    collator = Collator(rows, dict(model.encoders.items()), tasks, store)
    prepare_tasks(model, tasks, torch.device(device), recipe)
    results = []
    for start in range(0, len(rows), batch_size):
        batch = collator(list(range(start, min(start + batch_size, len(rows)))))
        inputs = send_to_device(batch["inputs"], device)  # nested: a task's own head inputs sit beside the encoders'
        with inference_autocast(recipe, device):
            out = {name: t.float().cpu() for name, t in model(inputs).items()}
        count = len(next(iter(out.values())))
        if not all(bool(torch.isfinite(t).all()) for t in out.values()):
            raise MMPeftError(f"{where}: the model answered NaN for input(s) {start + 1}-{start + count}; "
                              "no prediction is given")
        answers = {name: task.answer(out[name], top_k) for name, task in tasks.items() if only is None or name == only}
        for i in range(count):
            if len(answers) == 1:
                results.append(next(iter(answers.values()))[i])
            else:
                results.append({"tasks": {name: a[i] for name, a in answers.items()}})
    return results


PREDICTION_COLUMNS = ("prediction", "probability", "top_k")


def predict_manifest(predictor: Predictor, manifest: Path, out: Optional[Path], top_k: int, image_field="image",
                     text_field="question", audio_field="audio", task: Optional[str] = None,
                     video_field="video") -> list[dict]:
    """Predict every row of a manifest. Each output row is the input row with every column
    as it was, plus ``prediction`` (the top answer), ``probability`` (its probability) and
    ``top_k`` (a list of ``{answer, probability}``; a JSON string in CSV). Other task kinds
    and several tasks: ``prediction`` holds the task's answer as a mapping. Written as JSONL
    or CSV (by ``out``'s suffix) atomically; returns the output rows."""
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"input manifest not found: {path.resolve()}")
    rows = read_rows(path)
    columns = {"image": image_field, "text": text_field, "audio": audio_field, "video": video_field}
    # encoders with a column of their own read it under the recipe's name for it
    reads = [(("modality", m), m, columns[m]) for m in predictor.reads] + [
        (("encoder", name), m, c) for name, (m, c) in predictor.own.items()]
    needed = [column for _, _, column in reads]
    values: dict[tuple, list[str]] = {key: [] for key, _, _ in reads}
    for number, row in rows:
        if not isinstance(row, dict) or any(row.get(f) in (None, "") and not (f == text_field and f in row) for f in needed):
            raise DataError(f"{path}, row {number}: needs field(s) {', '.join(map(repr, needed))} "
                            "(--image-field / --text-field / --audio-field / --video-field; an encoder's own column: the recipe's "
                            "data.encoder_fields)")
        for key, m, column in reads:
            value = str(row[column])
            if m != "text":  # file paths are relative to the manifest
                value = str(Path(value) if Path(value).is_absolute() else path.parent / value)
            values[key].append(value)
    own = {name: values[("encoder", name)] for name in predictor.own}
    given = {m: values.get(("modality", m), []) for m in ("image", "text", "audio", "video")}
    results = predictor.predict(given["image"], given["text"], top_k, audios=given["audio"], task=task, inputs=own,
                                videos=given["video"])
    replaced = sorted({c for _, row in rows for c in PREDICTION_COLUMNS if c in row})
    if replaced:
        print(f"note: the input's column(s) {', '.join(replaced)} are replaced by this prediction's")
    output = [{**{k: v for k, v in row.items() if k not in PREDICTION_COLUMNS}, **_columns(r)} for (_, row), r in zip(rows, results)]
    if out is not None:
        write_rows(Path(out), output)
    return output


def _columns(result: dict) -> dict:
    if "answer" in result and "top_k" in result:  # one answer from a vocabulary
        return {"prediction": result["answer"], "probability": result["top_k"][0]["probability"], "top_k": result["top_k"]}
    return {"prediction": result}


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
