"""``regression``: one number per row. The head predicts the target standardised by the
training split's mean and standard deviation (stored in the bundle), so the loss (MSE or L1)
and the learning rates work at any scale; predictions are mapped back before scoring.

Metrics: MAE, RMSE, Pearson's r, Spearman's rho (Pearson over average ranks), and
accuracy after binarising at ``binarize_at`` (sentiment benchmarks' Acc-2: prediction and
target on the same side; rows whose target equals the threshold are left out).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config.tasks import RegressionSettings
from .base import TASKS, Task, ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den else float("nan")


@TASKS.register("regression")
class RegressionTask(Task):
    """One number per row, predicted standardised by the training mean and std; MSE or L1 loss."""

    Settings = RegressionSettings

    @classmethod
    def fit(cls, name, settings, rows, label_field="answer"):
        probe = cls(name, settings, {}, label_field)
        values = torch.tensor([v for v in (probe.target(r) for r in rows) if v is not None], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        return cls(name, settings, {"mean": float(values.mean()), "std": std if std > 0 else 1.0}, label_field)

    @property
    def width(self) -> int:
        return 1

    @property
    def labels(self) -> list[str]:
        return [self.field]

    def parse(self, value) -> float:
        if isinstance(value, bool):
            raise ValueError("a regression target is a number, not true/false")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"a regression target is a number, not {str(value)[:40]!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"a regression target is a finite number, not {number}")
        return number

    def collate(self, rows: Sequence) -> torch.Tensor:
        """Standardised targets ``[B]``; NaN marks a row without one (left out of the loss)."""
        values = [self.target(r) for r in rows]
        return torch.tensor([math.nan if v is None else (v - self.state["mean"]) / self.state["std"] for v in values])

    def usable(self, target):
        return ~torch.isnan(target)

    def loss(self, out, target, usable=None):
        rows = self.learnable(out[:, 0].float(), target, usable)
        if rows is None:
            return out.sum() * 0.0
        pred, target = rows
        return F.mse_loss(pred, target.float()) if self.settings.loss == "mse" else F.l1_loss(pred, target.float())

    def values(self, out: torch.Tensor) -> torch.Tensor:
        """Predictions in the target's own units."""
        return out[:, 0].double() * self.state["std"] + self.state["mean"]

    def score(self, out, rows, group_fields=()):
        pred = self.values(out)
        gold = torch.tensor([self.target(r) for r in rows], dtype=torch.float64)
        error = pred - gold
        cut = self.settings.binarize_at
        decided = gold != cut
        same_side = ((pred > cut) == (gold > cut))[decided]
        metrics = {
            "count": len(rows),
            "mae": float(error.abs().mean()),
            "rmse": float(error.pow(2).mean().sqrt()),
            "pearson": pearson(pred, gold),
            "spearman": pearson(ranks(pred), ranks(gold)),
            "accuracy": float(same_side.double().mean()) if len(same_side) else float("nan"),
            "accuracy_rows": int(decided.sum()),
            "loss": float(self.loss(out, self.collate(rows))),
        }
        groups = {}
        for field in group_fields:
            buckets: dict[str, list[int]] = {}
            for i, r in enumerate(rows):
                buckets.setdefault(str(r.groups.get(field, "")), []).append(i)
            groups[field] = {v: {"mae": float(error[idx].abs().mean()), "count": len(idx)} for v, idx in sorted(buckets.items())}
        metrics["groups"] = groups
        return metrics

    def answer(self, out, top_k):
        return [{"value": round(float(v), 6)} for v in self.values(out)]
