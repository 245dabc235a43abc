"""Metrics for answer classification: accuracy (overall, per group), macro-F1, per-answer report.

Gold answers outside the vocabulary are kept and count as wrong: they enter the
macro-F1 as classes with recall 0.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional, Sequence


def compute_metrics(
    predictions: Sequence[str],
    golds: Sequence[str],
    groups: Optional[dict[str, Sequence[str]]] = None,
    in_vocab: Optional[Sequence[bool]] = None,
) -> dict:
    """Score predicted answers against gold answers (both normalised strings).

    Args:
        predictions: predicted answer per example.
        golds: gold answer per example (may be outside the vocabulary).
        groups: optional ``{field: value per example}`` for per-group accuracy.
        in_vocab: whether each gold answer is in the training vocabulary.

    Returns:
        ``{"accuracy", "macro_f1", "count", "groups": {field: {value: {accuracy, count}}},
        "per_answer": {answer: {precision, recall, f1, support}}, "out_of_vocab": n}``
    """
    n = len(golds)
    correct = [p == g for p, g in zip(predictions, golds)]
    result: dict = {"count": n, "accuracy": sum(correct) / n if n else float("nan")}  # no rows: no accuracy (not 0)
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g, ok in zip(predictions, golds, correct):
        if ok:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    support = Counter(golds)
    labels = sorted(set(golds) | set(predictions))
    per_answer = {}
    f1s = []
    for label in labels:
        prec = tp[label] / (tp[label] + fp[label]) if tp[label] + fp[label] else 0.0
        rec = tp[label] / (tp[label] + fn[label]) if tp[label] + fn[label] else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_answer[label] = {"precision": prec, "recall": rec, "f1": f1, "support": support[label]}
    result["macro_f1"] = sum(f1s) / len(f1s) if f1s else float("nan")
    result["per_answer"] = per_answer
    if in_vocab is not None:
        result["out_of_vocab"] = sum(1 for v in in_vocab if not v)
    result["groups"] = {}
    for field, values in (groups or {}).items():
        buckets: dict[str, list[bool]] = defaultdict(list)
        for v, ok in zip(values, correct):
            buckets[str(v)].append(ok)
        result["groups"][field] = {
            v: {"accuracy": sum(oks) / len(oks), "count": len(oks)} for v, oks in sorted(buckets.items())
        }
    return result


def summary_row(metrics: dict, group_fields: Sequence[str] = ()) -> dict[str, float]:
    """Flat ``{name: value}`` of headline numbers (for tables and logs)."""
    row = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    for field in group_fields:
        for value, m in metrics.get("groups", {}).get(field, {}).items():
            row[f"{field}={value}"] = m["accuracy"]
    return row
