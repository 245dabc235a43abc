"""``multilabel``: several labels per row, one sigmoid each, binary cross-entropy (optionally
with per-label positive weights, as ``torch.nn.BCEWithLogitsLoss(pos_weight=...)``).

Metrics: micro- and macro-F1 at the stored threshold, per-label precision / recall / F1,
macro AUROC and macro average precision (threshold-free; labels with no positive or no
negative in the scored rows are left out of both, as scikit-learn refuses them), and
subset accuracy (every label of a row right). The threshold is 0.5 unless
``tune_threshold`` picks the one that maximises validation micro-F1.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config.tasks import MultilabelSettings
from ..errors import DataError
from .base import TASKS, Task, ranks
from .vocab import normalize_answer


def binary_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive outranks a random
    negative (ties count half), from average ranks (Mann-Whitney U)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    r = ranks(scores.double())
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n, thresholds at every distinct score
    (tied scores form one step), as ``sklearn.metrics.average_precision_score``."""
    order = scores.double().argsort(descending=True, stable=True)
    s, y = scores.double()[order], positive[order].double()
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last row of each group of tied scores
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    previous = torch.cat([torch.zeros(1, dtype=recall.dtype), recall[:-1]])
    return float(((recall - previous) * precision).sum())


@TASKS.register("multilabel")
class MultilabelTask(Task):
    """Several labels per row, one sigmoid each, binary cross-entropy."""

    Settings = MultilabelSettings

    def __init__(self, name, settings, state, label_field="answer"):
        super().__init__(name, settings, state, label_field)
        self.index = {label: i for i, label in enumerate(self.state.get("labels", []))}
        self.threshold = float(self.state.get("threshold", settings.threshold))

    @classmethod
    def fit(cls, name, settings, rows, label_field="answer"):
        probe = cls(name, settings, {"labels": []}, label_field)
        targets = [t for t in (probe.target(r) for r in rows) if t is not None]
        counts = Counter(label for t in targets for label in t)
        labels = sorted((label for label, c in counts.items() if c >= settings.min_label_count), key=lambda a: (-counts[a], a))
        if not labels:
            raise DataError(f"task {name!r}: no label is seen {settings.min_label_count} time(s) in training; "
                            "lower min_label_count")
        state = {"labels": labels, "threshold": settings.threshold}
        if settings.pos_weight == "balanced":  # negatives / positives per label, from training rows
            state["pos_weight"] = [(len(targets) - counts[label]) / counts[label] for label in labels]
        return cls(name, settings, state, label_field)

    @property
    def width(self) -> int:
        return len(self.state["labels"])

    def parse(self, value) -> tuple[str, ...]:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"{value[:60]!r} starts like a JSON list but is not one") from None
        if isinstance(value, str):
            items = value.split(self.settings.delimiter)
        elif isinstance(value, list):
            items = value
        else:
            raise ValueError(f"a multilabel cell is a list or text with labels split by {self.settings.delimiter!r}, "
                             f"not {type(value).__name__}")
        bad = [v for v in items if not isinstance(v, (str, int)) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"labels are text or integers, not {type(bad[0]).__name__}")
        return tuple(dict.fromkeys(normalize_answer(v) for v in items if str(v).strip()))

    def collate(self, rows: Sequence) -> torch.Tensor:
        """``[B, L]`` of 0/1; a row without a target is all -1 (ignored by the loss)."""
        out = torch.zeros(len(rows), self.width)
        for i, row in enumerate(rows):
            labels = self.target(row)
            if labels is None:
                out[i] = -1
                continue
            for label in labels:
                if label in self.index:
                    out[i, self.index[label]] = 1
        return out

    def usable(self, target):
        return target[:, 0] >= 0 if target.shape[1] else torch.zeros(len(target), dtype=torch.bool, device=target.device)

    def loss(self, out, target, usable=None):
        rows = self.learnable(out, target, usable)
        if rows is None:
            return out.sum() * 0.0
        out, target = rows
        return F.binary_cross_entropy_with_logits(out.float(), target, pos_weight=self._pos_weight(out.device))

    def _pos_weight(self, device) -> Optional[torch.Tensor]:
        """The fitted positive weights on ``device``, copied there once rather than every step
        (a copy from a Python list waits for the GPU)."""
        weight = self.state.get("pos_weight")
        if not weight:
            return None
        cached = getattr(self, "_pos_weight_on", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._pos_weight_on = torch.tensor(weight, device=device)
        return cached

    def _matrix(self, rows):
        return self.collate(rows).bool()

    def score(self, out, rows, group_fields=()):
        if not rows:
            return {"count": 0, **{m: float("nan") for m in self.settings.metrics}, "threshold": self.threshold}
        gold = self._matrix(rows)
        probs = out.float().sigmoid()
        ranked = out.double()  # AUROC and AP rank the logits: float32 probabilities saturate (tie) above ~17
        pred = probs >= self.threshold
        tp = (pred & gold).sum(0).double()
        fp = (pred & ~gold).sum(0).double()
        fn = (~pred & gold).sum(0).double()
        per_label, f1s, aurocs, aps = {}, [], [], []
        for j, label in enumerate(self.state["labels"]):
            precision = float(tp[j] / (tp[j] + fp[j])) if tp[j] + fp[j] else 0.0
            recall = float(tp[j] / (tp[j] + fn[j])) if tp[j] + fn[j] else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            entry = {"precision": precision, "recall": recall, "f1": f1, "support": int(gold[:, j].sum())}
            column = gold[:, j]
            if 0 < int(column.sum()) < len(column):
                entry["auroc"] = binary_auroc(ranked[:, j], column)
                entry["average_precision"] = average_precision(ranked[:, j], column)
                aurocs.append(entry["auroc"])
                aps.append(entry["average_precision"])
            per_label[label] = entry
            f1s.append(f1)
        micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
        # rows whose gold labels all lie outside the vocabulary still count in subset accuracy (as wrong when predicted)
        known = [self.target(r) for r in rows]
        unseen = torch.tensor([any(label not in self.index for label in t) for t in known], dtype=torch.bool)
        subset = ((pred == gold).all(1) & ~unseen).double().mean()
        weight = self.state.get("pos_weight")
        return {
            "count": len(rows),
            "micro_f1": float(2 * tp.sum() / micro_den) if micro_den else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "auroc": sum(aurocs) / len(aurocs) if aurocs else float("nan"),
            "average_precision": sum(aps) / len(aps) if aps else float("nan"),
            "subset_accuracy": float(subset),
            "threshold": self.threshold,
            "labels_scored_by_ranking": len(aurocs),
            "per_label": per_label,
            "loss": float(F.binary_cross_entropy_with_logits(out.float(), gold.float(), pos_weight=torch.tensor(weight) if weight else None)),
        }

    @property
    def tunes(self) -> bool:
        return self.settings.tune_threshold

    def tune(self, out, rows):
        """The threshold (0.05 ... 0.95 by 0.05) with the best validation micro-F1; ties: the one nearest 0.5."""
        if not rows:
            return f"task {self.name}: no validation row has labels; the threshold stays {self.threshold:g}"
        gold, probs = self._matrix(rows), out.float().sigmoid()
        best = None
        for step in range(1, 20):
            self.threshold = step / 20
            pred = probs >= self.threshold
            tp, wrong = int((pred & gold).sum()), int((pred ^ gold).sum())
            f1 = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
            key = (f1, -abs(self.threshold - 0.5))
            if best is None or key > best[0]:
                best = (key, self.threshold)
        self.threshold = self.state["threshold"] = best[1]
        return f"task {self.name}: threshold {best[1]:.2f} chosen on validation (micro-F1 {best[0][0]:.4f})"

    def answer(self, out, top_k):
        probs = out.float().sigmoid()
        labels = self.state["labels"]
        results = []
        for p in probs.tolist():
            order = sorted(range(len(p)), key=lambda j: -p[j])
            results.append({"labels": [labels[j] for j in order if p[j] >= self.threshold], "threshold": self.threshold,
                            "top_k": [{"label": labels[j], "probability": round(p[j], 6)} for j in order[:top_k]]})
        return results
