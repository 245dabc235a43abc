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

VQA_RAD_ENV = "MMPEFT_VQA_RAD_ROOT"
VQA_RAD_DEFAULT = "../shared/vqa_rad"
# data keys holding paths, and which of them each source needs
PATH_KEYS = ("root", "train", "eval", "test")
REQUIRED_BY_SOURCE = {"manifest": ("train", "test")}


def anchor_paths(raw: dict, folder: Path) -> None:
    """Make the relative data paths of a recipe file absolute, from ``folder`` (in place)."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str((folder / value).resolve())


def apply_environment(raw: dict) -> None:
    """``$MMPEFT_VQA_RAD_ROOT``, when set, replaces a VQA-RAD recipe's ``data.root`` (in place;
    command-line overrides, applied after, still win)."""
    data = raw.get("data")
    if isinstance(data, dict) and data.get("source") == "vqa_rad" and os.environ.get(VQA_RAD_ENV):
        data["root"] = os.environ[VQA_RAD_ENV]


def manifest_path(data, value: str) -> Path:
    """A manifest file's path: ``data.root / value`` for a relative value when root is set."""
    path = Path(value).expanduser()
    if data.root and not path.is_absolute():
        path = Path(data.root).expanduser() / path
    return path


def vqa_rad_dir(root: Optional[str]) -> Path:
    """The VQA-RAD folder: data.root, else $MMPEFT_VQA_RAD_ROOT, else ../shared/vqa_rad."""
    return Path(root or os.environ.get(VQA_RAD_ENV) or VQA_RAD_DEFAULT).expanduser()


def data_problems(recipe) -> list[str]:
    """Data files the recipe names that are not there, each with the absolute path tried
    and the key that named it (empty when everything is in place)."""
    data = recipe.data
    problems = []
    if data.source == "manifest":
        for key in ("train", "eval", "test"):
            value = getattr(data, key)
            if value is None:
                continue
            path = manifest_path(data, value)
            if not path.is_file():
                where = "a folder, not a file" if path.is_dir() else "not found"
                problems.append(f"data.{key}: {path.resolve()} {where} (relative paths in a recipe file are read from its "
                                f"folder, or from data.root when set; on the command line, from the working directory)")
    elif data.source == "vqa_rad":
        folder = vqa_rad_dir(data.root)
        if not (folder / "trainset.json").is_file():
            problems.append(
                f"data.root: VQA-RAD not found at {folder.resolve()} (no trainset.json). VQA-RAD (Lau et al. 2018, CC0) "
                "comes from OSF project 89kps (https://osf.io/89kps/); put images/, trainset.json and testset.json in one "
                f"directory and set data.root=<that directory> in the recipe or on the command line, or ${VQA_RAD_ENV}.")
    return problems


def require_data(recipe, source: Optional[str] = None) -> None:
    """Raise a :class:`~mmpeft.errors.RecipeError` listing :func:`data_problems`, if any."""
    problems = data_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
