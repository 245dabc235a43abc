"""Generate the README's recipe reference from the schema (so docs cannot drift).

``python -m mmpeft.docs`` prints the Markdown; a test checks README.md contains it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import FUSION_SETTINGS, METHOD_SETTINGS, TASK_SETTINGS
from .config.datasets import DATASET_SPECS
from .config.schema import AudioConfig, DataConfig, EncoderConfig, OutputConfig, QuantizationConfig, Recipe, TrainConfig


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            return f"`{json.dumps(field.default_factory())}`"
        return "required"
    return f"`{json.dumps(field.default)}`"


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
        rows.append(f"| `{prefix}{name}` | {default} | {field.description or ''} |")
    return rows


def recipe_reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += _rows("", Recipe, skip=("encoders", "fusion", "task", "tasks", "data", "train", "output"))
    lines += _rows("encoders.<name>.", EncoderConfig, skip=("quantization", "audio"))
    lines += _rows("encoders.<name>.audio.", AudioConfig)
    lines += _rows("encoders.<name>.quantization.", QuantizationConfig)
    for method in METHOD_SETTINGS.names():
        for name, field in METHOD_SETTINGS.get(method).model_fields.items():
            lines.append(f"| `encoders.<name>.peft.{name}` (method `{method}`) | {_default(field)} | {field.description or ''} |")
    for fusion in FUSION_SETTINGS.names():
        for name, field in FUSION_SETTINGS.get(fusion).model_fields.items():
            lines.append(f"| `fusion.{name}` (type `{fusion}`) | {_default(field)} | {field.description or ''} |")
    lines += _rows("", Recipe, skip=tuple(k for k in Recipe.model_fields if k not in ("task", "tasks")))
    kinds = [TASK_SETTINGS.get(k) for k in TASK_SETTINGS.names()]
    shared = [n for n in kinds[0].model_fields if all(n in k.model_fields for k in kinds)]  # every kind's
    for name in (n for n in shared if n != "metric"):
        field = kinds[0].model_fields[name]
        lines.append(f"| `task.{name}` (every type) | {_default(field)} | {field.description or ''} |")
    for kind in TASK_SETTINGS.names():
        cls = TASK_SETTINGS.get(kind)
        for name, field in cls.model_fields.items():
            if name not in shared or name == "metric":
                meaning = f"{field.description or ''} (one of: {', '.join(cls.metrics)})" if name == "metric" else field.description or ""
                lines.append(f"| `task.{name}` (type `{kind}`) | {_default(field)} | {meaning} |")
    required = {}
    for source in DATASET_SPECS.names():
        for key in DATASET_SPECS.get(source).required:
            required.setdefault(key, []).append(source)
    lines += _rows("data.", DataConfig, required=required)
    lines += _rows("train.", TrainConfig)
    lines += _rows("output.", OutputConfig)
    return "\n".join(lines + [""] + data_sources())


def data_sources() -> list[str]:
    """One row per registered data source: what it is and the data keys of its own."""
    lines = ["Data sources (`data.source`); every source also reads the keys shared by all "
             "(eval_fraction, on_bad_image, on_bad_audio, image_cache_mb, max_*_samples, group_by_image, augment):", "",
             "| source | what it is | keys of its own |", "|---|---|---|"]
    for name in DATASET_SPECS.names():
        spec = DATASET_SPECS.get(name)
        doc = " ".join((spec.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"| `{name}` | {doc} | {', '.join(f'`{k}`' for k in spec.keys) or '-'} |")
    return lines


START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the block between the markers; returns True if the file changed."""
    text = Path(path).read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{recipe_reference()}\n{END}{tail}"
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--write":
        print("updated" if update_readme(sys.argv[2]) else "up to date")
    else:
        print(recipe_reference())
