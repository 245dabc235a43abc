"""``mmpeft bench memory``: what quantization and checkpointing save (QLoRA-style).

A BERT-base-sized text encoder and a ViT-B/16-sized image encoder (random weights:
memory does not depend on their values) are built locally and loaded through
mmpeft's normal path. On CUDA, for batch 32 / 224 px / 32 tokens, each configuration
runs a few training steps and reports ``torch.cuda.max_memory_allocated`` and samples
per second. Without a GPU (``--cpu``), only encoder weight bytes per precision are
measured (they need no GPU).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..config import QuantizationConfig, load_recipe
from ..encoders import build_encoder
from ..errors import MMPeftError
from ..model import build_model
from ..quant import weight_bytes
from ..memory import estimate_training_memory
from ..optim import make_optimizer
from .common import machine_info, output_folder, write_atomic

# name, method, how the frozen base weights are held:
#   "fp32"  float32 master weights, bf16 autocast (mixed-precision full fine-tuning)
#   "bf16"  stored in bfloat16 (16-bit LoRA, the QLoRA paper's baseline)
#   8 / 4   bitsandbytes int8 / NF4 with double quantization, other weights in bf16
CONFIGS = [
    ("full (bf16 autocast)", "full", "fp32"),
    ("lora bf16", "lora", "bf16"),
    ("lora + int8 base", "lora", 8),
    ("lora + nf4 base (double quant)", "lora", 4),
]


def build_bases(directory: Path, small: bool = False) -> tuple[str, str]:
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    text, image = directory / "bert-base", directory / "vit-b16"
    torch.manual_seed(0)
    bert_cfg = BertConfig() if not small else BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    vit_cfg = ViTConfig() if not small else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BertModel(bert_cfg).save_pretrained(text)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(bert_cfg.vocab_size - 5)]
    (text / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(text / "vocab.txt")).save_pretrained(text)
    ViTModel(vit_cfg).save_pretrained(image)
    (image / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 224, "width": 224}}))
    return str(text), str(image)


def _recipe(text: str, image: str, method: str, base, checkpointing: bool, batch: int, tokens: int):
    quant = None if base not in (4, 8) else {"bits": base, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    enc = lambda m: {"model": m, "peft": {"method": method}, "quantization": quant, "max_length": tokens}  # noqa: E731
    return load_recipe({
        "name": "memory", "encoders": {"text": enc(text), "image": enc(image)}, "fusion": {"type": "gated"},
        "data": {"source": "easy_vqa"},
        "train": {"batch_size": batch, "gradient_checkpointing": checkpointing, "mixed_precision": "bf16"},
    })


def weight_report(text: str, image: str) -> list[dict]:
    """Encoder weight bytes as stored in float32, bfloat16, int8 and NF4 (measured on the loaded models)."""
    rows = []
    for label, src in (("text (BERT-base)", text), ("image (ViT-B/16)", image)):
        fp32 = build_encoder(src)
        b32 = weight_bytes(fp32)
        b16 = weight_bytes(fp32.to(torch.bfloat16))
        del fp32
        # non-quantized weights (embeddings, norms) in bf16, as in a bf16 QLoRA run
        i8 = weight_bytes(build_encoder(src, quantization=QuantizationConfig(bits=8, compute_dtype="bfloat16")))
        n4 = weight_bytes(build_encoder(src, quantization=QuantizationConfig(bits=4, double_quant=True, compute_dtype="bfloat16")))
        rows.append({"encoder": label, "float32": b32, "bfloat16": b16, "int8": i8, "nf4": n4, "nf4_vs_bf16": n4 / b16})
        gc.collect()
    return rows


def frozen_to_bfloat16(model) -> int:
    """Store every frozen encoder weight in bfloat16 (trainable ones stay float32 for the
    optimizer), as a 16-bit LoRA run holds its base. Returns the number of tensors cast."""
    count = 0
    for param in model.encoders.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            count += 1
    return count


def train_steps(text: str, image: str, method: str, base, checkpointing: bool, device: str,
                batch: int = 32, steps: int = 30, warmup: int = 5, image_size: int = 224, tokens: int = 32) -> dict:
    """Build one configuration through mmpeft's normal path and run ``steps`` optimizer
    steps on random inputs under bf16 autocast.

    Returns:
        ``peak_mib`` (``torch.cuda.max_memory_allocated`` over the steps, model and
        optimizer state included; None off CUDA), ``samples_per_s`` over the steps after
        ``warmup``, ``trainable`` parameters and the final ``loss``.
    """
    cuda = device == "cuda"
    recipe = _recipe(text, image, method, base, checkpointing, batch, tokens)
    model = build_model(recipe, 500, device=device)
    if base == "bf16":
        frozen_to_bfloat16(model)
    estimate = sum(estimate_training_memory(enc, recipe) for enc in model.encoders.values())
    model.to(device).train()
    optimizer = make_optimizer(model, recipe.train)
    static = torch.cuda.memory_allocated() / 2**20 if cuda else None  # weights (+ optimizer state once it exists)
    ids = torch.randint(5, 1000, (batch, tokens), device=device)
    inputs = {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
              "image": {"pixel_values": torch.randn(batch, 3, image_size, image_size, device=device)}}
    labels = torch.randint(0, 500, (batch,), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(steps):
        if step == warmup:  # the first steps warm up kernels and the allocator
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model.logits(inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    row = {"samples_per_s": batch * (steps - warmup) / (time.perf_counter() - start),
           "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "loss": loss.item(),
           "dry_run_estimate_mib": estimate / 2**20, "model_mib": static}
    del model, optimizer, inputs, loss
    return row


def training_report(text: str, image: str, device: str = "cuda", **settings) -> list[dict]:
    """:func:`train_steps` for every configuration, with and without gradient checkpointing.
    A configuration that fails (out of memory, no bitsandbytes backend) is reported with
    its error instead of stopping the others."""
    rows = []
    for name, method, base in CONFIGS:
        for checkpointing in (False, True):
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            row = {"config": name, "gradient_checkpointing": checkpointing}
            try:
                with warnings.catch_warnings():  # bitsandbytes warns on every int8 matmul that it casts to fp16
                    warnings.filterwarnings("ignore", message="MatMul8bitLt")
                    row.update(train_steps(text, image, method, base, checkpointing, device, **settings))
            except (RuntimeError, MMPeftError) as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(row, flush=True)
            rows.append(row)
    return rows


def run(out: str, cpu_only: bool = False, small: bool = False) -> dict:
    out_path = output_folder(out)
    size = "tiny config (smoke test)" if small else None
    with tempfile.TemporaryDirectory() as tmp:
        text, image = build_bases(Path(tmp), small=small)
        result = {"machine": machine_info(), "settings": {
            "batch": 32, "image_size": 224, "tokens": 32, "steps": "30 (5 warm-up, 25 timed)", "autocast": "bf16",
            "text": size or "BERT-base config (random)", "image": size or "ViT-B/16 config (random)", "head": "gated, 500 answers",
            "bitsandbytes": _bnb_version()},
            "weights": weight_report(text, image)}
        if torch.cuda.is_available() and not cpu_only:
            result["training"] = training_report(text, image, "cuda")
    result["targets"] = targets(result)
    write_atomic(out_path / "memory.json", json.dumps(result, indent=2))
    write_atomic(out_path / "memory.md", markdown(result))
    return result


def _bnb_version() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.__version__


TARGETS = [
    # what, numerator (config, checkpointing, field), denominator, bound, "<=" or ">="
    ("LoRA bf16 peak / full fine-tuning peak", ("lora bf16", False, "peak_mib"),
     ("full (bf16 autocast)", False, "peak_mib"), 0.45, "<="),
    ("NF4 + checkpointing peak / LoRA bf16 + checkpointing peak", ("lora + nf4 base (double quant)", True, "peak_mib"),
     ("lora bf16", True, "peak_mib"), 0.65, "<="),
    ("NF4 throughput / LoRA bf16 throughput", ("lora + nf4 base (double quant)", False, "samples_per_s"),
     ("lora bf16", False, "samples_per_s"), 0.7, ">="),
]


def targets(result: dict) -> list[dict]:
    """The issue's targets as measured ratios; a ratio whose runs failed is None (not met)."""
    w = result["weights"]
    rows = [{"target": "NF4 encoder weight bytes / bf16", "bound": 0.38, "op": "<=",
             "measured": sum(r["nf4"] for r in w) / sum(r["bfloat16"] for r in w)}]
    runs = {(r["config"], r["gradient_checkpointing"]): r for r in result.get("training", [])}
    for what, (n_cfg, n_ckpt, n_key), (d_cfg, d_ckpt, d_key), bound, op in TARGETS:
        num, den = runs.get((n_cfg, n_ckpt), {}).get(n_key), runs.get((d_cfg, d_ckpt), {}).get(d_key)
        rows.append({"target": what, "bound": bound, "op": op, "measured": num / den if num is not None and den else None})
    for row in rows:
        m = row["measured"]
        row["met"] = m is not None and (m <= row["bound"] if row["op"] == "<=" else m >= row["bound"])
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cuda'] or m['processor']} ({m['cpu_count']} CPU cores), torch {m['torch']}. "
             f"Settings: {result['settings']}.", "", "Encoder weight bytes (measured on the loaded models):", "",
             "| encoder | float32 MB | bfloat16 MB | int8 MB | NF4 MB | NF4 / bf16 |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["weights"]:
        lines.append(f"| {r['encoder']} | {r['float32'] / 1e6:.1f} | {r['bfloat16'] / 1e6:.1f} | {r['int8'] / 1e6:.1f} | "
                     f"{r['nf4'] / 1e6:.1f} | {r['nf4_vs_bf16']:.2f} |")
    tot = {k: sum(r[k] for r in result["weights"]) for k in ("float32", "bfloat16", "int8", "nf4")}
    lines.append(f"| both encoders | {tot['float32'] / 1e6:.1f} | {tot['bfloat16'] / 1e6:.1f} | {tot['int8'] / 1e6:.1f} | "
                 f"{tot['nf4'] / 1e6:.1f} | {tot['nf4'] / tot['bfloat16']:.2f} |")
    if "training" in result:
        lines += ["", "| configuration | grad. checkpointing | peak MiB | samples/s | trainable | `--dry-run` estimate MiB |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in result["training"]:
            ckpt = "yes" if r["gradient_checkpointing"] else "no"
            if "error" in r:
                lines.append(f"| {r['config']} | {ckpt} | failed: {r['error']} | | | |")
            else:
                peak = "n/a (no CUDA)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                lines.append(f"| {r['config']} | {ckpt} | {peak} | {r['samples_per_s']:.1f} | {r['trainable']:,} | "
                             f"{r['dry_run_estimate_mib']:.0f} |")
    else:
        lines += ["", "No CUDA GPU here: the peak-memory / throughput table needs one (run `mmpeft bench memory` on a GPU)."]
    lines += ["", "| target | bound | measured | |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        value = "n/a (not measured here, or a run failed)" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"| {t['target']} | {t['op']} {t['bound']} | {value} | {'met' if t['met'] else 'missed'} |")
    return "\n".join(lines) + "\n"
