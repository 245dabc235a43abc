"""``vqa`` and ``classification``: one answer per row from a vocabulary built on the training
split; softmax cross-entropy (with ``train.label_smoothing``); accuracy, macro-F1, per-group
accuracy and a per-answer report (:mod:`.metrics`). Gold answers outside the vocabulary are
kept and scored wrong."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..config.tasks import ClassificationSettings, VqaSettings
from ..errors import DataError
from .base import TASKS, Task
from .metrics import compute_metrics
from .vocab import Vocabulary, normalize_answer


@TASKS.register("vqa")
class AnswerTask(Task):
    """VQA: one answer per row from a vocabulary built on the training split; softmax cross-entropy."""

    Settings = VqaSettings
    label_smoothing = 0.0  # set from train.label_smoothing by the training loop (configure)

    def configure(self, train) -> None:
        self.label_smoothing = train.label_smoothing

    def describe_outputs(self) -> str:
        return f"{len(self.labels)} answers"

    def __init__(self, name, settings, state, label_field="answer"):
        super().__init__(name, settings, state, label_field)
        self.vocab = Vocabulary(self.state.get("labels", []))

    @classmethod
    def fit(cls, name, settings, rows, label_field="answer"):
        probe = cls(name, settings, {"labels": []}, label_field)
        values = [probe.target(r) for r in rows]
        vocab = Vocabulary.build([v for v in values if v is not None], settings.min_answer_count)
        if not len(vocab):
            raise DataError(f"task {name!r}: no answer is seen {settings.min_answer_count} time(s) in training; "
                            "lower min_answer_count")
        return cls(name, settings, {"labels": vocab.to_list()}, label_field)

    @property
    def width(self) -> int:
        return len(self.vocab)

    def parse(self, value) -> str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"an answer is text or a number, not {type(value).__name__}")
        return normalize_answer(value)

    def target(self, row):
        if not self.owns(row):  # a row of another task's data: its answer (if any) is not this task's
            return None
        if self.field == self.label_field and not getattr(row, "extra", None):
            return row.answer or None  # the common case, read straight from the row (rows hold it normalised)
        return super().target(row)

    def collate(self, rows: Sequence) -> torch.Tensor:
        return torch.tensor([-1 if (v := self.target(r)) is None else self.vocab.encode(v) for r in rows], dtype=torch.long)

    def usable(self, target):
        return target >= 0  # -1: no answer, or one outside the vocabulary

    def loss(self, out, target, usable=None):
        if not self.rows_to_learn(target, usable):  # no row of this batch has an answer of the vocabulary: nothing to learn
            return out.sum() * 0.0
        return F.cross_entropy(out.float(), target, ignore_index=-1, label_smoothing=self.label_smoothing)

    def score(self, out, rows, group_fields=()):
        preds = [self.vocab.answers[i] for i in out.argmax(-1).tolist()]
        golds = [self.target(r) for r in rows]
        groups = {f: [r.groups.get(f, "") for r in rows] for f in group_fields}
        metrics = compute_metrics(preds, golds, groups, [self.vocab.encode(g) >= 0 for g in golds])
        labels = torch.tensor([self.vocab.encode(g) for g in golds])
        known = labels >= 0
        metrics["loss"] = float(F.cross_entropy(out[known].float(), labels[known])) if known.any() else float("nan")
        return metrics

    def answer(self, out, top_k):
        probs = out.float().softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [{"answer": self.vocab.answers[idx[0]],
                 "top_k": [{"answer": self.vocab.answers[j], "probability": round(q, 6)} for j, q in zip(idx, p)]}
                for p, idx in zip(top.values.tolist(), top.indices.tolist())]

    def headline(self, metrics):
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}

    def table(self, metrics):
        rows = [("accuracy", f"{100 * metrics['accuracy']:.2f}", str(metrics["count"])),
                ("macro-F1", f"{100 * metrics['macro_f1']:.2f}", "")]
        for field, values in metrics.get("groups", {}).items():
            rows += [(f"{field}={v}", f"{100 * m['accuracy']:.2f}", str(m["count"])) for v, m in values.items()]
        if "out_of_vocab" in metrics:
            rows.append(("answers outside vocabulary (scored wrong)", "", str(metrics["out_of_vocab"])))
        return rows


@TASKS.register("classification")
class LabelTask(AnswerTask):
    """Classification: one label per row, as ``vqa`` (the same vocabulary, loss and metrics)."""

    Settings = ClassificationSettings
