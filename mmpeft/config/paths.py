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
from .tasks import data_blocks

VQA_RAD_ENV = "MMPEFT_VQA_RAD_ROOT"
VQA_RAD_DEFAULT = "../shared/vqa_rad"
# built-in datasets read from a folder: (environment variable, default folder, a file it must hold, where it comes from)
DATASET_FOLDERS = {
    "vqa_rad": (VQA_RAD_ENV, VQA_RAD_DEFAULT, "trainset.json",
                "VQA-RAD (Lau et al. 2018, CC0) comes from OSF project 89kps (https://osf.io/89kps/); put images/, "
                "trainset.json and testset.json in one directory"),
    "fsdd": ("MMPEFT_FSDD_ROOT", "../shared/fsdd", "recordings",
             "The Free Spoken Digit Dataset (CC BY-SA 4.0) comes from github.com/Jakobovski/free-spoken-digit-dataset; "
             "put its recordings/ folder in one directory"),
}
# data keys holding paths, and which of them each source needs
PATH_KEYS = ("root", "train", "eval", "test")
REQUIRED_BY_SOURCE = {"manifest": ("train", "test")}


def _raw_blocks(raw: dict) -> list[dict]:
    """A raw recipe's data blocks: its data: and each task's own."""
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    blocks = [raw.get("data")] + [t.get("data") for t in tasks.values() if isinstance(t, dict)]
    return [b for b in blocks if isinstance(b, dict)]


def anchor_paths(raw: dict, folder: Path) -> None:
    """Make the relative data paths of a recipe file absolute, from ``folder`` (in place)."""
    for data in _raw_blocks(raw):
        for key in PATH_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str((folder / value).resolve())


def apply_environment(raw: dict) -> None:
    """``$MMPEFT_VQA_RAD_ROOT`` (``$MMPEFT_FSDD_ROOT``), when set, replaces a VQA-RAD (FSDD)
    data block's ``root`` (in place; command-line overrides, applied after, still win)."""
    for data in _raw_blocks(raw):
        if isinstance(data.get("source"), str) and data["source"] in DATASET_FOLDERS:
            env = DATASET_FOLDERS[data["source"]][0]
            if os.environ.get(env):
                data["root"] = os.environ[env]


def manifest_path(data, value: str) -> Path:
    """A manifest file's path: ``data.root / value`` for a relative value when root is set."""
    path = Path(value).expanduser()
    if data.root and not path.is_absolute():
        path = Path(data.root).expanduser() / path
    return path


def dataset_dir(source: str, root: Optional[str]) -> Path:
    """A built-in dataset's folder: data.root, else its environment variable, else its default."""
    env, default, _, _ = DATASET_FOLDERS[source]
    return Path(root or os.environ.get(env) or default).expanduser()


def vqa_rad_dir(root: Optional[str]) -> Path:
    """The VQA-RAD folder: data.root, else $MMPEFT_VQA_RAD_ROOT, else ../shared/vqa_rad."""
    return dataset_dir("vqa_rad", root)


def dataset_missing(source: str, root: Optional[str]) -> Optional[str]:
    """Why a built-in dataset's folder cannot be used (None when it can)."""
    env, _, marker, origin = DATASET_FOLDERS[source]
    folder = dataset_dir(source, root)
    if (folder / marker).exists():
        return None
    name = {"vqa_rad": "VQA-RAD", "fsdd": "FSDD"}[source]
    return (f"{name} not found at {folder.resolve()} (no {marker}). {origin} and set data.root=<that directory> in the "
            f"recipe or on the command line, or ${env}.")


def data_problems(recipe) -> list[str]:
    """Data files the recipe names that are not there, each with the absolute path tried
    and the key that named it (empty when everything is in place)."""
    problems = []
    for key, data in data_blocks(recipe).items():
        prefix = f"tasks.{key}.data" if key else "data"
        if data.source == "manifest":
            for split in ("train", "eval", "test"):
                value = getattr(data, split)
                if value is None:
                    continue
                path = manifest_path(data, value)
                if not path.is_file():
                    where = "a folder, not a file" if path.is_dir() else "not found"
                    problems.append(f"{prefix}.{split}: {path.resolve()} {where} (relative paths in a recipe file are read "
                                    "from its folder, or from root when set; on the command line, from the working directory)")
        elif data.source in DATASET_FOLDERS:
            missing = dataset_missing(data.source, data.root)
            if missing:
                problems.append(f"{prefix}.root: {missing}")
    return problems


def require_data(recipe, source: Optional[str] = None) -> None:
    """Raise a :class:`~mmpeft.errors.RecipeError` listing :func:`data_problems`, if any."""
    problems = data_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
