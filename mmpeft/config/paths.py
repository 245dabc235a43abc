"""Where a recipe's data lives, and whether it is there (torch-free, so ``mmpeft validate``
checks it in a fraction of a second).

Relative paths written in a recipe file are read from the recipe file's folder, as most
tools read config-relative paths, so a recipe trains from any working directory. Paths
given on the command line (``data.train=...``) are relative to the working directory,
like any other command-line argument. ``data.root``, when set, is the folder that the
manifest paths are relative to instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import RecipeError
from .datasets import DATASET_SPECS, dataset_spec
from .tasks import data_blocks

def path_keys() -> tuple[str, ...]:
    """Every key that holds a path in some registered source (made absolute from the recipe file's folder)."""
    return tuple(dict.fromkeys(k for n in DATASET_SPECS.names() for k in DATASET_SPECS.get(n).path_keys))


def _raw_blocks(raw: dict) -> list[dict]:
    """A raw recipe's data blocks: its data: and each task's own."""
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    blocks = [raw.get("data")] + [t.get("data") for t in tasks.values() if isinstance(t, dict)]
    return [b for b in blocks if isinstance(b, dict)]


def anchor_paths(raw: dict, folder: Path) -> None:
    """Make the relative data paths of a recipe file absolute, from ``folder`` (in place)."""
    for data in _raw_blocks(raw):
        for key in path_keys():
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str((folder / value).resolve())


def apply_environment(raw: dict) -> None:
    """``$MMPEFT_VQA_RAD_ROOT`` (``$MMPEFT_FSDD_ROOT``), when set, replaces a VQA-RAD (FSDD)
    data block's ``root`` (in place; command-line overrides, applied after, still win)."""
    for data in _raw_blocks(raw):
        folder = DATASET_SPECS.get(data["source"]).folder if data.get("source") in DATASET_SPECS else None
        if folder and os.environ.get(folder[0]):
            data["root"] = os.environ[folder[0]]


def manifest_path(data, value: str) -> Path:
    """A manifest file's path: ``data.root / value`` for a relative value when root is set."""
    path = Path(value).expanduser()
    if data.root and not path.is_absolute():
        path = Path(data.root).expanduser() / path
    return path


def dataset_dir(source: str, root: Optional[str]) -> Path:
    """A built-in dataset's folder: data.root, else its environment variable, else its default."""
    return dataset_spec(source).folder_path(root)


def vqa_rad_dir(root: Optional[str]) -> Path:
    """The VQA-RAD folder: data.root, else $MMPEFT_VQA_RAD_ROOT, else ../shared/vqa_rad."""
    return dataset_dir("vqa_rad", root)


def dataset_missing(source: str, root: Optional[str]) -> Optional[str]:
    """Why a built-in dataset's folder cannot be used (None when it can)."""
    return dataset_spec(source).folder_missing(root)


def data_problems(recipe) -> list[str]:
    """Data files the recipe names that are not there, each with the absolute path tried
    and the key that named it (empty when everything is in place)."""
    problems = []
    for key, data in data_blocks(recipe).items():
        prefix = f"tasks.{key}.data" if key else "data"
        spec = dataset_spec(data.source)
        if spec.folder:
            missing = spec.folder_missing(data.root)
            if missing:
                problems.append(f"{prefix}.root: {missing}")
        for key in (k for k in spec.path_keys if k != "root"):
            value = getattr(data, key)
            if value is None:
                continue
            path = manifest_path(data, value)
            if not (path.is_file() if spec.path_is_file else path.exists()):
                where = "a folder, not a file" if path.is_dir() else "not found"
                problems.append(f"{prefix}.{key}: {path.resolve()} {where} (relative paths in a recipe file are read "
                                "from its folder, or from root when set; on the command line, from the working directory)")
    return problems


def require_data(recipe, source: Optional[str] = None) -> None:
    """Raise a :class:`~mmpeft.errors.RecipeError` listing :func:`data_problems`, if any."""
    problems = data_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
