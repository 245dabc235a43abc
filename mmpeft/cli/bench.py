"""``mmpeft bench``: each benchmark command parses its options and hands them to its module
in ``mmpeft.bench``, which imports torch only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from .common import OVERRIDES, console, friendly

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: methods, memory, VQA-RAD, searches, contrastive, generate, video, throughput, serving, faults.")


@bench_app.command("quickstart")
@friendly
def bench_quickstart(recipe: str = typer.Option(..., help="the recipe to run (recipes/quickstart.yaml in a checkout of mmpeft; benchmarks/reproduce.sh has the commands)"),
                     out: str = typer.Option(..., help="folder for quickstart.json"),
                     overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Time the quickstart end to end and check its 97% / 10-minute targets."""
    from ..bench.quickstart import run

    r = run(recipe, out, overrides or [])
    m = r["machine"]
    console.print(f"{m['processor']} ({m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} threads)")
    console.print(f"quickstart: test accuracy {100 * r['test_accuracy']:.2f}% (target >= {100 * r['target_accuracy']:.0f}%: "
                  f"{'met' if r['meets_accuracy'] else 'MISSED'}), wall {r['wall_seconds']:.0f} s (budget {r['budget_seconds']:.0f} s: "
                  f"{'met' if r['meets_time'] else 'MISSED'}); written to {out}/quickstart.json")


@bench_app.command("generate")
@friendly
def bench_generate(recipe: str = typer.Option(..., help="a recipe with a generate task (recipes/easy_vqa_caption.yaml in a checkout)"),
                   out: str = typer.Option(..., help="folder for generate.json / .md (and the examples picture)"),
                   bundle: Optional[str] = typer.Option(None, help="a bundle of this recipe already trained (its test "
                                                        "scoring is reused, not repeated); default: train one"),
                   rows: int = typer.Option(256, min=1, help="test rows the generation speed is measured on"),
                   qlora_rows: int = typer.Option(0, min=0, help="also train the decoder's LoRA on float32 and on NF4 "
                                                  "weights (QLoRA) for one epoch of this many rows, side by side (0: no)"),
                   overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Train a generate recipe, score it once, and time generation against plain transformers."""
    from ..bench.generate import run

    run(recipe, out, overrides or [], bundle=bundle, rows=rows, qlora_rows=qlora_rows)
    console.print((Path(out) / "generate.md").read_text())
    console.print(f"written to {out}/generate.json and generate.md")


@bench_app.command("video")
@friendly
def bench_video(recipe: Optional[str] = typer.Option(None, help="a recipe with a video encoder named video (default: the "
                                                     "shipped moving_shapes_video)"),
                out: str = typer.Option(..., help="folder for video.json / .md"),
                seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
                configs: str = typer.Option("middle frame,mean of 8 frames,temporal transformer",
                                            help="comma-separated: middle frame, mean of 8 frames, temporal transformer, tdconv"),
                overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Middle frame vs mean pooling vs the temporal transformer on moving shapes: accuracy per question type."""
    from ..bench.common import parse_seeds
    from ..bench.video import run
    from .recipes import shipped

    path = recipe or str(shipped()["moving_shapes_video"])
    run(path, out, parse_seeds(seeds), tuple(c.strip() for c in configs.split(",")), overrides or [])
    console.print((Path(out) / "video.md").read_text())
    console.print(f"written to {out}/video.json and video.md")


@bench_app.command("contrastive")
@friendly
def bench_contrastive(recipe: str = typer.Option(..., help="a recipe with a contrastive task (recipes/easy_vqa_contrastive.yaml in a checkout)"),
                      out: str = typer.Option(..., help="folder for contrastive.json / .md"),
                      overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides")):
    """Train a contrastive recipe and score it against its untrained projections (the floor)."""
    from ..bench.contrastive import run

    result = run(recipe, out, overrides or [])
    console.print((Path(out) / "contrastive.md").read_text())
    console.print(f"written to {out}/contrastive.json and contrastive.md ({result['train_seconds']:.0f} s of training)")


@bench_app.command("methods")
@friendly
def bench_methods(recipe: str = typer.Option(..., help="the recipe to run (recipes/quickstart.yaml in a checkout of mmpeft; benchmarks/reproduce.sh has the commands)"),
                  out: str = typer.Option(..., help="folder for methods.json / .md (bundles in its runs/)"),
                  methods: Optional[str] = typer.Option(None, help="comma-separated subset"),
                  sides: str = typer.Option("image,text"),
                  overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Fine-tune the quickstart with each method on each side; table of params, accuracy, s/epoch."""
    from ..bench.methods import run

    run(recipe, out, methods.split(",") if methods else None, tuple(sides.split(",")), overrides or [])
    console.print((Path(out) / "methods.md").read_text())


@bench_app.command("memory")
@friendly
def bench_memory(out: str = typer.Option(..., help="folder for memory.json / .md"), cpu: bool = typer.Option(False, "--cpu", help="weight bytes only"),
                 small: bool = typer.Option(False, "--small", help="tiny models (smoke test)")):
    """Peak memory / throughput of full, LoRA, LoRA+int8, LoRA+NF4 (CUDA); weight bytes per precision (any machine)."""
    from ..bench.memory import run

    run(out, cpu_only=cpu, small=small)
    console.print((Path(out) / "memory.md").read_text())


@bench_app.command("vqa-rad")
@friendly
def bench_vqa_rad(recipe: str = typer.Option(..., help="the recipe to run (recipes/medical_vqa_15ep.yaml in a checkout of mmpeft; benchmarks/reproduce.sh has the commands)"),
                  out: str = typer.Option(..., help="folder for vqa_rad.json / .md (bundles in its runs/)"),
                  configs: Optional[str] = typer.Option(None, help="comma-separated subset of the configurations: 'head only' and each registered method"),
                  seeds: str = typer.Option("0,1,2"), jobs: int = typer.Option(1, help="runs at a time (several suit a GPU)"),
                  overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Each method on both encoders of the medical recipe, over seeds (resumable)."""
    from ..bench.common import parse_seeds
    from ..bench.vqa_rad import run

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
    from ..bench.search import run

    run(search_file, out, jobs, threads, overrides or [], only.split(",") if only else None)
    console.print((Path(out) / "summary.md").read_text())


@bench_app.command("throughput")
@friendly
def bench_throughput(recipe: str = typer.Option(..., help="the recipe to run (recipes/quickstart.yaml in a checkout of mmpeft; benchmarks/reproduce.sh has the commands)"),
                     out: str = typer.Option(..., help="folder for throughput.json / .md"),
                     steps: int = typer.Option(40, help="optimizer steps an epoch (the rows: steps x batch size)"),
                     encoders: Optional[str] = typer.Option(None, help="recipe (its own), base (BERT-base + ViT-B/16-sized, random, "
                                                            "LoRA, 224 px) or small (those, tiny); default: base on a GPU, else recipe"),
                     memory_budget_gb: Optional[float] = typer.Option(None, help="CUDA: run at the largest batch whose steps fit in this many GiB"),
                     features: bool = typer.Option(True, help="also each pipeline feature toggled and the frozen-feature cache "
                                                   "(--no-features: the recipe's own settings only)"),
                     profile_steps: int = typer.Option(0, help="also one finetune run with this many steps of its second epoch "
                                                       "under torch.profiler: where a step's time goes (0: none)"),
                     scaling: str = typer.Option("1000,4000,16000", help="train rows of the scaling runs (none: skip)"),
                     manifest_rows: str = typer.Option("10000,1000000", help="rows of the generated manifests (none: skip)"),
                     overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """The toolkit against a hand-written loop, each pipeline feature toggled, and scaling with rows."""
    import torch

    from ..bench.common import parse_ints
    from ..bench.throughput import run

    sizes = () if scaling == "none" else parse_ints(scaling, "--scaling", "1000,4000")
    manifests = () if manifest_rows == "none" else parse_ints(manifest_rows, "--manifest-rows", "10000,1000000")
    if steps < 1:
        raise UsageError("--steps: must be at least 1")
    encoders = encoders or ("base" if torch.cuda.is_available() else "recipe")
    if encoders not in ("recipe", "base", "small"):
        raise UsageError(f"--encoders {encoders}: expected recipe, base or small")
    if not 0 <= profile_steps < steps:
        raise UsageError(f"--profile-steps {profile_steps}: must be 0 (none) up to --steps minus one ({steps - 1}): the "
                         "profiled steps follow one warm-up step of the second epoch")
    if memory_budget_gb is not None and memory_budget_gb <= 0:
        raise UsageError("--memory-budget-gb: must be a positive number of GiB")
    run(recipe, out, steps, overrides or [], list(sizes), list(manifests), encoders=encoders, memory_budget_gib=memory_budget_gb,
        features=features, profile_steps=profile_steps)
    console.print((Path(out) / "throughput.md").read_text())


@bench_app.command("serve")
@friendly
def bench_serve(bundles: str = typer.Option("", help="comma-separated bundles over one base (benchmarks/reproduce.sh serve: "
                                            "three of the repository's VQA-RAD bundles)"),
                images: str = typer.Option(..., help="a folder of test images (the first --image-count)"),
                image_count: int = typer.Option(8, help="images used"),
                questions: str = typer.Option("is there a fracture?|is this a ct scan?|what organ is shown?",
                                              help="questions, separated by |"),
                clients: str = typer.Option("1,4,16,64", help="concurrent clients per level"),
                requests: int = typer.Option(256, help="requests per level"),
                soak: int = typer.Option(2000, help="requests of the soak"),
                chat: str = typer.Option("", help="a bundle with a generate task: the chat API's rows (streamed tokens/s, "
                                         "time to first token, batching gain, a soak), in serve_chat.json / .md"),
                chat_prompts: str = typer.Option("Caption:|describe the image", help="chat prompts, separated by |"),
                chat_clients: str = typer.Option("1,4,16", help="concurrent chat clients per level"),
                chat_requests: int = typer.Option(48, help="chat requests per level"),
                chat_soak: int = typer.Option(1000, help="chat requests of the chat soak"),
                out: str = typer.Option(..., help="folder for serve.json / serve.md (and serve_chat.json / .md)")):
    """Load test, memory and soak of `mmpeft serve` on 127.0.0.1 (it starts and stops its own servers)."""
    from ..bench.common import machine_info, output_folder, parse_ints, write_atomic
    from ..bench.serve import run
    from ..bench.serve_chat import chat_markdown, run_chat

    if not bundles and not chat:
        raise UsageError("--bundles and --chat: give bundles to answer questions, a generating bundle, or both")
    folder = Path(images)
    if not folder.is_dir():
        raise UsageError(f"--images {images}: not a folder of images")
    picked = [str(p) for p in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:image_count]]
    if bundles:
        run([b for b in bundles.split(",") if b], out, picked, [q for q in questions.split("|") if q.strip()],
            list(parse_ints(clients, "--clients", "1,4,16")), requests, soak)
        console.print((Path(out) / "serve.md").read_text())
    if chat:
        levels = list(parse_ints(chat_clients, "--chat-clients", "1,4,16"))
        result = {"machine": machine_info(), **run_chat(chat, picked, [p for p in chat_prompts.split("|") if p.strip()],
                                                        levels, chat_requests, chat_soak)}
        folder_out = output_folder(out)
        write_atomic(folder_out / "serve_chat.json", json.dumps(result, indent=2))
        write_atomic(folder_out / "serve_chat.md", chat_markdown(result, result["machine"]))
        console.print((folder_out / "serve_chat.md").read_text())


@bench_app.command("faults")
@friendly
def bench_faults(recipe: str = typer.Option(..., help="recipe to kill and resume (recipes/quickstart.yaml in a checkout)"),
                 out: str = typer.Option(..., help="folder for runs and results"),
                 trials: int = typer.Option(5, help="kill-and-resume trials"),
                 kills: int = typer.Option(2, help="SIGKILLs per trial, each at a random moment"),
                 seed: int = typer.Option(0, help="seed of the kill moments"),
                 checkpoint_every: int = typer.Option(5, help="train.checkpoint_every (steps) for the trials"),
                 overrides: Optional[List[str]] = typer.Argument(None, metavar=OVERRIDES, help="dotted key=value overrides for every run")):
    """Kill runs with SIGKILL at random moments, resume them, and check they end identical to an uninterrupted run."""
    from ..bench.faults import run

    if trials < 1 or kills < 1:
        raise UsageError("--trials and --kills: must be at least 1")
    run(recipe, out, trials, kills, seed, overrides or [], checkpoint_every)
    console.print((Path(out) / "faults.md").read_text())
