"""The ``mmpeft`` command line: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import MMPeftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning of multimodal models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (comparison of methods, memory, VQA-RAD).")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def friendly(func):
    """Print user errors as one clear message with a non-zero exit code, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MMPeftError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@app.command()
@friendly
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides")):
    """Check a recipe without loading any model."""
    from .config import load_recipe

    r = load_recipe(recipe, overrides or [])
    methods = ", ".join(f"{n}: {c.model} + {c.peft['method']}" for n, c in r.encoders.items())
    out.print(f"{recipe}: OK ({methods}; fusion {r.fusion['type']}; task {r.task.type}; data {r.data.source})")


@app.command()
@friendly
def finetune(recipe: Path = typer.Argument(..., help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. train.epochs=1"),
             dry_run: bool = typer.Option(False, "--dry-run", help="build the model, print methods and parameter counts, stop"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of the same name")):
    """Train a recipe and write its adapter bundle to adapters/<name>/."""
    from .train import finetune as run

    run(recipe, overrides or [], dry_run=dry_run, overwrite=overwrite or None)


@app.command()
@friendly
def evaluate(bundle: Path = typer.Argument(..., help="bundle directory"),
             overrides: Optional[List[str]] = typer.Argument(None, help="e.g. data.root=/path/to/vqa_rad"),
             device: str = typer.Option("auto", help="cpu, cuda or auto"),
             allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch")):
    """Rebuild a bundle's model and reproduce its stored test metrics."""
    from .inference import evaluate_bundle
    from .report import print_test

    result = evaluate_bundle(bundle, overrides or [], _device(device), allow_base_mismatch)
    print_test(result["metrics"], result["group_fields"])
    diff = result["max_abs_diff"]
    out.print(f"stored accuracy {100 * result['stored']['accuracy']:.2f}%, now {100 * result['metrics']['accuracy']:.2f}%; "
              f"max difference over reported metrics {diff:.2e} -> {'reproduced' if diff < 1e-9 else 'DIFFERENT'}")
    if diff >= 1e-9:
        raise typer.Exit(1)


@app.command()
@friendly
def predict(bundle: Path = typer.Argument(..., help="bundle (or merged model) directory"),
            image: Optional[Path] = typer.Option(None, help="image file"),
            question: Optional[str] = typer.Option(None, help="question / text"),
            input: Optional[Path] = typer.Option(None, "--input", help="manifest (.jsonl/.csv/.json) with image and question fields"),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write predictions (.jsonl or .csv)"),
            top_k: int = typer.Option(3, help="answers to show"),
            image_field: str = typer.Option("image"), text_field: str = typer.Option("question"),
            device: str = typer.Option("auto"),
            allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch")):
    """Answer a question about an image (or every row of a manifest)."""
    from .inference import Predictor, predict_manifest

    if input is None and (image is None or question is None):
        raise MMPeftError("give --image and --question, or --input manifest.jsonl")
    predictor = Predictor(bundle, _device(device), allow_base_mismatch)
    if input is not None:
        results = predict_manifest(predictor, input, output, top_k, image_field, text_field)
        out.print(f"{len(results)} predictions" + (f" written to {output}" if output else ""))
        if output is None:
            for r in results:
                print(json.dumps(r))
        return
    result = predictor.predict([str(image)], [question], top_k)[0]
    out.print(f"[bold]{result['answer']}[/]")
    for alt in result["top_k"]:
        out.print(f"  {alt['probability']:.4f}  {alt['answer']}")


@app.command()
@friendly
def inspect(bundle: Path = typer.Argument(..., help="bundle directory")):
    """Show a bundle's methods, parameters, base fingerprints, metrics and files."""
    from .bundle.io import read_manifest, verify_files
    from rich.table import Table

    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    out.print(f"[bold]{bundle}[/]  run {manifest['run_name']}  task {manifest['task']}  vocabulary {len(manifest['vocabulary'])}  "
              f"created {manifest['created']}  versions {manifest['versions']}")
    table = Table(title="encoders")
    for col in ("name", "base model", "method", "trainable", "total", "quantization", "fingerprint"):
        table.add_column(col)
    for name, e in manifest["encoders"].items():
        q = e.get("quantization")
        table.add_row(name, e["model"], e["method"], f"{e['trainable_parameters']:,}", f"{e['total_parameters']:,}",
                      f"{q['bits']}-bit" if q else "-", e["fingerprint"][:23] + "...")
    table.add_row("head", manifest["head"]["type"], "trained", f"{manifest['head']['parameters']:,}", "", "", "")
    out.print(table)
    metrics_path = Path(bundle) / "metrics.json"
    if metrics_path.is_file():
        test = json.loads(metrics_path.read_text())["test"]
        out.print(f"test accuracy {100 * test['accuracy']:.2f}%  macro-F1 {100 * test['macro_f1']:.2f}%  n={test['count']}")
    files = Table(title="files")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for rel, info in manifest["files"].items():
        files.add_row(rel, f"{info['bytes']:,}")
    out.print(files)
    total = sum(i["bytes"] for i in manifest["files"].values())
    out.print(f"total {total / 1e6:.2f} MB")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
