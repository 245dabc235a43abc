"""``mmpeft bench generate``: a generate recipe trained once and scored once on its test split
(the checkpoint chosen on validation rows held out of the training split), then its speed:
training tokens/s, and generation tokens/s of ``mmpeft``'s own path (``predict``'s: rows
collated, encoders, connector, decoding, text) against plain transformers ``generate`` on
the same merged decoder and options, fed the same batches collated beforehand (the encoders
and connector timed with it), alternating twice each (the faster run kept). The two must
produce the same text; the comparison is refused otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import load_recipe
from ..data import recipe_splits
from ..data.batching import Collator
from ..errors import UsageError
from ..inference import Predictor, answer_rows
from ..model import TaskHeads
from ..tasks import TASK_INPUTS, TASKS
from ..tasks.text_metrics import normalize_text
from ..train import finetune
from .common import machine_info, output_folder, write_atomic

SCORES = ("exact_match", "token_f1", "token_recall", "bleu4", "rouge_l", "cider")


def generated_tokens(texts_ids: torch.Tensor) -> int:
    """Tokens generated (each row's up to and including its end-of-sequence token)."""
    return int((texts_ids[:, :-2] >= 0).sum()) if texts_ids.numel() else 0


def speed(predictor: Predictor, rows: int, batch_size: int) -> dict:
    """Generation tokens/s of mmpeft's path and of plain ``generate`` on the merged decoder
    (merges ``predictor``'s decoder in place)."""
    model, tasks, recipe = predictor.model, predictor.tasks, predictor.bundle.recipe
    name, task = next((n, t) for n, t in tasks.items() if t.feeds_head)
    head = model.head.heads[name] if isinstance(model.head, TaskHeads) else model.head
    head.decoder.model = head.decoder.model.merge_and_unload()  # the same merged weights for both paths
    # the rows as predict gets them: without their targets, so no teacher-forced loss is computed beside the
    # generation (kept only where the prompt reads the target's own column)
    blank = task.field != "text" or "{}" not in task.settings.prompt
    test = [replace(r, answer="", extra={k: v for k, v in r.extra.items() if k != task.field},
                    text="" if task.field == "text" else r.text) if blank else r
            for r in recipe_splits(recipe).test[:rows]]
    predictor.store.check({"test": test}, "error")
    collator = Collator(test, dict(model.encoders.items()), tasks, predictor.store)
    batches = [list(range(i, min(i + batch_size, len(test)))) for i in range(0, len(test), batch_size)]
    model.eval()
    # plain transformers: the batches collated beforehand (pixels, prompt ids); timed: the encoders and the
    # connector making the same left-padded prefix + prompt embeddings, then transformers' generate
    prepared = [collator(index)["inputs"] for index in batches]

    def embeddings(inputs):
        prefix, mask = head.prefix(model.encode(inputs))  # (one image encoded once for its several questions)
        fed = inputs[TASK_INPUTS][name]
        embeds = torch.cat([prefix, head.decoder.embed(fed["prompt_ids"])], 1)
        attention = torch.cat([mask, fed["prompt_mask"].bool()], 1)
        order = attention.long().argsort(dim=1, stable=True)
        return embeds.gather(1, order[..., None].expand_as(embeds)), attention.gather(1, order).long()
    s, tok = task.settings, task.tokenizer
    options = dict(max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                   eos_token_id=tok.eos_token_id)

    def ours() -> tuple[float, list[str]]:
        start = time.perf_counter()
        answers = answer_rows(model, tasks, recipe, test, predictor.store, 1, "cpu", batch_size, only=name)
        return time.perf_counter() - start, [a["text"] for a in answers]

    def plain() -> tuple[float, list[str], int]:
        start = time.perf_counter()
        texts, count = [], 0
        with torch.no_grad():
            for inputs in prepared:
                embeds, attention = embeddings(inputs)
                new = head.decoder.base.generate(inputs_embeds=embeds, attention_mask=attention, **options)
                for row in new.tolist():
                    kept = []
                    for t in row:
                        count += 1
                        if t == tok.eos_token_id:
                            break
                        kept.append(t)
                    texts.append(tok.decode(kept, skip_special_tokens=True).strip())
        return time.perf_counter() - start, texts, count

    runs = {"mmpeft": [], "transformers": []}
    texts = {}
    for which in ("transformers", "mmpeft", "mmpeft", "transformers"):
        if which == "mmpeft":
            seconds, texts["mmpeft"] = ours()
        else:
            seconds, texts["transformers"], tokens = plain()
        runs[which].append(round(seconds, 3))
    if texts["mmpeft"] != texts["transformers"]:
        differ = sum(a != b for a, b in zip(texts["mmpeft"], texts["transformers"]))
        raise UsageError(f"mmpeft and plain transformers generated different text for {differ} of {len(test)} rows")
    best = {k: min(v) for k, v in runs.items()}
    originals = recipe_splits(recipe).test[:rows]
    shown = [{"where": r.where, "image": r.image, "prompt": task.prompt_text(r), "reference": task.target(r) or "",
              "generated": g}
             for r, g in zip(originals, texts["mmpeft"])]
    # references never seen as a training target: a vocabulary head cannot answer them, generation can
    seen = {normalize_text(task.target(r)) for r in recipe_splits(recipe).train if task.target(r) is not None}
    unseen = [e for e in shown if normalize_text(e["reference"]) not in seen]
    right = sum(normalize_text(e["generated"]) == normalize_text(e["reference"]) for e in unseen)
    return {"rows": len(test), "batch_size": batch_size, "generated_tokens": tokens, "seconds": runs,
            "targets_removed": blank, "shown": shown[:12],
            "unseen_in_training": {"rows": len(unseen), "exact_match": right, "of_test_rows": len(shown)},
            "tokens_per_second": {k: round(tokens / v, 1) for k, v in best.items()},
            "ratio": round(best["transformers"] / best["mmpeft"], 3)}


def training_tokens(recipe, name: str, task) -> float:
    """Mean decoder positions a training row takes: prompt + target tokens (the prefix excluded)."""
    rows = recipe_splits(recipe).train
    lengths = [sum(map(len, task.tokens(r))) for r in rows if task.has(r)]
    return sum(lengths) / max(1, len(lengths))


def lora_against_qlora(recipe_path: str, overrides, rows: int, work: Path) -> list[dict]:
    """The recipe's decoder with LoRA on float32 weights against the same on NF4 weights (QLoRA),
    side by side: one epoch of ``rows`` training rows each, each in a process of its own (its
    peak resident memory is its own), in the order LoRA, QLoRA."""
    found = []
    for label, extra in (("LoRA, float32 decoder", []), ("QLoRA, NF4 decoder", ["task.decoder_quantization.bits=4"])):
        name = "qlora" if extra else "lora"
        cmd = [sys.executable, "-m", "mmpeft.cli", "finetune", recipe_path, *overrides, *extra, f"data.max_train_samples={rows}",
               "data.max_test_samples=16", "data.eval_fraction=0", "train.epochs=1", "output.plots=false",
               f"output.dir={work}", f"output.name={name}", "--overwrite"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MMPEFT_PROGRESS_SECONDS="3600"))
        text = done.stdout + done.stderr
        if done.returncode != 0:
            found.append({"configuration": label, "error": text.strip().splitlines()[-1][:300] if text.strip() else "failed"})
            continue
        peak = re.search(r"peak memory: (\d+) MiB", text)
        weights = re.search(r"decoder \S+ \(\w+\) weights ([\d.]+) MB", text)
        history = json.loads((work / name / "metrics.json").read_text())["history"]
        found.append({"configuration": label, "rows": rows, "samples_per_second": history[-1]["samples_per_second"],
                      "peak_rss_mib": int(peak.group(1)) if peak else None,
                      "decoder_weights_mb": float(weights.group(1)) if weights else None})
    return found


def run(recipe_path: str, out: str, overrides=(), bundle: Optional[str] = None, rows: int = 256,
        qlora_rows: int = 0) -> dict:
    recipe = load_recipe(recipe_path, list(overrides))
    kinds = {n: b["type"] for n, b in (recipe.tasks or {"answer": recipe.task}).items()}
    if not any(TASKS.get(k).feeds_head for k in kinds.values()):
        raise UsageError(f"{recipe_path}: has no task whose head generates (its tasks: {kinds})")
    folder = output_folder(out)
    start = time.perf_counter()
    if bundle is None:
        bundle = finetune(recipe_path, list(overrides) + ["output.name=generate_bench"], overwrite=True)
    train_seconds = time.perf_counter() - start
    bundle = Path(bundle)
    stored = json.loads((bundle / "metrics.json").read_text())
    loaded = Predictor(bundle)
    name, task = next((n, t) for n, t in loaded.tasks.items() if t.feeds_head)
    test = stored["tasks"][name]
    per_row = training_tokens(loaded.bundle.recipe, name, task)
    history = stored["history"]
    fastest = max(r["samples_per_second"] for r in history)
    result = {"recipe": recipe_path, "overrides": list(overrides), "machine": machine_info(), "bundle": str(bundle),
              "task": name, "test": {k: test[k] for k in SCORES}, "test_rows": test["count"],
              "groups": test.get("groups", {}), "examples": test.get("examples", [])[:8],
              "epochs": len(history), "best_epoch": stored["best_epoch"], "history": history,
              "train_seconds": round(train_seconds, 1) if train_seconds > 5 else None,
              "training": {"text_tokens_per_row": round(per_row, 1), "samples_per_second": fastest,
                           "text_tokens_per_second": round(fastest * per_row, 1)},
              "generation": speed(loaded, rows, recipe.train.eval_batch_size)}
    if qlora_rows:
        with tempfile.TemporaryDirectory() as tmp:
            result["lora_vs_qlora"] = lora_against_qlora(recipe_path, list(overrides), qlora_rows, Path(tmp))
    # test images with their reference and the text generated for them in the speed runs (greedy: as scored)
    result["pictures"] = task.save_pictures(folder, {"examples": result["generation"].pop("shown")})
    write_atomic(folder / "generate.json", json.dumps(result, indent=2))
    write_atomic(folder / "generate.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    m, g, t = result["machine"], result["generation"], result["training"]
    test = result["test"]
    lines = [f"Machine: {m['processor']} ({m['cpu_count']} cores), torch {m['torch']}, {m['torch_threads']} threads. "
             f"Recipe `{result['recipe']}` {' '.join(result['overrides'])}; task `{result['task']}`; "
             f"{result['test_rows']} test rows scored once; checkpoint chosen on validation rows held out of the "
             f"training split (best epoch {result['best_epoch']} of {result['epochs']}).", "",
             "| exact match | token F1 | token recall | BLEU-4 | ROUGE-L | CIDEr-D |", "|---:|---:|---:|---:|---:|---:|",
             f"| {100 * test['exact_match']:.1f} | {100 * test['token_f1']:.1f} | {100 * test['token_recall']:.1f} | "
             f"{100 * test['bleu4']:.1f} | {100 * test['rouge_l']:.1f} | {test['cider']:.3f} |", ""]
    for field, values in result["groups"].items():
        lines.append(f"Exact match by {field}: " + ", ".join(f"{v} {100 * c['exact_match']:.1f} (n={c['count']})"
                                                           for v, c in values.items()))
    lines += ["", f"Training: {t['samples_per_second']:.1f} rows/s (fastest epoch), {t['text_tokens_per_row']:.1f} prompt + "
              f"target tokens a row, so {t['text_tokens_per_second']:.0f} text tokens/s"
              + (f"; {result['train_seconds']:.0f} s in all." if result["train_seconds"] else "."), "",
              f"Generation on {g['rows']} test rows at batch {g['batch_size']} (greedy, the merged decoder, "
              f"{g['generated_tokens']} tokens, identical text from both):", "",
              "| path | tokens/s | seconds (two runs) |", "|---|---:|---|",
              f"| mmpeft (collation, connector, generate) | {g['tokens_per_second']['mmpeft']} | "
              f"{', '.join(map(str, g['seconds']['mmpeft']))} |",
              f"| plain transformers generate (batches collated beforehand; encoders, connector and generate timed) | "
              f"{g['tokens_per_second']['transformers']} | "
              f"{', '.join(map(str, g['seconds']['transformers']))} |", "",
              f"mmpeft / transformers: **{g['ratio']:.3f}x**", "",
              f"Of these {g['unseen_in_training']['of_test_rows']} test rows, {g['unseen_in_training']['rows']} have a "
              f"reference never seen as a training target (a vocabulary head scores them wrong); "
              f"{g['unseen_in_training']['exact_match']} of them were generated exactly.", "",
              "Examples (reference -> generated):", ""]
    if result.get("lora_vs_qlora"):
        rows = result["lora_vs_qlora"]
        lines[-2:-2] = ["The decoder's LoRA on float32 weights against NF4 weights (QLoRA), one epoch each in a process of "
                        "its own, side by side in this run:", "",
                        "| configuration | training rows/s | decoder weights MB | peak resident MiB |", "|---|---:|---:|---:|"]
        lines[-2:-2] = [f"| {r['configuration']} | failed: {r['error']} | | |" if "error" in r else
                        f"| {r['configuration']} | {r['samples_per_second']} | {r['decoder_weights_mb']} | {r['peak_rss_mib']} |"
                        for r in rows] + [""]
    lines += [f"- {e['reference']!r} -> {e['generated']!r}" for e in result["examples"]]
    return "\n".join(lines) + "\n"
