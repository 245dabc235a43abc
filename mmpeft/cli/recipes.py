"""``mmpeft recipes list`` / ``mmpeft recipes copy NAME [DEST]``: the recipes that ship inside
the package (``mmpeft/recipes``, this repository's ``recipes/`` folder), listed and copied out
to edit, as torchtune's ``tune ls`` / ``tune cp`` do."""

from __future__ import annotations

import difflib
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .common import console, friendly

recipes_app = typer.Typer(no_args_is_help=True, help="The recipes shipped with mmpeft: list them, copy one out to edit.")


def shipped() -> dict[str, Path]:
    """Recipe name -> its file in the installed package."""
    folder = Path(str(files("mmpeft") / "recipes"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def summary(path: Path) -> str:
    """The recipe's first comment line (what it is)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


@recipes_app.command("list")
@friendly
def list_recipes():
    """Every shipped recipe and what it is."""
    found = shipped()
    if not found:
        raise UsageError("no recipes found in this installation of mmpeft (mmpeft/recipes is missing)")
    width = max(map(len, found))
    for name, path in found.items():
        console.print(f"{name:<{width}}  {summary(path)}", highlight=False, markup=False)


@recipes_app.command("copy")
@friendly
def copy_recipe(name: str = typer.Argument(..., help="a name from `mmpeft recipes list`"),
                dest: Optional[Path] = typer.Argument(None, help="a .yaml file, or a folder (made if missing) to write NAME.yaml in (default: ./NAME.yaml)"),
                overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file")):
    """Copy a shipped recipe out to edit (its relative data paths are read from its new folder)."""
    found = shipped()
    name = name.removesuffix(".yaml")
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        raise UsageError(f"no shipped recipe {name!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
                         f" (have: {', '.join(found)})")
    target = Path(dest) if dest is not None else Path(f"{name}.yaml")
    if target.is_dir() or dest is not None and not target.exists() and target.suffix not in (".yaml", ".yml"):
        target = target / f"{name}.yaml"
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; pass --overwrite or choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[name], target)
    console.print(f"wrote {target}; train it with: mmpeft finetune {target}", highlight=False, markup=False)
