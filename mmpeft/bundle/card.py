"""The bundle's README.md model card."""

from __future__ import annotations

from pathlib import Path

from ..config import TASK_SETTINGS
from ..config.datasets import dataset_spec


def _answers(kind: str) -> bool:
    return kind in TASK_SETTINGS and TASK_SETTINGS.get(kind).single_answer


def write_card(directory: Path, manifest: dict, metrics: dict, recipe, name: str | None = None) -> None:
    """Write ``directory/README.md``. ``name`` is the folder a user will type in the usage
    lines (training writes into a temporary folder, renamed once complete)."""
    folder = name or directory.name
    test = metrics["test"]
    lines = [
        f"# {manifest['run_name']}: mmpeft adapter bundle",
        "",
        f"Task: {manifest['task']}" + (f" over {len(manifest['vocabulary'])} answers. " if _answers(manifest['task']) else ". ") +
        f"Data: `{recipe.data.source}` ({metrics['data']['train']} train / {metrics['data']['eval']} validation / "
        f"{metrics['data']['test']} test rows).",
        "",
        *dataset_spec(recipe.data.source).card_lines(recipe.data),
        "## Encoders and methods",
        "",
        "| encoder | base model | method | trainable params | total params | quantization |",
        "|---|---|---|---:|---:|---|",
    ]
    for name, e in manifest["encoders"].items():
        q = e["quantization"]
        qs = f"{q['bits']}-bit {q['quant_type'] if q['bits'] == 4 else ''}".strip() if q else "none"
        lines.append(f"| {name} | `{e['model']}` | {e['method']} | {e['trainable_parameters']:,} | {e['total_parameters']:,} | {qs} |")
    lines += [f"| head | {manifest['head']['type']} fusion | trained | {manifest['head']['parameters']:,} | | |", ""]
    lines += ["## Test metrics", ""]
    every = metrics.get("tasks") or {"answer": test}
    for task, m in every.items():
        if len(every) > 1:
            lines += [f"Task `{task}` ({manifest.get('tasks', {}).get(task, {}).get('type', '')}):", ""]
        if "accuracy" in m and "macro_f1" in m:
            lines += [f"- accuracy: {100 * m['accuracy']:.2f}% (n={m['count']})", f"- macro-F1: {100 * m['macro_f1']:.2f}%"]
            for field, values in m.get("groups", {}).items():
                lines += [f"- {field}={value}: {100 * g['accuracy']:.2f}% (n={g['count']})" for value, g in values.items()]
            if m.get("out_of_vocab"):
                lines.append(f"- {m['out_of_vocab']} test answers never occur in training; they are kept and scored wrong.")
        else:
            lines += [f"- {key}: {value:.4f}" for key, value in m.items()
                      if isinstance(value, float) and "_to_" not in key] + [f"- rows scored: {m.get('count')}"]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```bash",
        f"mmpeft predict {folder} --image IMAGE.jpg --question \"...\"",
        f"mmpeft evaluate {folder}      # reproduces the metrics above",
        f"mmpeft merge {folder} --out merged/",
        "```",
        "",
        "```python",
        "import mmpeft",
        f"bundle = mmpeft.load_bundle(\"{folder}\")",
        "```",
        "",
        "Base encoders are not included: they are loaded from their sources and checked against the "
        "fingerprints in `manifest.json`. Files are safetensors and JSON only.",
        "",
        "Intended use: research. Not a medical device; not for diagnosis.",
    ]
    (directory / "README.md").write_text("\n".join(lines) + "\n")
