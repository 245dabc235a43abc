"""The ``mmpeft`` command line: a thin layer over the Python API.

The CLI is the top layer and nothing imports it. Each command imports its implementation
when it runs (the one place in the package where the package's own modules are imported
inside functions), so that ``--help``, ``--version`` and ``validate`` answer without
loading torch.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import MMPeftError, UsageError
from .version import __version__

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning of multimodal models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (comparison of methods, memory, VQA-RAD).")
app.add_typer(bench_app, name="bench")
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


for _param in (typer.core.TyperArgument, typer.core.TyperOption):
    _param.display_type_rich = _type_in_words(_param.display_type_rich)
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


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _show_version(value: bool) -> None:
    if value:
        console.print(f"mmpeft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                              help="print the version and exit")):
    """Parameter-efficient fine-tuning of multimodal models."""


def _recipe_with_data(recipe: Path, overrides):
    """Load a recipe and check that its data files are there, without loading torch."""
    from .config import load_recipe
    from .config.paths import require_data

    r = load_recipe(recipe, overrides or [])
    require_data(r, str(recipe))
    return r


@app.command()
@friendly
def validate(recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Check a recipe and that its data files exist, without loading any model."""
    r = _recipe_with_data(recipe, overrides)
    from .config import recipe_tasks

    methods = ", ".join(f"{n}: {c.model} + {c.peft['method']}" for n, c in r.encoders.items())
    tasks = ", ".join(f"{n}: {t.registry_name}" for n, t in recipe_tasks(r).items())
    console.print(f"{recipe}: OK ({methods}; fusion {r.fusion['type']}; task {tasks}; data {r.data.source})")


@app.command()
@friendly
def finetune(recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides, e.g. train.epochs=1"),
             dry_run: bool = typer.Option(False, "--dry-run", help="build the model, print methods and parameter counts, stop"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of the same name"),
             resume: bool = typer.Option(False, "--resume", help="continue from this run's newest checkpoint (start "
                                         "from the beginning when there is none)")):
    """Train a recipe and write its adapter bundle to adapters/<name>/."""
    r = _recipe_with_data(recipe, overrides)  # a bad recipe or data path answers before torch loads
    from .train import finetune as run

    run(r, dry_run=dry_run, overwrite=overwrite or None, resume=resume)


@app.command()
@friendly
def evaluate(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="e.g. data.root=/path/to/vqa_rad"),
             device: str = typer.Option("auto", help="cpu, cuda or auto"),
             allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch")):
    """Rebuild a bundle's model and reproduce its stored test metrics."""
    from .inference import evaluate_bundle
    from .report import print_test

    result = evaluate_bundle(bundle, overrides or [], _device(device), allow_base_mismatch)
    print_test(result["metrics"], result["tasks"])
    diff = result["max_abs_diff"]
    for name, task in result["tasks"].items():
        key, value = next(iter(task.headline(result["metrics"][name]).items()))
        before = result["stored"][name].get(key, float("nan"))
        console.print(f"{name}: stored {key} {before:.4f}, now {value:.4f}")
    console.print(f"max difference over reported metrics {diff:.2e} -> {'reproduced' if diff < 1e-9 else 'DIFFERENT'}")
    if diff >= 1e-9:
        raise typer.Exit(1)


@app.command()
@friendly
def predict(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle (or merged model) directory"),
            image: Optional[Path] = typer.Option(None, help="image file"),
            question: Optional[str] = typer.Option(None, help="question / text"),
            audio: Optional[Path] = typer.Option(None, help="audio file (bundles with an audio encoder)"),
            encoder_input: List[str] = typer.Option([], "--encoder-input", metavar="ENCODER=VALUE",
                                                    help="the input of an encoder that reads a column of its own "
                                                    "(data.encoder_fields): a file path, or the text; repeatable"),
            input: Optional[Path] = typer.Option(None, "--input", help="manifest (.jsonl/.csv/.json) with the columns the bundle reads"),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the input rows with their predictions (.jsonl or .csv)"),
            top_k: int = typer.Option(3, help="answers to show"),
            task: Optional[str] = typer.Option(None, help="multi-task bundles: answer only this task (default: every task)"),
            image_field: str = typer.Option("image", help="--input: the image column"),
            text_field: str = typer.Option("question", help="--input: the question column"),
            audio_field: str = typer.Option("audio", help="--input: the audio column"),
            device: str = typer.Option("auto", help="cpu, cuda or auto"),
            allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help="load onto a base whose fingerprint differs")):
    """Answer a question about an image (or classify a clip, ...; or every row of a manifest)."""
    from .inference import Predictor, predict_manifest

    if input is None and image is None and question is None and audio is None and not encoder_input:
        raise UsageError("give the inputs the bundle reads (--image, --question, --audio), or --input manifest.jsonl")
    own = {}
    for item in encoder_input:
        name, sep, value = item.partition("=")
        if not sep or not name or not value or name in own:
            raise UsageError(f"--encoder-input: expected ENCODER=VALUE, once per encoder (got {item!r})")
        own[name] = [value]
    if own and input is not None:
        raise UsageError("--encoder-input: with --input, each encoder reads its own column from the manifest")
    if top_k < 1:
        raise UsageError(f"--top-k: must be at least 1 (got {top_k})")
    predictor = Predictor(bundle, _device(device), allow_base_mismatch)
    given = {"image": image, "text": question, "audio": audio}
    flags = {"image": "--image", "text": "--question", "audio": "--audio"}
    missing = [flags[m] for m in predictor.reads if given[m] is None]
    if input is None and missing:
        raise UsageError(f"{bundle} reads {', '.join(predictor.reads)}: give {' and '.join(missing)} too (or --input manifest.jsonl)")
    if input is not None:
        results = predict_manifest(predictor, input, output, top_k, image_field, text_field, audio_field, task)
        console.print(f"{len(results)} predictions" + (f" written to {output}" if output else ""))
        if output is None:
            for r in results:
                print(json.dumps(r))
        return
    one = {m: [str(given[m])] if m in predictor.reads else [] for m in given}
    result = predictor.predict(one["image"], one["text"], top_k, audios=one["audio"], task=task, inputs=own)[0]
    for name, answer in (result["tasks"].items() if "tasks" in result else [(None, result)]):
        if name is not None:
            console.print(f"{name}:")
        if "answer" in answer and "top_k" in answer:
            console.print(Text(answer["answer"], style="bold"))
            for alt in answer["top_k"]:
                console.print(f"  {alt['probability']:.4f}  {alt['answer']}")
        else:
            console.print(json.dumps(answer))


@app.command()
@friendly
def inspect(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory")):
    """Show a bundle's methods, parameters, base fingerprints, metrics and files."""
    from .bundle.io import read_manifest, verify_files

    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    about = Table(title=str(bundle), show_header=False)
    about.add_column("", style="bold")
    about.add_column("")
    for key, value in (("run", manifest["run_name"]), ("task", manifest["task"]), ("vocabulary", f"{len(manifest['vocabulary'])} answers"),
                       ("created", manifest.get("created", "?")),
                       *((f"{lib} version", v) for lib, v in manifest.get("versions", {}).items())):
        about.add_row(key, str(value))
    console.print(about)
    table = Table(title="encoders")
    for col in ("name", "base model", "method", "trainable", "total", "quantization", "fingerprint"):
        table.add_column(col)
    for name, e in manifest["encoders"].items():
        q = e.get("quantization")
        table.add_row(name, e["model"], e["method"], f"{e['trainable_parameters']:,}", f"{e['total_parameters']:,}",
                      f"{q.get('bits', '?')}-bit" if q else "-", (e.get("fingerprint") or "-")[:23] + "...")
    table.add_row("head", manifest["head"]["type"], "trained", f"{manifest['head']['parameters']:,}", "", "", "")
    console.print(table)
    if (Path(bundle) / "metrics.json").is_file():
        from .inference import stored_metrics

        test = stored_metrics(Path(bundle))["test"]
        console.print(f"test accuracy {100 * test['accuracy']:.2f}%  macro-F1 {100 * test['macro_f1']:.2f}%  n={test.get('count', '?')}")
    files = Table(title="files")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for rel, info in manifest["files"].items():
        files.add_row(rel, f"{info['bytes']:,}")
    console.print(files)
    total = sum(i["bytes"] for i in manifest["files"].values())
    console.print(f"total {total / 1e6:.2f} MB")


@app.command()
@friendly
def merge(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
          out: Path = typer.Option(..., "--out", help="directory for the merged model"),
          tolerance: float = typer.Option(1e-5, help="max |logit difference| allowed between merged and unmerged"),
          overwrite: bool = typer.Option(False, "--overwrite"),
          allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch")):
    """Fold mergeable methods into the base weights; write a verified standalone model."""
    from .bundle.merge import merge_bundle

    report = merge_bundle(bundle, out, tolerance=tolerance, allow_base_mismatch=allow_base_mismatch, overwrite=overwrite)
    for name, method in report["folded"].items():
        console.print(f"{name}: {method} folded into the base weights")
    for name, method in report["kept"].items():
        console.print(f"{name}: {method} cannot be folded; kept as modules beside the merged base")
    for name, n in report["dequantized"].items():
        console.print(f"{name}: quantized base de-quantized to float32 ({n} layers) and merged in float32; not re-quantized")
    console.print(f"verified on {report['probe']['size']} probe examples ({report['probe']['source']}): max |logit diff| "
              f"{report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']:.0e}), top-1 agreement "
              f"{100 * report['top1_agreement']:.1f}%")
    console.print(f"merged model written to {out}")


@app.command()
@friendly
def export(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
           out: Path = typer.Option(..., "--out", help="output directory"),
           format: str = typer.Option("onnx", "--format", help="onnx"),
           opset: int = typer.Option(17, help="ONNX opset"),
           overwrite: bool = typer.Option(False, "--overwrite")):
    """Export the merged model (text + image in, answer logits out)."""
    if format != "onnx":
        raise UsageError(f"--format: unknown export format {format!r}; available: onnx")
    from .bundle.export import export_onnx

    result = export_onnx(bundle, out, opset=opset, overwrite=overwrite)
    diff = result["onnx_max_abs_diff"]
    check = f"onnxruntime {result['onnxruntime']}: max |logit diff| vs PyTorch {diff:.2e}" if diff is not None else \
        "onnxruntime not installed: parity not checked (pip install onnxruntime)"
    console.print(f"ONNX model written to {out}/model.onnx (inputs {', '.join(result['inputs'])}); {check}")
    if result["exporter_warnings"]:
        counts = ", ".join(f"{n} {kind}" for kind, n in result["exporter_warnings"].items())
        console.print(f"the exporter's tracing warnings ({counts}) are not shown: the parity check above is what tells "
                      "whether the graph computes the same logits")


@app.command()
@friendly
def push(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
         repo_id: str = typer.Argument(..., metavar="OWNER/NAME", help="the repository to push to"),
         hub_dir: Optional[str] = typer.Option(None, help="local directory standing in for the hub (or $MMPEFT_HUB_DIR)"),
         private: bool = typer.Option(False, "--private")):
    """Upload a verified bundle (with its model card) to the Hugging Face Hub."""
    from .bundle.hub import push as do_push

    console.print(f"pushed {bundle} to {do_push(bundle, repo_id, hub_dir=hub_dir, private=private)}")


@app.command()
@friendly
def pull(source: str = typer.Argument(..., metavar="SOURCE", help="owner/name, a bundle directory, or a .tar.gz of one"),
         out: Optional[Path] = typer.Option(None, "--out", help="where to put it (default adapters/<name>)"),
         hub_dir: Optional[str] = typer.Option(None, help="local directory standing in for the hub (or $MMPEFT_HUB_DIR)"),
         overwrite: bool = typer.Option(False, "--overwrite")):
    """Fetch and verify a bundle from the Hub, a directory or an archive."""
    from .bundle.hub import pull as do_pull

    name = Path(source.rstrip("/")).name
    for suffix in (".tar.gz", ".tgz"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    target = out or Path("adapters") / name
    console.print(f"pulled {source} into {do_pull(source, target, hub_dir=hub_dir, overwrite=overwrite)} (verified)")


@app.command()
@friendly
def serve(bundles: List[str] = typer.Argument(..., metavar="BUNDLE", help="bundle folders, each optionally NAME=FOLDER"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (the default answers this machine only)"),
          port: int = typer.Option(8000, help="port to listen on"),
          max_batch: int = typer.Option(16, help="requests of one bundle answered in one forward pass at most (1: no batching)"),
          max_wait_ms: float = typer.Option(5.0, help="how long the first request of a batch waits for others"),
          max_upload_mb: float = typer.Option(16.0, help="largest request body accepted"),
          device: str = typer.Option("auto", help="cpu, cuda or auto")):
    """Serve bundles over HTTP: an API (POST /predict, GET /bundles, /docs) and a web page at /."""
    try:
        import uvicorn

        from .serve.app import ServeSettings, create_app
    except ImportError as exc:
        raise UsageError(f"serving needs FastAPI and uvicorn ({exc}): pip install 'mmpeft[serve]'") from None
    from .serve.pool import AdapterPool

    if max_batch < 1 or max_wait_ms < 0 or max_upload_mb <= 0:
        raise UsageError("--max-batch must be at least 1, --max-wait-ms at least 0 and --max-upload-mb above 0")
    paths = {}
    for item in bundles:
        name, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(folder.rstrip("/")).name
        if name in paths:
            raise UsageError(f"two bundles would be named {name!r}; name one with NAME=FOLDER")
        paths[name] = Path(folder)
    pool = AdapterPool(paths, _device(device), log=console.print)
    app_ = create_app(pool, ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                          max_upload_bytes=int(max_upload_mb * 1024 * 1024)))
    console.print(f"serving {', '.join(paths)} at http://{host}:{port}/ (API: /predict, /bundles, /docs); Ctrl-C to stop")
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


@bench_app.command("quickstart")
@friendly
def bench_quickstart(recipe: str = typer.Option("recipes/quickstart.yaml"), out: str = typer.Option("benchmarks/results"),
                     overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Time the quickstart end to end and check its 97% / 10-minute targets."""
    from .bench.quickstart import run

    r = run(recipe, out, overrides or [])
    m = r["machine"]
    console.print(f"{m['processor']} ({m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} threads)")
    console.print(f"quickstart: test accuracy {100 * r['test_accuracy']:.2f}% (target >= {100 * r['target_accuracy']:.0f}%: "
                  f"{'met' if r['meets_accuracy'] else 'MISSED'}), wall {r['wall_seconds']:.0f} s (budget {r['budget_seconds']:.0f} s: "
                  f"{'met' if r['meets_time'] else 'MISSED'}); written to {out}/quickstart.json")


@bench_app.command("contrastive")
@friendly
def bench_contrastive(recipe: str = typer.Option("recipes/easy_vqa_contrastive.yaml", help="a recipe with a contrastive task"),
                      out: str = typer.Option("benchmarks/results/contrastive", help="folder for contrastive.json / .md"),
                      overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Train a contrastive recipe and score it against its untrained projections (the floor)."""
    from .bench.contrastive import run

    result = run(recipe, out, overrides or [])
    console.print((Path(out) / "contrastive.md").read_text())
    console.print(f"written to {out}/contrastive.json and contrastive.md ({result['train_seconds']:.0f} s of training)")


@bench_app.command("methods")
@friendly
def bench_methods(recipe: str = typer.Option("recipes/quickstart.yaml"), out: str = typer.Option("benchmarks/results"),
                  methods: Optional[str] = typer.Option(None, help="comma-separated subset"),
                  sides: str = typer.Option("image,text"),
                  overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Fine-tune the quickstart with each method on each side; table of params, accuracy, s/epoch."""
    from .bench.methods import run

    run(recipe, out, methods.split(",") if methods else None, tuple(sides.split(",")), overrides or [])
    console.print((Path(out) / "methods.md").read_text())


@bench_app.command("memory")
@friendly
def bench_memory(out: str = typer.Option("benchmarks/results"), cpu: bool = typer.Option(False, "--cpu", help="weight bytes only"),
                 small: bool = typer.Option(False, "--small", help="tiny models (smoke test)")):
    """Peak memory / throughput of full, LoRA, LoRA+int8, LoRA+NF4 (CUDA); weight bytes per precision (any machine)."""
    from .bench.memory import run

    run(out, cpu_only=cpu, small=small)
    console.print((Path(out) / "memory.md").read_text())


@bench_app.command("vqa-rad")
@friendly
def bench_vqa_rad(recipe: str = typer.Option("recipes/medical_vqa_15ep.yaml"), out: str = typer.Option("benchmarks/results"),
                  configs: Optional[str] = typer.Option(None, help="comma-separated subset of the configurations: 'head only' and each registered method"),
                  seeds: str = typer.Option("0,1,2"), jobs: int = typer.Option(1, help="runs at a time (several suit a GPU)"),
                  overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Each method on both encoders of the medical recipe, over seeds (resumable)."""
    from .bench.common import parse_seeds
    from .bench.vqa_rad import run

    run(recipe, out, configs.split(",") if configs else None, parse_seeds(seeds), overrides or [], jobs=jobs)
    console.print((Path(out) / "vqa_rad.md").read_text())


@bench_app.command("search")
@friendly
def bench_search(search_file: str = typer.Argument(..., metavar="SEARCH", help="search YAML: recipe, base overrides, seeds, named variants"),
                 out: str = typer.Option(..., help="folder for results.jsonl, summary.md, logs and bundles"),
                 jobs: int = typer.Option(1, help="runs at a time (several suit a GPU)"),
                 threads: Optional[int] = typer.Option(None, help="threads per run (default: CPU cores / jobs)"),
                 only: Optional[str] = typer.Option(None, help="comma-separated variants to run (default: all)"),
                 overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="key.path=value applied to every run")):
    """Named recipe variants x seeds, several runs at a time (resumable)."""
    from .bench.search import run

    run(search_file, out, jobs, threads, overrides or [], only.split(",") if only else None)
    console.print((Path(out) / "summary.md").read_text())


@bench_app.command("throughput")
@friendly
def bench_throughput(recipe: str = typer.Option("recipes/quickstart.yaml", help="recipe to measure"),
                     out: str = typer.Option("benchmarks/results/throughput", help="folder for throughput.json / .md"),
                     steps: int = typer.Option(40, help="optimizer steps an epoch (the rows: steps x batch size)"),
                     scaling: str = typer.Option("1000,4000,16000", help="train rows of the scaling runs"),
                     manifest_rows: str = typer.Option("10000,1000000", help="rows of the generated manifests"),
                     overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """The toolkit against a hand-written loop, each pipeline feature toggled, and scaling with rows."""
    from .bench.common import parse_ints
    from .bench.throughput import run

    sizes = parse_ints(scaling, "--scaling", "1000,4000")
    manifests = parse_ints(manifest_rows, "--manifest-rows", "10000,1000000")
    if steps < 1:
        raise UsageError("--steps: must be at least 1")
    run(recipe, out, steps, overrides or [], list(sizes), list(manifests))
    console.print((Path(out) / "throughput.md").read_text())


@bench_app.command("serve")
@friendly
def bench_serve(bundles: str = typer.Option("adapters/vqa_rad_bitfit_hadamard_all40,adapters/vqa_rad_bitfit_hadamard,"
                                            "adapters/vqa_rad_bitfit_hadamard_25ep", help="comma-separated bundles over one base"),
                images: str = typer.Option("../shared/vqa_rad/images", help="a folder of test images (the first --image-count)"),
                image_count: int = typer.Option(8, help="images used"),
                questions: str = typer.Option("is there a fracture?|is this a ct scan?|what organ is shown?",
                                              help="questions, separated by |"),
                clients: str = typer.Option("1,4,16,64", help="concurrent clients per level"),
                requests: int = typer.Option(256, help="requests per level"),
                soak: int = typer.Option(2000, help="requests of the soak"),
                out: str = typer.Option("benchmarks/results/serve", help="folder for serve.json and serve.md")):
    """Load test, memory and soak of `mmpeft serve` on 127.0.0.1 (it starts and stops its own servers)."""
    from .bench.common import parse_ints
    from .bench.serve import run

    levels = list(parse_ints(clients, "--clients", "1,4,16"))
    folder = Path(images)
    if not folder.is_dir():
        raise UsageError(f"--images {images}: not a folder of images")
    picked = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:image_count]
    run([b for b in bundles.split(",") if b], out, [str(p) for p in picked], [q for q in questions.split("|") if q.strip()],
        levels, requests, soak)
    console.print((Path(out) / "serve.md").read_text())


@bench_app.command("faults")
@friendly
def bench_faults(recipe: str = typer.Option("recipes/quickstart.yaml", help="recipe to kill and resume"),
                 out: str = typer.Option("benchmarks/results/faults", help="folder for runs and results"),
                 trials: int = typer.Option(5, help="kill-and-resume trials"),
                 kills: int = typer.Option(2, help="SIGKILLs per trial, each at a random moment"),
                 seed: int = typer.Option(0, help="seed of the kill moments"),
                 checkpoint_every: int = typer.Option(5, help="train.checkpoint_every (steps) for the trials"),
                 overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Kill runs with SIGKILL at random moments, resume them, and check they end identical to an uninterrupted run."""
    from .bench.faults import run

    if trials < 1 or kills < 1:
        raise UsageError("--trials and --kills: must be at least 1")
    run(recipe, out, trials, kills, seed, overrides or [], checkpoint_every)
    console.print((Path(out) / "faults.md").read_text())


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


def main() -> None:
    quiet_third_party()
    app()


if __name__ == "__main__":
    main()
