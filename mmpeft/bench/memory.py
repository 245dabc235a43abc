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
from pathlib import Path

import torch

from . import machine_info, output_folder, write_atomic

CONFIGS = [
    # name, method, bits, mixed precision
    ("full bf16", "full", None),
    ("lora bf16", "lora", None),
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


def _recipe(text: str, image: str, method: str, bits, checkpointing: bool, batch: int, device: str):
    from ..config import load_recipe

    quant = None if bits is None else {"bits": bits, "quant_type": "nf4", "double_quant": True,
                                       "compute_dtype": "bfloat16" if device == "cuda" else "float32"}
    enc = lambda m: {"model": m, "peft": {"method": method}, "quantization": quant, "max_length": 32}  # noqa: E731
    return load_recipe({
        "name": "memory", "encoders": {"text": enc(text), "image": enc(image)}, "fusion": {"type": "gated"},
        "data": {"source": "easy_vqa"},
        "train": {"batch_size": batch, "gradient_checkpointing": checkpointing, "mixed_precision": "bf16" if device == "cuda" else "no"},
    })


def weight_report(text: str, image: str) -> list[dict]:
    """Encoder weight bytes as stored in float32, bfloat16, int8 and NF4 (measured on the loaded models)."""
    from ..config import QuantizationConfig
    from ..encoders import build_encoder
    from ..quant import weight_bytes

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


def cuda_report(text: str, image: str, batch: int = 32, steps: int = 6) -> list[dict]:
    from ..model import build_model
    from ..train import make_optimizer

    rows = []
    for name, method, bits in CONFIGS:
        for ckpt in (False, True):
            gc.collect()
            torch.cuda.empty_cache()
            recipe = _recipe(text, image, method, bits, ckpt, batch, "cuda")
            model = build_model(recipe, num_outputs=500, device="cuda").cuda()
            model.train()
            opt = make_optimizer(model, recipe.train)
            ids = torch.randint(5, 1000, (batch, 32), device="cuda")
            inputs = {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      "image": {"pixel_values": torch.randn(batch, 3, 224, 224, device="cuda")}}
            labels = torch.randint(0, 500, (batch,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = None
            for step in range(steps):
                if step == 2:  # first steps warm up kernels and allocator
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(inputs).float(), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            rate = batch * (steps - 2) / (time.perf_counter() - start)
            rows.append({"config": name, "gradient_checkpointing": ckpt,
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "samples_per_s": rate,
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
            del model, opt, inputs
    return rows


def run(out: str = "benchmarks/results", cpu_only: bool = False, small: bool = False) -> dict:
    out_path = output_folder(out)
    with tempfile.TemporaryDirectory() as tmp:
        text, image = build_bases(Path(tmp), small=small)
        result = {"machine": machine_info(), "settings": {"batch": 32, "image_size": 224, "tokens": 32,
                                                          "text": "BERT-base config (random)", "image": "ViT-B/16 config (random)"},
                  "weights": weight_report(text, image)}
        if torch.cuda.is_available() and not cpu_only:
            result["training"] = cuda_report(text, image)
            result["targets"] = targets(result)
    write_atomic(out_path / "memory.json", json.dumps(result, indent=2))
    write_atomic(out_path / "memory.md", markdown(result))
    return result


def targets(result: dict) -> dict:
    t = {(r["config"], r["gradient_checkpointing"]): r for r in result["training"]}
    w = result["weights"]
    nf4 = sum(r["nf4"] for r in w) / sum(r["bfloat16"] for r in w)
    return {
        "lora_bf16_peak_vs_full (<=0.45)": t[("lora bf16", False)]["peak_mib"] / t[("full bf16", False)]["peak_mib"],
        "nf4_weight_bytes_vs_bf16 (<=0.38)": nf4,
        "nf4_ckpt_peak_vs_lora_bf16_ckpt (<=0.65)": t[("lora + nf4 base (double quant)", True)]["peak_mib"] / t[("lora bf16", True)]["peak_mib"],
        "nf4_throughput_vs_lora_bf16 (>=0.7)": t[("lora + nf4 base (double quant)", False)]["samples_per_s"] / t[("lora bf16", False)]["samples_per_s"],
    }


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
        lines += ["", "| configuration | grad. checkpointing | peak MiB | samples/s | trainable |", "|---|---|---:|---:|---:|"]
        for r in result["training"]:
            lines.append(f"| {r['config']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['peak_mib']:.0f} | "
                         f"{r['samples_per_s']:.1f} | {r['trainable']:,} |")
        lines += ["", "| target | measured |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in result["targets"].items()]
    else:
        lines += ["", "No CUDA GPU here: the peak-memory / throughput table needs one (run `mmpeft bench memory` on a GPU)."]
    return "\n".join(lines) + "\n"
