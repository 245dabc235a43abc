"""Tasks: one registered kind per file (vqa / classification, multilabel, regression, contrastive)."""

from .base import TASK_INPUTS, TASKS, Task, build_task, load_task, recipe_task_set, stored_task_set, vocabulary_tasks
from .classify import AnswerTask, LabelTask
from .contrastive import ContrastiveHead, ContrastiveTask
from .generate import GenerateTask
from .metrics import compute_metrics, summary_row
from .multilabel import MultilabelTask
from .regression import RegressionTask
from .vocab import Vocabulary, normalize_answer

__all__ = ["TASK_INPUTS", "TASKS", "GenerateTask", "Task", "build_task", "load_task", "recipe_task_set", "stored_task_set", "vocabulary_tasks", "AnswerTask", "LabelTask", "ContrastiveHead", "ContrastiveTask",
           "MultilabelTask", "RegressionTask", "Vocabulary", "normalize_answer", "compute_metrics", "summary_row"]
