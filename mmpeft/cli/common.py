"""What every command shares: the consoles, one clear message for a user's error (no
traceback), help that names each value's type in words, and quieting of dependencies'
notices."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.text import Text

from ..errors import MMPeftError

# Width follows the terminal (80 columns when output goes to a file or a pipe). Markup is
# off: messages are printed exactly as written, square brackets included; sentences are
# not hard-wrapped (soft_wrap), so a log line stays one line.
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
console = Console(highlight=False, markup=False, soft_wrap=True)

# Help shows each value's type in words (typer's own labels are <int>, <list[str]>, <bool>).
_TYPE_WORDS = {"<bool>": None, "<int>": "integer", "<float>": "number", "<str>": "text", "<path>": "path",
               "<list[str]>": "text ...", "<file>": "file", "<dir>": "folder"}


def _type_in_words(original):
    def display_type_rich(self, ctx):
        label = original(self, ctx)
        return _TYPE_WORDS.get(label, label.strip("<>") if label else label)

    return display_type_rich


def _usage_name(self) -> str:
    """Usage lines in the usual form: required arguments bare, optional ones in brackets
    (typer puts required ones in braces)."""
    name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
    return name + ("..." if self.nargs != 1 else "")


# Help cosmetics on typer's own hooks, where this typer has them (older ones, as a GPU
# image may carry, have other names: their help keeps typer's words).
for _param in (typer.core.TyperArgument, typer.core.TyperOption):
    if hasattr(_param, "display_type_rich"):
        _param.display_type_rich = _type_in_words(_param.display_type_rich)
if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name

OVERRIDES = "KEY=VALUE"


def friendly(func):
    """Print user errors as one clear message with a non-zero exit code (2 for input the
    user can fix, 1 for a failure at run time), no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MMPeftError as exc:
            err.print(Text.assemble(("error:", "bold red"), " ", str(exc)))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def device_of(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def recipe_with_data(recipe: Path, overrides):
    """Load a recipe and check that its data files are there, without loading torch."""
    from ..config import load_recipe
    from ..config.paths import require_data

    r = load_recipe(recipe, overrides or [])
    require_data(r, str(recipe))
    return r


def quiet_third_party() -> None:
    """Hide notices of dependencies that say nothing a user can act on."""
    import logging
    import warnings

    # bitsandbytes logs, on CPUs with AVX512-BF16, that an optional kernel package is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def test_line(task: str, kind: str, metrics: dict) -> str:
    """One line of a bundle's stored test metrics: the numbers its task kind declares
    (``metrics`` of its settings), whatever the kind."""
    from ..config import TASK_SETTINGS

    declared = TASK_SETTINGS.get(kind).metrics if kind in TASK_SETTINGS else tuple(metrics)
    values = [f"{m} {metrics[m]:.4f}" for m in declared
              if isinstance(metrics.get(m), (int, float)) and not isinstance(metrics.get(m), bool)]
    return f"test {task} ({kind}): " + ("  ".join(values) or "no numbers stored") + f"  n={metrics.get('count', '?')}"


def print_answers(result: dict) -> None:
    """A prediction as ``predict`` prints it: the answer, then its top-k with probabilities
    (each task's, for several); other kinds as their JSON."""
    for name, answer in (result["tasks"].items() if "tasks" in result else [(None, result)]):
        if name is not None:
            console.print(f"{name}:")
        if "answer" in answer and "top_k" in answer:
            console.print(answer["answer"], style="bold")  # (rich printed Text("no", style="bold") as "No")
            for alt in answer["top_k"]:
                console.print(f"  {alt['probability']:.4f}  {alt['answer']}")
        else:
            console.print(json.dumps(answer))


def check_input_columns(bundle: Path, manifest: Path, given: dict) -> dict:
    """The columns ``predict --input`` reads (``given``, else those the bundle's recipe named),
    checked in every row of ``manifest`` without loading torch, so a wrong column is named
    before the model loads; returns ``{modality: column}``."""
    from ..config import load_recipe
    from ..config.inputs import encoder_modality
    from ..data import read_rows
    from ..errors import DataError

    recipe_file = Path(bundle) / "recipe.yaml"
    recipe = load_recipe(recipe_file, anchor=False) if recipe_file.is_file() else None
    data = recipe.data if recipe else None
    trained = {"image": data.image_field if data else "image", "text": data.text_field if data else "question",
               "audio": data.audio_field if data else "audio", "video": data.video_field if data else "video"}
    fields = {m: given.get(m) or trained[m] for m in trained}
    own = data.encoder_fields if data else {}
    reads = {encoder_modality(cfg) for name, cfg in (recipe.encoders.items() if recipe else ()) if name not in own}
    needed = [fields[m] for m in ("image", "text", "audio", "video") if m in reads] + list(own.values())
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"input manifest not found: {path.resolve()}")
    for number, row in read_rows(path):
        missing = [c for c in needed if not isinstance(row, dict) or row.get(c) is None
                   or row.get(c) == "" and c != fields["text"]]  # an empty question is a question
        if missing:
            has = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}, row {number}: needs field(s) {', '.join(map(repr, missing))} (the bundle reads the column(s) "
                            f"{', '.join(map(repr, needed))}, as its recipe named them; the row has: {has}; other names: "
                            "--image-field / --text-field / --audio-field / --video-field)")
    return fields
