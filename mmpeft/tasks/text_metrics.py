"""Scores of generated text against references.

- Short answers: normalised exact match and token F1, as SQuAD's official evaluation
  script computes them (lower case, punctuation and the articles a / an / the removed;
  Rajpurkar et al. 2016), and token recall (the share of reference tokens generated, as
  LLaVA-Med reports for open questions; Li et al. 2023).
- Captions: BLEU-4 (Papineni et al. 2002), ROUGE-L (Lin 2004) and CIDEr-D (Vedantam et al.
  2015) from ``pycocoevalcap``, the COCO caption evaluation code, whose three scorers are pure
  Python. Its PTB tokenizer needs Java, so text is tokenised here by the same normalisation
  as the answers (lower case, punctuation removed, split on white space).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from ..errors import MMPeftError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _PUNCT.sub(" ", str(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def caption_tokens(text: str) -> str:
    """Lower case, punctuation removed, tokens joined by single spaces (articles kept)."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def token_scores(prediction: str, reference: str) -> tuple[float, float]:
    """``(F1, recall)`` of the normalised tokens."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        same = float(pred == ref)
        return same, same
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall), recall


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr-D of one reference per prediction."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise MMPeftError("caption metrics need pycocoevalcap: pip install 'mmpeft[generate]'") from None
    if not predictions:
        return {"bleu4": float("nan"), "rouge_l": float("nan"), "cider": float("nan")}
    # pycocoevalcap asserts a non-empty hypothesis: an empty generation scores as one unknown token
    res = {i: [caption_tokens(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) or "<empty>"] for i, r in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}


def text_metrics(predictions: Sequence[str], references: Sequence[str], groups: dict[str, list[str]]) -> dict:
    """Exact match, token F1 / recall, caption scores, and exact match per group value."""
    exact = [float(normalize_text(p) == normalize_text(r)) for p, r in zip(predictions, references)]
    f1_recall = [token_scores(p, r) for p, r in zip(predictions, references)]
    n = len(exact)
    metrics = {
        "count": n,
        "exact_match": sum(exact) / n if n else float("nan"),
        "token_f1": sum(f for f, _ in f1_recall) / n if n else float("nan"),
        "token_recall": sum(r for _, r in f1_recall) / n if n else float("nan"),
        **caption_scores(predictions, references),
    }
    by_group = {}
    for field, values in groups.items():
        cells: dict[str, list[float]] = {}
        for value, hit in zip(values, exact):
            cells.setdefault(str(value), []).append(hit)
        by_group[field] = {v: {"exact_match": sum(h) / len(h), "count": len(h)} for v, h in sorted(cells.items())}
    if by_group:
        metrics["groups"] = by_group
    return metrics
