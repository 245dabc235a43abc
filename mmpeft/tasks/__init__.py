"""Tasks: answer vocabulary and metrics (vqa and classification share them)."""

from .metrics import compute_metrics, summary_row
from .vocab import Vocabulary, normalize_answer

__all__ = ["Vocabulary", "normalize_answer", "compute_metrics", "summary_row"]
