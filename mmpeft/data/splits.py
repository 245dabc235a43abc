"""A recipe's rows: each data block read by its source, split into train / validation /
test (torch-free: ``mmpeft validate`` reads and checks them without loading a model)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..config.inputs import own_columns, recipe_inputs
from ..config.tasks import data_blocks, recipe_tasks, task_dataset
from ..errors import DataError
from .samples import Sample
from .sources import DATASETS, RowRequest


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    test: list[Sample]


def load_splits(data, group_fields, seed: int, inputs=("image", "text"), targets=(), label_required: bool = True,
                own=None) -> Splits:
    """Load train/eval/test rows for a recipe's ``data:`` block; ``inputs`` are the modalities
    its encoders read (:func:`~mmpeft.config.inputs.recipe_inputs`), ``own`` the encoders that
    read a column of their own (:func:`~mmpeft.config.inputs.own_columns`); ``targets`` and
    ``label_required``: the columns its tasks read (:func:`task_columns`).

    Without an eval file, ``eval_fraction`` of the (shuffled) training rows is held out.
    """
    request = RowRequest(tuple(inputs), tuple(targets), label_required, own, list(group_fields), seed)
    train, eval_rows, test = DATASETS.get(data.source)().read(data, request)
    rng = random.Random(seed)
    train = list(train)
    rng.shuffle(train)
    if eval_rows is None:
        n_eval = int(round(len(train) * data.eval_fraction))
        eval_rows, train = train[:n_eval], train[n_eval:]
    if data.max_train_samples:
        train = train[: data.max_train_samples]
    if data.max_eval_samples:
        eval_rows = eval_rows[: data.max_eval_samples]
    if data.max_test_samples:
        test = test[: data.max_test_samples]
    if not train:
        raise DataError(f"no training rows (check data.train{_named(data, 'train')} and data.max_train_samples)")
    if not test:
        raise DataError(f"no test rows (check data.test{_named(data, 'test')})")
    return Splits(train, eval_rows, test)


def task_columns(tasks: dict, label: str, only: bool) -> tuple[list[str], bool]:
    """``(columns kept raw for the tasks, whether every row needs the label column)`` for the
    tasks (settings by name) reading one data block whose label column is ``label``; ``only``:
    they are the recipe's only task. The label column is required when the one task reads
    it; a column of a kind that is not one answer (lists, numbers), or any column besides
    the label, is kept raw."""
    columns = []
    for settings in tasks.values():
        for column in (settings.field or (label if settings.has_target else None), *settings.extra_columns()):
            answer_kind = settings.single_answer and column == label
            if column and not answer_kind and column not in columns:
                columns.append(column)
    first = next(iter(tasks.values()))
    required = only and first.has_target and (first.field or label) == label
    return columns, required


def group_fields(tasks: dict) -> list[str]:
    """Every task's group fields, in order, once."""
    return list(dict.fromkeys(f for settings in tasks.values() for f in settings.group_fields))


def recipe_splits(recipe) -> Splits:
    """:func:`load_splits` for a whole recipe: each data block it reads (its data:, each task's
    own) with the inputs of the encoders reading it and the columns of its tasks. Rows of a
    task's own data carry its name in ``Sample.dataset``; the splits are the blocks' rows in turn."""
    every = recipe_tasks(recipe)
    parts = []
    for key, data in data_blocks(recipe).items():
        tasks = {n: s for n, s in every.items() if task_dataset(n, s) == key}
        names = list(dict.fromkeys(e for s in tasks.values() for e in (s.encoders or recipe.encoders)))
        if len(parts) == 0 and key == "" and len(tasks) == len(every):
            names = list(recipe.encoders)  # one dataset: every row has every encoder's input (as always)
        targets, required = task_columns(tasks, data.label_field, len(every) == 1)
        own = own_columns(recipe, data, names)
        split = load_splits(data, group_fields(tasks), recipe.train.seed, recipe_inputs(recipe, names, own), targets,
                            required, own)
        if key:
            split = Splits(*([replace(s, dataset=key) for s in rows] for rows in (split.train, split.eval, split.test)))
        parts.append(split)
    if len(parts) == 1:
        return parts[0]
    return Splits(*([s for part in parts for s in getattr(part, split)] for split in ("train", "eval", "test")))


def _named(data, key: str) -> str:
    value = getattr(data, key, None)
    return f": {value}" if value else ""
