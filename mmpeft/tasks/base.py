"""What a task kind owns: its targets, its loss, its metrics, its answers and its stored state.

A task sees the slice of the model's output that its head wrote (``[B, width]``) and the
rows of the batch; the training loop asks it for a loss and the evaluation for metrics, and
knows nothing of any one kind. A new kind is one file here plus one registration (and its
settings class in :mod:`mmpeft.config.tasks`).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Optional, Sequence

import torch

from ..config.tasks import TaskSettings, recipe_tasks, task_dataset
from ..errors import BundleError, DataError
from ..registry import Registry


def missing(value) -> bool:
    """A row without a target for a task: an absent or empty cell (a NaN is a bad value, not a missing one)."""
    return value is None or value == ""


class Task:
    """One named task of a recipe. Subclasses set ``Settings`` and implement the kind."""

    Settings: ClassVar[type[TaskSettings]] = TaskSettings
    #: its head reads a batch of the task's own besides the encoders' outputs (:meth:`inputs`)
    feeds_head: ClassVar[bool] = False
    #: its output is one forward pass of fixed width, which an ONNX graph can hold (generation is a loop)
    exports_onnx: ClassVar[bool] = True
    #: True when the task's head is a LLaVA-style projector + decoder (``mmpeft export --format llava``).
    exports_llava: ClassVar[bool] = False

    def __init__(self, name: str, settings: TaskSettings, state: dict, label_field: str = "answer"):
        self.name = name
        self.settings = settings
        self.state = state  # JSON: what the bundle stores (labels, thresholds, target statistics)
        self.dataset = task_dataset(name, settings)  # rows of other datasets are not this task's
        if settings.data:
            label_field = settings.data.get("label_field", "answer")  # its own data's label column
        self.field = settings.field or label_field
        self.label_field = label_field
        self.head = None  # the task's head module, given when the model is built (:meth:`attach`)
        self.modalities: dict[str, str] = {}  # the encoders it reads, by name: their modality (:meth:`reading`)

    # --- what the kind defines ---------------------------------------------------------

    @classmethod
    def fit(cls, name: str, settings: TaskSettings, rows: Sequence, label_field: str = "answer") -> "Task":
        """The task with its state drawn from the training rows (vocabulary, statistics)."""
        return cls(name, settings, {}, label_field)

    @property
    def width(self) -> int:
        """Columns of the model's output this task's head writes."""
        raise NotImplementedError

    def parse(self, value) -> Any:
        """A raw cell as this kind's target; raises ``ValueError`` saying what is wrong."""
        return value

    def collate(self, rows: Sequence) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, rows: Sequence) -> Optional[dict[str, torch.Tensor]]:
        """The tensors its head reads besides the encoders' outputs (a prompt's tokens), for
        kinds that set :attr:`feeds_head`."""
        return None

    def loss(self, out: torch.Tensor, target: torch.Tensor, usable: Optional[int] = None) -> torch.Tensor:
        """The batch's loss. ``usable``: how many of its rows have a target the loss reads
        (:meth:`usable`), counted on the host by the collator; given, the loss asks nothing of
        the device to decide whether it has rows to learn from (a ``bool(tensor)`` there waits
        for the GPU on every step)."""
        raise NotImplementedError

    def usable(self, target: torch.Tensor) -> torch.Tensor:
        """One bool per row of a collated ``target``: whether the loss learns from that row."""
        raise NotImplementedError

    def rows_to_learn(self, target: torch.Tensor, usable: Optional[int]) -> int:
        """How many rows the loss learns from: the collator's count where given, else counted here."""
        return int(self.usable(target).sum()) if usable is None else usable

    def learnable(self, out: torch.Tensor, target: torch.Tensor, usable: Optional[int]):
        """``(out, target)`` (target on ``out``'s device) cut to the rows the loss learns from,
        or None when there is none. Rows are selected only when some are not usable: a
        boolean index waits for the device, and a whole batch needs none."""
        count = self.rows_to_learn(target, usable)
        if not count:
            return None
        target = target.to(out.device)
        if count < len(target):
            keep = self.usable(target)
            return out[keep], target[keep]
        return out, target

    def score(self, out: torch.Tensor, rows: Sequence, group_fields: Sequence[str] = ()) -> dict:
        """Metrics over ``rows`` (in the order of ``out``), including ``loss``."""
        raise NotImplementedError

    def answer(self, out: torch.Tensor, top_k: int) -> list[dict]:
        """What ``predict`` returns per row."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> dict[str, float]:
        """The flat numbers logged each epoch and compared by ``evaluate``."""
        return {m: metrics[m] for m in self.settings.metrics if isinstance(metrics.get(m), (int, float))}

    def table(self, metrics: dict) -> list[tuple[str, str, str]]:
        """``(metric, value, n)`` rows of the test table."""
        return [(m, f"{metrics[m]:.4f}", str(metrics.get("count", ""))) for m in self.headline(metrics)]

    def reading(self, modalities: dict[str, str]) -> None:
        """Told, before its head is built, the encoders it reads and their modalities (``{name: modality}``)."""
        self.modalities = dict(modalities)

    def attach(self, head) -> None:
        """Told the head the model holds for it (a fusion head, or its own :meth:`build_head`)."""
        self.head = head

    def share_parts(self, cache: dict) -> None:
        """Told, before its head is built, a cache of frozen parts that heads of other models
        may share with its own (``serve``, several bundles in one process). A kind whose head
        holds such a part (a decoder) takes it from there, or puts its own there, and lists it
        in :attr:`shared_parts`; other kinds hold nothing worth sharing."""

    @property
    def shared_parts(self) -> dict:
        """``{key: (module, method)}``: the parts of its head taken from :meth:`share_parts`'s
        cache; each holds the trained tensors of one model at a time."""
        return {}

    def build_head(self, dims: dict[str, int], encoders: Optional[dict] = None):
        """The task's own head over encoders of these widths (``encoders``: the built encoders,
        by name), or None for a fusion head (``fusion:``)."""
        return None

    def tune(self, out: torch.Tensor, rows: Sequence) -> Optional[str]:
        """Settle settings chosen on validation outputs (e.g. a threshold); returns a log line."""
        return None

    @property
    def tunes(self) -> bool:
        """Whether :meth:`tune` chooses anything (then the validation outputs are computed for it)."""
        return False

    def configure(self, train) -> None:
        """Take what the kind reads from the recipe's ``train:`` block (label smoothing, ...)."""

    def start_note(self, model) -> Optional[str]:
        """A line for the run's log on how this task's head starts (from a checkpoint, ...)."""
        return None

    @torch.no_grad()
    def prepare(self, model, device, autocast) -> None:
        """What the task needs from the model before scoring or answering (class embeddings,
        ...), computed under ``autocast`` (a context manager)."""

    def head_parts(self, head) -> list[tuple]:
        """Parts of its head that the run's summary lists on their own rows: ``(label, module,
        model, method, touched modules)`` (a decoder and its PEFT method)."""
        return []

    def reads(self) -> tuple[str, ...]:
        """Row inputs it reads itself besides its encoders' ("text": a prompt filled from the question)."""
        return ()

    def decode_with(self, **options) -> None:
        """Change how it decodes for prediction (``max_new_tokens``, ``num_beams``, ``temperature``, ``top_p``)."""
        raise ValueError(f"task {self.name!r} ({self.settings.registry_name}) does not generate text")

    def stream(self, head, outputs: dict, fed: dict, on_text) -> None:
        """Generate one row's text, passing each decoded piece to ``on_text`` as it comes."""
        raise ValueError(f"task {self.name!r} ({self.settings.registry_name}) does not generate text")

    def save_files(self, head, bundle_dir, folder: str) -> list[str]:
        """Files of its head in the formats other tools read (a decoder's LoRA as peft saves it),
        written under ``bundle_dir / folder``; returns their paths relative to the bundle."""
        return []

    def merge_head(self, head) -> Optional[str]:
        """Fold the method its head's own parts carry (a decoder's LoRA) into their base; the
        method's name when folded, else None (nothing to fold, or it cannot be folded)."""
        return None

    def save_merged(self, head, bundle_dir, folder: str) -> dict:
        """Write the base parts of a merged head (a decoder) under ``bundle_dir / folder``;
        returns the task's recipe settings that load them from there (relative to the bundle)."""
        return {}

    def save_pictures(self, directory, metrics: dict) -> list[str]:
        """Pictures of its test results a person would rather see than read (written into
        ``directory``); returns the file names."""
        return []

    def describe_outputs(self) -> str:
        """What its outputs are, for the run's summary."""
        return f"{self.width} outputs"

    @property
    def labels(self) -> list[str]:
        """Names of the output columns, where they have names (answers, labels, classes)."""
        return list(self.state.get("labels", []))

    # --- shared -------------------------------------------------------------------------

    def owns(self, row) -> bool:
        """Whether the row comes from this task's data (its own, or the recipe's shared data:)."""
        return getattr(row, "dataset", "") == self.dataset

    def has(self, row) -> bool:
        """Whether this task learns from the row: one of its rows, with a target where the kind reads one."""
        return self.owns(row) and (not self.Settings.has_target or self.target(row) is not None)

    def raw(self, row):
        """The row's cell for this task: a manifest column read as it was, the answer, or a group field
        (None for a row of another task's data)."""
        if not self.owns(row):
            return None
        extra = getattr(row, "extra", None) or {}
        if self.field in extra:
            return extra[self.field]
        if self.field == self.label_field:
            return row.answer
        return row.groups.get(self.field)

    def target(self, row):
        """The parsed target of a row, or None when the row has none for this task."""
        value = self.raw(row)
        return None if missing(value) else self.parse(value)

    def check(self, splits: dict[str, Sequence], required: bool) -> None:
        """Every target parses (named by file, row and column); with ``required`` every row has one;
        a training split, where given, has at least one."""
        if not self.Settings.has_target:
            return
        for split, rows in splits.items():
            for row in rows:
                if not self.owns(row):
                    continue
                value = self.raw(row)
                if missing(value):
                    if required:
                        raise DataError(f"{row.where}: no {self.field!r} for task {self.name!r} (every row needs one "
                                        "when the recipe has a single task)")
                    continue
                try:
                    self.parse(value)
                except ValueError as exc:
                    raise DataError(f"{row.where}: column {self.field!r} (task {self.name!r}): {exc}") from None
        if "train" in splits and not any(not missing(self.raw(r)) for r in splits["train"]):
            raise DataError(f"task {self.name!r}: no training row has a {self.field!r} value")


TASKS: Registry[type[Task]] = Registry("task type")
#: the key of a batch's inputs that holds the tasks' own head inputs (no encoder name starts with "@")
TASK_INPUTS = "@tasks"


def build_task(name: str, settings: TaskSettings, rows: Sequence, label_field: str = "answer") -> Task:
    return TASKS.get(settings.registry_name).fit(name, settings, rows, label_field)


def load_task(name: str, settings: TaskSettings, state: dict, label_field: str = "answer") -> Task:
    return TASKS.get(settings.registry_name)(name, settings, state, label_field)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based; ties share the mean of their ranks), as Spearman's rho uses."""
    _, inverse, counts = torch.unique(values.double(), sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (last - (counts.double() - 1) / 2)[inverse]


def recipe_task_set(recipe, train_rows: Sequence, check: Optional[dict[str, Sequence]] = None) -> dict[str, Task]:
    """A recipe's tasks with their state drawn from the training rows; with ``check``
    (``{split: rows}``), every row's target is checked first (:meth:`Task.check`), so a bad
    cell is named by file, row and column before anything is built from it."""
    every = recipe_tasks(recipe)
    if check is not None:
        for name, settings in every.items():
            load_task(name, settings, {}, recipe.data.label_field).check(check, required=len(every) == 1)
    return {name: build_task(name, settings, train_rows, recipe.data.label_field) for name, settings in every.items()}


def vocabulary_tasks(recipe, labels: Sequence[str]) -> dict[str, Task]:
    """A recipe's one vqa / classification task with this answer vocabulary."""
    tasks = recipe_tasks(recipe)
    name, settings = next(iter(tasks.items()))
    if len(tasks) != 1 or settings.registry_name not in ("vqa", "classification"):
        raise ValueError("a vocabulary stands for the tasks only of a recipe with one vqa or classification task")
    return {name: load_task(name, settings, {"labels": list(labels)}, recipe.data.label_field)}


MAX_LABELS = 1_000_000
MAX_PROMPTS = 200_000


def _check_state(state, where: str) -> dict:
    """A stored task state (from an untrusted bundle): only known keys, of known types, bounded."""
    if not isinstance(state, dict):
        raise BundleError(f"{where}: a task's state is a mapping")
    labels = state.get("labels", [])
    if not isinstance(labels, list) or len(labels) > MAX_LABELS or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{where}: labels must be a list of at most {MAX_LABELS:,} strings")
    numbers = {k: state[k] for k in ("threshold", "mean", "std") if k in state}
    weights = state.get("pos_weight", [])
    if not isinstance(weights, list) or (weights and len(weights) != len(labels)):
        raise BundleError(f"{where}: pos_weight must be a list with one number per label")
    for key, value in [*numbers.items(), *(("pos_weight", w) for w in weights)]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BundleError(f"{where}: {key} must be a finite number")
    if "std" in state and state["std"] <= 0 or "threshold" in state and not 0 < state["threshold"] < 1:
        raise BundleError(f"{where}: std must be positive and threshold between 0 and 1")
    fingerprint = state.get("decoder_fingerprint", "sha256:")
    if not isinstance(fingerprint, str) or not re.fullmatch(r"sha256:[0-9a-f]{0,64}", fingerprint):
        raise BundleError(f"{where}: decoder_fingerprint must be 'sha256:' and a hex digest")
    unknown = sorted(set(state) - {"labels", "threshold", "mean", "std", "pos_weight", "decoder_fingerprint"})
    if unknown:
        raise BundleError(f"{where}: unknown task state key(s) {', '.join(unknown)}")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{where}: a label appears twice")
    return state


def _check_kind_state(task: Task, where: str) -> Task:
    """What each kind needs from its stored state is there (a damaged bundle fails here, not mid-forward)."""
    kind, state = task.settings.registry_name, task.state
    needs = {"vqa": ("labels",), "classification": ("labels",), "multilabel": ("labels", "threshold"),
             "regression": ("mean", "std")}.get(kind, ())
    missing_keys = [k for k in needs if k not in state or (k == "labels" and not state[k])]
    if missing_keys:
        raise BundleError(f"{where}: a {kind} task needs {', '.join(missing_keys)} in its stored state")
    prompts = len(task.labels) * len(getattr(task.settings, "templates", ()) or ())
    if prompts > MAX_PROMPTS:  # each is encoded when the bundle loads
        raise BundleError(f"{where}: {len(task.labels):,} classes x {len(task.settings.templates)} templates is more than "
                          f"the {MAX_PROMPTS:,} prompts a bundle may ask to encode")
    return task


def stored_task_set(recipe, manifest: dict, where: str = "manifest.json") -> dict[str, Task]:
    """A bundle's tasks: the recipe's settings with the state the manifest stored. Bundles
    written before tasks were stored hold one task whose vocabulary is the manifest's."""
    settings = recipe_tasks(recipe)
    stored = manifest.get("tasks")
    if stored is None:
        name = next(iter(settings))
        stored = {name: {"type": settings[name].registry_name, "state": {"labels": manifest["vocabulary"]}}}
    if not isinstance(stored, dict) or list(stored) != list(settings):
        raise BundleError(f"{where}: its tasks ({', '.join(stored) if isinstance(stored, dict) else '?'}) differ from "
                          f"the recipe's ({', '.join(settings)})")
    tasks = {}
    for name, entry in stored.items():
        if not isinstance(entry, dict) or entry.get("type") != settings[name].registry_name:
            raise BundleError(f"{where}: task {name!r} is stored as another type than its recipe's")
        task = load_task(name, settings[name], _check_state(entry.get("state"), f"{where}: task {name!r}"), recipe.data.label_field)
        tasks[name] = _check_kind_state(task, f"{where}: task {name!r}")
    return tasks
