"""Answer / label vocabulary built from the training split."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from ..config.answers import normalize_answer  # noqa: F401 (answers and the vocabulary compare alike)


class Vocabulary:
    """Index <-> answer mapping. Answers outside it map to ``-1`` (always scored wrong)."""

    UNKNOWN = -1

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, answers: Iterable[str], min_count: int = 1) -> "Vocabulary":
        counts = Counter(answers)
        kept = [a for a, c in counts.items() if c >= min_count]
        kept.sort(key=lambda a: (-counts[a], a))  # most frequent first, ties alphabetical: deterministic
        return cls(kept)

    def encode(self, answer: str) -> int:
        return self.index.get(answer, self.UNKNOWN)

    def __len__(self) -> int:
        return len(self.answers)

    def to_list(self) -> list[str]:
        return list(self.answers)
