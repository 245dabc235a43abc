"""The ``mmpeft`` commands: a thin layer over the Python API.

The CLI is the top layer and nothing imports it. Each command imports its implementation
when it runs (the one place in the package where the package's own modules are imported
inside functions), so that ``--help``, ``--version`` and ``validate`` answer without
loading torch.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ..version import __version__
from .bench import bench_app
from .recipes import recipes_app
from .common import OVERRIDES, console, device_of, friendly, check_input_columns, print_answers, quiet_third_party, recipe_with_data, test_line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning of multimodal models.")
app.add_typer(bench_app, name="bench")
app.add_typer(recipes_app, name="recipes")


def _show_version(value: bool) -> None:
    if value:
        console.print(f"mmpeft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                              help="print the version and exit")):
    """Parameter-efficient fine-tuning of multimodal models."""


@app.command()
@friendly
def validate(recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Check a recipe, and read and check every row of its data as finetune does (columns,
    files that exist and open as images / audio, rows in every split), without loading any model."""
    r = recipe_with_data(recipe, overrides)
    from ..config import recipe_tasks
    from ..data import probe_images, recipe_splits
    from ..data.samples import files_of

    splits = recipe_splits(r)  # every row: its columns and values (errors name the file and row)
    every = {"train": splits.train, "eval": splits.eval, "test": splits.test}
    probe_images(every, r.data.on_bad_image, r.data.on_bad_audio, r.data.on_bad_video)  # every file opens (its header)
    files = {kind: len({p for rows in every.values() for s in rows for p in files_of(s, kind)}) for kind in ("image", "audio", "video")}
    methods = ", ".join(f"{n}: {c.model} + {c.peft['method']}" for n, c in r.encoders.items())
    tasks = ", ".join(f"{n}: {t.registry_name}" for n, t in recipe_tasks(r).items())
    console.print(f"{recipe}: OK ({methods}; fusion {r.fusion['type']}; task {tasks}; data {r.data.source})")
    console.print(f"rows checked: {len(splits.train):,} train / {len(splits.eval):,} validation / {len(splits.test):,} test; "
                  f"{files['image']:,} image, {files['audio']:,} audio and {files['video']:,} video file(s) opened")


def expect_digest_option():
    return typer.Option(None, "--expect-digest", metavar="sha256:HEX", help="refuse the bundle unless its digest "
                        "(printed by finetune, inspect, push, pull, seal and merge) is this one")


@app.command()
@friendly
def finetune(recipe: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides, e.g. train.epochs=1"),
             dry_run: bool = typer.Option(False, "--dry-run", help="build the model, print methods and parameter counts, stop"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of the same name"),
             resume: bool = typer.Option(False, "--resume", help="continue from this run's newest checkpoint (start "
                                         "from the beginning when there is none)")):
    """Train a recipe and write its adapter bundle to adapters/<name>/."""
    r = recipe_with_data(recipe, overrides)  # a bad recipe or data path answers before torch loads
    from ..errors import Interrupted
    from ..train import RESUME_COMMAND, finetune as run

    try:
        run(r, dry_run=dry_run, overwrite=overwrite or None, resume=resume)
    except Interrupted as exc:  # say the command that resumes this very run
        command = shlex.join(["mmpeft", "finetune", str(recipe), *(overrides or []), "--resume"])
        raise Interrupted(str(exc).replace(RESUME_COMMAND, command), exc.exit_code) from None


@app.command()
@friendly
def evaluate(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
             overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="e.g. data.root=/path/to/vqa_rad"),
             device: str = typer.Option("auto", help="cpu, cuda or auto"),
             allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch"),
             expect_digest: Optional[str] = expect_digest_option()):
    """Rebuild a bundle's model and reproduce its stored test metrics."""
    from ..inference import evaluate_bundle
    from ..report import print_test

    result = evaluate_bundle(bundle, overrides or [], device_of(device), allow_base_mismatch, expect_digest)
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
            question: Optional[str] = typer.Option(None, "--question", "--prompt", help="question / text (a generating "
                                                   "bundle's prompt)"),
            audio: Optional[Path] = typer.Option(None, help="audio file (bundles with an audio encoder)"),
            video: Optional[Path] = typer.Option(None, help="video file (bundles with a video encoder)"),
            encoder_input: List[str] = typer.Option([], "--encoder-input", metavar="ENCODER=VALUE",
                                                    help="the input of an encoder that reads a column of its own "
                                                    "(data.encoder_fields): a file path, or the text; repeatable"),
            input: Optional[Path] = typer.Option(None, "--input", help="manifest (.jsonl/.csv/.json) with the columns the bundle reads"),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the input rows with their predictions (.jsonl or .csv)"),
            top_k: int = typer.Option(3, help="answers to show"),
            task: Optional[str] = typer.Option(None, help="multi-task bundles: answer only this task (default: every task)"),
            image_field: Optional[str] = typer.Option(None, help="--input: the image column (default: the bundle's recipe's)"),
            text_field: Optional[str] = typer.Option(None, help="--input: the question column (default: the bundle's recipe's)"),
            audio_field: Optional[str] = typer.Option(None, help="--input: the audio column (default: the bundle's recipe's)"),
            video_field: Optional[str] = typer.Option(None, help="--input: the video column (default: the bundle's recipe's)"),
            device: str = typer.Option("auto", help="cpu, cuda or auto"),
            max_new_tokens: Optional[int] = typer.Option(None, min=1, help="generating bundles: tokens at most"),
            num_beams: Optional[int] = typer.Option(None, min=1, help="generating bundles: beam search width"),
            temperature: Optional[float] = typer.Option(None, help="generating bundles: sample at this temperature"),
            top_p: Optional[float] = typer.Option(None, help="generating bundles: nucleus sampling mass (samples)"),
            stream: bool = typer.Option(True, "--stream/--no-stream", help="generating bundles, one input: print the text "
                                        "as it is generated"),
            allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help="load onto a base whose fingerprint differs"),
            expect_digest: Optional[str] = expect_digest_option()):
    """Answer a question about an image (or classify a clip, caption it, ...; or every row of a manifest)."""
    if input is None and image is None and question is None and audio is None and video is None and not encoder_input:
        raise UsageError("give the inputs the bundle reads (--image, --question, --audio, --video), or --input manifest.jsonl")
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
    fields = {"image": image_field, "text": text_field, "audio": audio_field, "video": video_field}
    if input is not None:  # the columns the bundle was trained on, checked in every row before the model loads
        fields = check_input_columns(bundle, input, fields)
    from ..inference import Predictor, predict_manifest

    predictor = Predictor(bundle, device_of(device), allow_base_mismatch, expect_digest)
    decoding = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "temperature": temperature, "top_p": top_p}
    if any(v is not None for v in decoding.values()):
        predictor.decode_with(**decoding)
    given = {"image": image, "text": question, "audio": audio, "video": video}
    flags = {"image": "--image", "text": "--question", "audio": "--audio", "video": "--video"}
    missing = [flags[m] for m in predictor.reads if given[m] is None]
    if input is None and missing:
        raise UsageError(f"{bundle} reads {', '.join(predictor.reads)}: give {' and '.join(missing)} too (or --input manifest.jsonl)")
    if input is not None:
        results = predict_manifest(predictor, input, output, top_k, fields["image"], fields["text"], fields["audio"], task,
                                   fields["video"])
        console.print(f"{len(results)} predictions" + (f" written to {output}" if output else ""))
        if output is None:
            for r in results:
                print(json.dumps(r))
        return
    one = {m: [str(given[m])] if m in predictor.reads else [] for m in given}
    generating = [n for n, t in predictor.tasks.items() if t.feeds_head]
    if stream and sys.stdout.isatty() and not own and generating and (task in generating or len(predictor.tasks) == 1):
        # a terminal: the text as it is generated (piped output stays one JSON line per input)
        predictor.stream(one["image"][0] if one["image"] else "", one["text"][0] if one["text"] else "",
                         lambda piece: print(piece, end="", flush=True), one["audio"][0] if one["audio"] else "", task,
                         one["video"][0] if one["video"] else "")
        print()
        return
    result = predictor.predict(one["image"], one["text"], top_k, audios=one["audio"], task=task, inputs=own,
                               videos=one["video"])[0]
    print_answers(result)


@app.command()
@friendly
def inspect(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory")):
    """Show a bundle's methods, parameters, base fingerprints, metrics and files."""
    from ..bundle.io import read_manifest, verify_files
    from ..bundle.manifest import bundle_digest

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
    for col in ("name", "base model", "method"):  # names wrap in a narrow terminal; numbers are never cut
        table.add_column(col, overflow="fold")
    for col in ("trainable", "total"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("quant.", no_wrap=True)
    for name, e in manifest["encoders"].items():
        q = e.get("quantization")
        table.add_row(name, e["model"], e["method"], f"{e['trainable_parameters']:,}", f"{e['total_parameters']:,}",
                      f"{q.get('bits', '?')}-bit" if q else "-")
    table.add_row("head", manifest["head"]["type"], "trained", f"{manifest['head']['parameters']:,}", "", "")
    console.print(table)
    for name, e in manifest["encoders"].items():  # whole, on a line of its own: a hash is never cut
        console.print(f"{name} base fingerprint: {e.get('fingerprint') or '-'}", soft_wrap=True)
    if (Path(bundle) / "metrics.json").is_file():
        from ..inference import stored_metrics

        stored = stored_metrics(Path(bundle))
        kinds = {name: t.get("type") for name, t in manifest.get("tasks", {}).items() if isinstance(t, dict)}
        for name, test in (stored.get("tasks") or {"answer": stored["test"]}).items():
            console.print(test_line(name, kinds.get(name) or manifest["task"], test))
    files = Table(title="files")
    files.add_column("file", overflow="fold")
    files.add_column("bytes", justify="right", no_wrap=True)
    for rel, info in manifest["files"].items():
        files.add_row(rel, f"{info['bytes']:,}")
    console.print(files)
    total = sum(i["bytes"] for i in manifest["files"].values())
    console.print(f"total {total / 1e6:.2f} MB")
    console.print(f"digest {bundle_digest(manifest)} (pin it: --expect-digest on pull, predict, evaluate, merge, serve)",
                  soft_wrap=True)


@app.command()
@friendly
def merge(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
          out: Path = typer.Option(..., "--out", help="directory for the merged model"),
          tolerance: float = typer.Option(1e-5, help="max |logit difference| allowed between merged and unmerged"),
          overwrite: bool = typer.Option(False, "--overwrite"),
          allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch"),
          expect_digest: Optional[str] = expect_digest_option()):
    """Fold mergeable methods into the base weights; write a verified standalone model."""
    from ..bundle.merge import merge_bundle

    report = merge_bundle(bundle, out, tolerance=tolerance, allow_base_mismatch=allow_base_mismatch, overwrite=overwrite,
                          expect_digest=expect_digest)
    for name, method in report["folded"].items():
        console.print(f"{name}: {method} folded into the base weights")
    for name, method in report["kept"].items():
        console.print(f"{name}: {method} cannot be folded; kept as modules beside the merged base")
    for name, n in report["dequantized"].items():
        console.print(f"{name}: quantized base de-quantized to float32 ({n} layers) and merged in float32; not re-quantized")
    console.print(f"verified on {report['probe']['size']} probe examples ({report['probe']['source']}): max |logit diff| "
              f"{report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']:.0e}), top-1 agreement "
              f"{100 * report['top1_agreement']:.1f}%")
    console.print(f"merged model written to {out}, digest {report['digest']}", soft_wrap=True)


@app.command()
@friendly
def export(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
           out: Path = typer.Option(..., "--out", help="output directory"),
           format: str = typer.Option("onnx", "--format", help="onnx, or llava (a generate bundle with a CLIP vision "
                                      "tower: a transformers LlavaForConditionalGeneration folder)"),
           opset: int = typer.Option(17, help="ONNX opset"),
           overwrite: bool = typer.Option(False, "--overwrite")):
    """Export the merged model: ONNX (the encoders' inputs in, every task's outputs out) or LLaVA."""
    if format == "llava":
        from ..bundle.llava_export import export_llava

        result = export_llava(bundle, out, overwrite=overwrite)
        check = result["check"]
        console.print(f"LLaVA checkpoint written to {out} (task {result['task']}, vision tower from encoder "
                      f"{result['vision_encoder']}); loaded back with transformers: {check['tokens_equal']} of "
                      f"{check['rows']} probe rows ({check['probe']}) generated the same greedy tokens, max |first-step "
                      f"logit diff| {check['max_abs_first_logit_diff']:.2e}", soft_wrap=True)
        return
    if format != "onnx":
        raise UsageError(f"--format: unknown export format {format!r}; available: onnx, llava")
    from ..bundle.export import export_onnx

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
    from ..bundle.hub import push as do_push

    where, digest = do_push(bundle, repo_id, hub_dir=hub_dir, private=private)
    console.print(f"pushed {bundle} to {where}; digest {digest} (whoever pulls it can pin it: --expect-digest)",
                  soft_wrap=True)


@app.command()
@friendly
def pull(source: str = typer.Argument(..., metavar="SOURCE", help="owner/name, a bundle directory, or a .tar.gz of one"),
         out: Optional[Path] = typer.Option(None, "--out", help="where to put it (default adapters/<name>)"),
         hub_dir: Optional[str] = typer.Option(None, help="local directory standing in for the hub (or $MMPEFT_HUB_DIR)"),
         overwrite: bool = typer.Option(False, "--overwrite"),
         expect_digest: Optional[str] = expect_digest_option()):
    """Fetch and verify a bundle from the Hub, a directory or an archive."""
    from ..bundle.hub import pull as do_pull

    name = Path(source.rstrip("/")).name
    for suffix in (".tar.gz", ".tgz"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    target = out or Path("adapters") / name
    where, digest = do_pull(source, target, hub_dir=hub_dir, overwrite=overwrite, expect_digest=expect_digest)
    pinned = "the pinned digest" if expect_digest else "digest"
    console.print(f"pulled {source[:200]} into {where} (verified; {pinned} {digest})", soft_wrap=True)


@app.command()
@friendly
def seal(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="a bundle you made yourself")):
    """Seal an older (format 1) bundle of your own: give its manifest an integrity hash and a digest."""
    from ..bundle.io import seal_bundle

    digest, sealed = seal_bundle(bundle)
    state = "sealed (format 2)" if sealed else "already sealed; unchanged"
    console.print(f"{bundle}: {state}; digest {digest}", soft_wrap=True)


@app.command()
@friendly
def serve(bundles: List[str] = typer.Argument(..., metavar="BUNDLE", help="bundle folders, each optionally NAME=FOLDER"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (the default answers this machine only)"),
          port: int = typer.Option(8000, help="port to listen on"),
          max_batch: int = typer.Option(16, help="requests of one bundle answered in one forward pass at most (1: no batching)"),
          max_wait_ms: float = typer.Option(5.0, help="how long the first request of a batch waits for others"),
          max_upload_mb: float = typer.Option(16.0, help="largest request body accepted"),
          device: str = typer.Option("auto", help="cpu, cuda or auto"),
          quiet: bool = typer.Option(False, "--quiet", help="no line per request"),
          expect_digest: List[str] = typer.Option([], "--expect-digest", metavar="[NAME=]sha256:HEX",
                                                  help="refuse to start unless this bundle's digest is this one; "
                                                  "repeatable, NAME= where several are served")):
    """Serve bundles over HTTP: an API (POST /predict, GET /bundles, /docs) and a web page at /."""
    try:
        import uvicorn

        from ..serve.app import ServeSettings, create_app
    except ImportError as exc:
        raise UsageError(f"serving needs FastAPI and uvicorn ({exc}): pip install 'mmpeft[serve]'") from None
    from ..serve.pool import AdapterPool

    if max_batch < 1 or max_wait_ms < 0 or max_upload_mb <= 0:
        raise UsageError("--max-batch must be at least 1, --max-wait-ms at least 0 and --max-upload-mb above 0")
    paths = {}
    for item in bundles:
        name, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(folder.rstrip("/")).name
        if name in paths:
            raise UsageError(f"two bundles would be named {name!r}; name one with NAME=FOLDER")
        paths[name] = Path(folder)
    pool = AdapterPool(paths, device_of(device), log=console.print, digests=pinned_digests(expect_digest, list(paths)))
    app_ = create_app(pool, ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                          max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                          log=None if quiet else console.print))
    console.print(f"serving {', '.join(paths)} at http://{host}:{port}/ (API: /predict, /bundles, /docs); Ctrl-C to stop")
    # connections beyond limit_concurrency get 503 at once instead of queueing without end; idle
    # keep-alive connections close after 5 s
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30, limit_concurrency=256,
                timeout_keep_alive=5)


def pinned_digests(items: list[str], names: list[str]) -> dict[str, str]:
    """``serve --expect-digest`` values by bundle name: ``NAME=DIGEST``, or a bare digest when one bundle is served."""
    pinned = {}
    for item in items:
        name, sep, digest = item.rpartition("=")
        if not sep and len(names) == 1:
            name = names[0]
        if name not in names or not digest or name in pinned:
            raise UsageError(f"--expect-digest {item[:100]!r}: give NAME=sha256:HEX once per served bundle "
                             f"(served: {', '.join(names)})")
        pinned[name] = digest
    return pinned


def main() -> None:
    quiet_third_party()
    app()
