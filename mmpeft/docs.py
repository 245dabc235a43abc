"""Generate the manual's reference pages from the code, so the documentation cannot drift.

- ``docs/reference/recipe.md``: every recipe key, its default and its meaning (the schema);
- ``docs/reference/registries.md``: every registered method, fusion head and task, with the
  first sentence of its class's docstring and its settings (the registries).

``python -m mmpeft.docs`` prints the recipe reference (``--registries``: the registries' tables);
``python -m mmpeft.docs --write [ROOT]`` rewrites the block between each page's markers under
ROOT (default: the current folder), keeping the hand-written text around it; ``--check [ROOT]``
exits 1 naming the pages that are out of date. tests/test_docs.py keeps both in sync.
"""

from __future__ import annotations

import argparse
import html
import inspect
import json
import re
import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import FUSION_SETTINGS, METHOD_SETTINGS, TASK_SETTINGS
from .config.datasets import DATASET_SPECS
from .config.schema import (AudioConfig, DataConfig, EncoderConfig, OutputConfig, QuantizationConfig, Recipe,
                            TrainConfig, VideoConfig)
from .encoders.families import ENCODER_FAMILIES
from .fusion import FUSIONS
from .methods import METHODS
from .tasks import TASKS


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            return f"`{json.dumps(field.default_factory())}`"
        return "required"
    return f"`{json.dumps(field.default)}`"


def _cell(text: str) -> str:
    """Text as one Markdown table cell: RST double backticks become code spans and pipes do not
    split the cell: ``\\|`` outside code, and a code span holding one as HTML with ``&#124;``
    (GitHub and MkDocs disagree on ``\\|`` inside a code span)."""
    parts = text.replace("``", "`").strip().split("`")
    for i, part in enumerate(parts):
        if i % 2 == 0:
            parts[i] = part.replace("|", "\\|")
        elif "|" in part:
            parts[i] = f"<code>{html.escape(part, quote=False).replace('|', '&#124;')}</code>"
        else:
            parts[i] = f"`{part}`"
    return "".join(parts)


def _row(key: str, field, note: str = "", default: str | None = None, meaning: str | None = None) -> str:
    """One key's row; ``note`` follows the key, e.g. `` (method `lora`)``."""
    default = _default(field) if default is None else default
    meaning = field.description or "" if meaning is None else meaning
    return f"| `{key}`{note} | {_cell(default)} | {_cell(meaning)} |"


def _rows(prefix: str, model: type[BaseModel], skip=(), required: dict | None = None) -> list[str]:
    """One row per key; ``required`` maps keys to the sources that require them."""
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = _default(field)
        needed_by = (required or {}).get(name)
        if needed_by:
            default = f"required with source {', '.join(f'`{s}`' for s in needed_by)}; else {default}"
        rows.append(_row(f"{prefix}{name}", field, default=default))
    return rows


def recipe_reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += _rows("", Recipe, skip=("encoders", "fusion", "task", "tasks", "data", "train", "output"))
    lines += _rows("encoders.<name>.", EncoderConfig, skip=("quantization", "audio", "video"))
    lines += _rows("encoders.<name>.audio.", AudioConfig)
    lines += _rows("encoders.<name>.video.", VideoConfig)
    lines += _rows("encoders.<name>.quantization.", QuantizationConfig)
    for method in METHOD_SETTINGS.names():
        for name, field in METHOD_SETTINGS.get(method).model_fields.items():
            lines.append(_row(f"encoders.<name>.peft.{name}", field, f" (method `{method}`)"))
    for fusion in FUSION_SETTINGS.names():
        for name, field in FUSION_SETTINGS.get(fusion).model_fields.items():
            lines.append(_row(f"fusion.{name}", field, f" (type `{fusion}`)"))
    lines += _rows("", Recipe, skip=tuple(k for k in Recipe.model_fields if k not in ("task", "tasks")))
    kinds = [TASK_SETTINGS.get(k) for k in TASK_SETTINGS.names()]
    shared = [n for n in kinds[0].model_fields if all(n in k.model_fields for k in kinds)]  # every kind's
    for name in (n for n in shared if n != "metric"):
        lines.append(_row(f"task.{name}", kinds[0].model_fields[name], " (every type)"))
    for kind in TASK_SETTINGS.names():
        cls = TASK_SETTINGS.get(kind)
        for name, field in cls.model_fields.items():
            if name not in shared or name == "metric":
                meaning = f"{field.description or ''} (one of: {', '.join(cls.metrics)})" if name == "metric" else None
                lines.append(_row(f"task.{name}", field, f" (type `{kind}`)", meaning=meaning))
    required = {}
    for source in DATASET_SPECS.names():
        for key in DATASET_SPECS.get(source).required:
            required.setdefault(key, []).append(source)
    lines += _rows("data.", DataConfig, required=required)
    lines += _rows("train.", TrainConfig)
    lines += _rows("output.", OutputConfig)
    return "\n".join(lines)


def data_sources() -> str:
    """One row per registered data source: what it is and the data keys of its own."""
    lines = ["## Data sources", "", "`data.source` (and a task's own `data.source`): one of these. Every one also reads "
             "the keys all share (`eval_fraction`, `on_bad_image`, `on_bad_audio`, `image_cache_mb`, `max_*_samples`, "
             "`group_by_image`, `augment`); a key of another source is refused by name.", "",
             "| name | what it is | keys of its own | settings class |", "|---|---|---|---|"]
    for name in DATASET_SPECS.names():
        spec = DATASET_SPECS.get(name)
        lines.append(f"| `{name}` | {_cell(summary(spec))} | {', '.join(f'`{k}`' for k in spec.keys) or '-'} "
                     f"| `{spec.__module__}.{spec.__qualname__}` |")
    return "\n".join(lines)


def encoder_families() -> str:
    """One row per registered encoder family, in the order they are asked."""
    names = sorted(ENCODER_FAMILIES.names(), key=lambda n: (ENCODER_FAMILIES.get(n).order, n))
    lines = ["## Encoder families", "", "`encoders.<name>.model` is offered to each family in this order; the first "
             "that claims it loads it.", "", "| name | what it loads | class |", "|---|---|---|"]
    for name in names:
        cls = ENCODER_FAMILIES.get(name)
        lines.append(f"| `{name}` | {_cell(summary(cls))} | `{cls.__module__}.{cls.__qualname__}` |")
    return "\n".join(lines)


START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"
REGISTRIES_START, REGISTRIES_END = "<!-- registries:start -->", "<!-- registries:end -->"
RECIPE_PAGE, REGISTRIES_PAGE = "docs/reference/recipe.md", "docs/reference/registries.md"



def summary(cls) -> str:
    """The first sentence of the class's own docstring (else of its module's)."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _registries():
    """(title, what a recipe sets, code registry, settings registry, keys every entry shares)."""
    shared = set.intersection(*(set(TASK_SETTINGS.get(n).model_fields) for n in TASK_SETTINGS.names()))
    return [
        ("PEFT methods", "`encoders.<name>.peft.method`", METHODS, METHOD_SETTINGS, set()),
        ("Fusion heads", "`fusion.type` (and a task's `head.type`)", FUSIONS, FUSION_SETTINGS, set()),
        ("Tasks", "`task.type` (and `type` in each block of `tasks:`)", TASKS, TASK_SETTINGS, shared - {"metric"}),
    ]


def registry_reference() -> str:
    """One table per registry: each registered name, what its class says it is, its settings."""
    parts = []
    for title, key, registry, settings, shared in _registries():
        lines = [f"## {title}", "", f"{key}: one of these.", ""]
        if shared:
            lines[-1:] = [f"Every one also takes {', '.join(f'`{k}`' for k in sorted(shared))}.", ""]
        lines += ["| name | what it is | settings | class |", "|---|---|---|---|"]
        for name in registry.names():
            cls = registry.get(name)
            keys = [k for k in settings.get(name).model_fields if k not in shared] if name in settings else []
            lines.append(f"| `{name}` | {_cell(summary(cls))} | {', '.join(f'`{k}`' for k in keys) or '-'} "
                         f"| `{cls.__module__}.{cls.__qualname__}` |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts[:1] + [method_abilities()] + parts[1:] + [data_sources(), encoder_families()])


def method_abilities() -> str:
    """What each method declares it can do (the flags code outside the methods asks)."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = ["### What each method can do", "",
             "Declared by each method (its flags); the recipe check, merge and the tests read them.", "",
             "| method | equals its base at init | merges | trains the encoder | 4/8-bit base | on a decoder | layers | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for name in METHODS.names():
        cls = METHODS.get(name)
        layers = cls.layer_kinds or "-"
        lines.append(f"| `{name}` | {yes(cls.identity_at_init)} | {yes(cls.mergeable)} | {yes(cls.trains_encoder)} "
                     f"| {yes(cls.quantized_base)} | {yes(cls.for_decoder)} | {_cell(layers)} | {_cell(cls.paper)} |")
    return "\n".join(lines)


def generated() -> dict[str, tuple[str, str, str]]:
    """Each generated page (relative to the repository root): its markers and its block."""
    return {RECIPE_PAGE: (START, END, recipe_reference()),
            REGISTRIES_PAGE: (REGISTRIES_START, REGISTRIES_END, registry_reference())}


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"expected one {start} before one {end}")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{block}\n{end}{tail}"


def stale_pages(root: str | Path = ".", write: bool = False) -> list[str]:
    """The generated pages under ``root`` that are out of date (rewritten when ``write``)."""
    stale = []
    for page, (start, end, block) in generated().items():
        path = Path(root) / page
        text = path.read_text()
        new = replace_block(text, start, end, block)
        if new != text:
            stale.append(page)
            if write:
                path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmpeft.docs", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="ROOT", nargs="?", const=".", help="rewrite the generated pages")
    action.add_argument("--check", metavar="ROOT", nargs="?", const=".", help="exit 1 if a page is out of date")
    action.add_argument("--registries", action="store_true", help="print the registries' tables")
    args = parser.parse_args(argv)
    if args.write or args.check:
        stale = stale_pages(args.write or args.check, write=bool(args.write))
        verb = "updated" if args.write else "out of date (run: python -m mmpeft.docs --write)"
        print("\n".join(f"{page}: {verb}" for page in stale) or "up to date")
        return 1 if stale and args.check else 0
    print(registry_reference() if args.registries else recipe_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
