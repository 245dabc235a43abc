"""Fold trained methods into the base weights and write a standalone, verified model.

Mergeable methods (the peft tuners: LoRA and its variants, IA3, VeRA, LoHa, LoKr, OFT,
BOFT, LN tuning, via peft's ``merge_and_unload``; BitFit, none and full already live in
the base weights) are folded; bottleneck adapters and prompts
cannot be (they add modules) and are kept, saved beside the merged base so that
``mmpeft predict MERGED_DIR`` still works. A quantized base is de-quantized to float32
first and never re-quantized.

Every merge is verified: a seeded probe batch goes through the unmerged and the merged
model; if the largest logit difference exceeds the tolerance nothing is written.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import Sample, recipe_splits
from ..data.batching import Collator, ImageStore
from ..encoders import build_encoder
from ..errors import MMPeftError, UsageError
from ..files import fingerprint_module
from ..methods import build_method
from .io import load_bundle, read_manifest
from .manifest import bundle_digest
from .writer import bundle_writer


def dequantized_weight(layer) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-/8-bit Linear computes with, ``[out, in]``."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise MMPeftError("this 4-bit layer was repacked by bitsandbytes' CPU bf16 kernel and cannot be de-quantized; "
                              "merge a freshly loaded bundle")
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        scb = getattr(layer.weight, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        weight = layer.weight.data.float() * scb.float().unsqueeze(1) / 127.0  # row-wise absmax int8
    return weight.reshape(layer.out_features, layer.in_features)


def copy_dequantized(source: nn.Module, target: nn.Module) -> int:
    """Copy every bitsandbytes layer of ``source`` into the same-named float Linear of ``target``."""
    import bitsandbytes as bnb

    copied = 0
    for name, module in source.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            dest = target.get_submodule(name)
            with torch.no_grad():
                dest.weight.copy_(dequantized_weight(module).to(dest.weight.dtype))
                if module.bias is not None:
                    dest.bias.copy_(module.bias.float())
            copied += 1
    return copied


def probe_batch(loaded, size: int = 16, seed: int = 0):
    """A seeded probe batch: the bundle's own test rows when its data is reachable, else synthetic."""
    store = ImageStore.for_encoders(loaded.model.encoders.values())  # one decode per image, check and batch alike
    rows, source = None, "synthetic"
    try:
        splits = recipe_splits(loaded.recipe)
        rng = random.Random(seed)
        first = [r for r in splits.test if r.dataset == splits.test[0].dataset]  # one dataset: every row has its inputs
        rows = rng.sample(first, min(size, len(first)))
        store.check({"probe": rows}, "error", on_bad_audio="error", on_bad_video="error")
        source = "bundle test data"
    except Exception:  # noqa: BLE001 - data not reachable here: fall back to synthetic inputs
        rows = None
    if rows is None:
        gen = np.random.default_rng(seed)
        words = ["is", "there", "a", "what", "the", "in", "image", "?"] + loaded.vocab[:20]
        rates = {enc.audio.sample_rate for enc in loaded.model.encoders.values() if enc.modality == "audio"}
        rows = []
        for i in range(size):
            path = f"<probe {i}>"
            store.put(path, Image.fromarray(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            if rates:  # a second of noise at the audio encoders' rate (one rate: several would need one clip each)
                store.put_audio(path, (0.1 * gen.standard_normal(max(rates))).astype(np.float32))
            if store.video_readers:  # clips of noise, as many frames as the longest reader takes
                count = max(frames for frames, _, _ in store.video_readers)
                store.put_clip(path, [Image.fromarray(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)])
            text = " ".join(gen.choice(words, size=6))
            rows.append(Sample(path, text, "", {}, path, path, video=path))
    collator = Collator(rows, dict(loaded.model.encoders.items()), loaded.tasks, store)
    return collator(list(range(len(rows))))["inputs"], source


def merge_in_memory(bundle, *, tolerance: float = 1e-5, allow_base_mismatch: bool = False, probe_size: int = 16,
                    expect_digest: Optional[str] = None):
    """Load a bundle twice, fold the mergeable methods of one copy, and verify it on a probe batch.

    Returns:
        ``(merged LoadedBundle, report, probe inputs)``.

    Raises:
        MMPeftError: when the max |logit difference| exceeds ``tolerance``.
    """
    reference = load_bundle(bundle, allow_base_mismatch=allow_base_mismatch, expect_digest=expect_digest)
    quantized = [n for n, c in reference.recipe.encoders.items() if c.quantization is not None]
    report: dict = {"folded": {}, "kept": {}, "dequantized": {}}
    if quantized:
        # A float32 copy of the model whose quantized layers get the exact de-quantized
        # weights the reference computes with: merging then happens in float32.
        merged = load_bundle(bundle, overrides=[f"encoders.{n}.quantization=null" for n in quantized], verify_base=False,
                             expect_digest=expect_digest)
        for n in quantized:
            report["dequantized"][n] = copy_dequantized(reference.model.encoders[n].model, merged.model.encoders[n].model)
    else:
        merged = load_bundle(bundle, allow_base_mismatch=allow_base_mismatch, expect_digest=expect_digest)
    inputs, source = probe_batch(reference, probe_size)
    with torch.no_grad():
        ref_logits = reference.model.logits(inputs)
    for name, enc in merged.model.encoders.items():
        method = merged.model.methods[name]
        if method.mergeable and method.merge(enc):
            report["folded"][name] = method.name
        else:
            report["kept"][name] = method.name
    for name, task in merged.tasks.items():  # a head's own parts (a decoder and its LoRA)
        for label, _, _, method, _ in task.head_parts(task.head):
            folded = task.merge_head(task.head)
            report["folded" if folded else "kept"][f"{name}.{label}"] = folded or method
    merged.model.float()
    with torch.no_grad():
        new_logits = merged.model.logits(inputs)
    diff = (new_logits - ref_logits).abs().max().item()
    agree = (new_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    report.update({"max_abs_logit_diff": diff, "top1_agreement": agree, "tolerance": tolerance,
                   "probe": {"source": source, "size": int(ref_logits.shape[0])}})
    if not math.isfinite(diff) or diff > tolerance:  # NaN compares false with everything: it is a failure too
        raise MMPeftError(
            f"merge verification failed: max |logit difference| {diff:.3e} > tolerance {tolerance:.0e} "
            f"(top-1 agreement {100 * agree:.1f}%); nothing was written"
        )
    return merged, report, inputs


def merge_bundle(bundle, out: Path, *, tolerance: float = 1e-5, allow_base_mismatch: bool = False,
                 overwrite: bool = False, probe_size: int = 16, expect_digest: Optional[str] = None) -> dict:
    """Merge ``bundle`` into a standalone model at ``out``.

    Returns:
        The merge report: folded / kept methods per encoder, ``max_abs_logit_diff``,
        ``top1_agreement``, tolerance and probe source, and the merged model's ``digest``.

    Raises:
        MMPeftError: the merged model differs from the unmerged one beyond ``tolerance``
            (nothing is written at ``out``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another --out")
    merged, report, _ = merge_in_memory(bundle, tolerance=tolerance, allow_base_mismatch=allow_base_mismatch,
                                        probe_size=probe_size, expect_digest=expect_digest)
    _write_merged(merged, report, out, overwrite, Path(bundle))
    report["digest"] = bundle_digest(read_manifest(out))
    return report


def _write_merged(merged, report: dict, out: Path, overwrite: bool, bundle: Path) -> None:
    recipe = merged.recipe.model_copy(deep=True)
    with bundle_writer(out, overwrite=overwrite) as writer:
        for name, enc in merged.model.encoders.items():
            base_dir = writer.path / "encoders" / name / "base"
            base_dir.mkdir(parents=True)
            with merged.model.methods[name].base_only(enc):  # a kept method's modules go beside the base
                enc.save_base(base_dir)
            cfg = recipe.encoders[name]
            cfg.model = f"encoders/{name}/base"
            cfg.quantization = None
            if name in report["folded"]:
                cfg.peft = {"method": "none"}
                merged.model.methods[name] = build_method({"method": "none"})
            # fingerprint of the merged base as it will be loaded back
            enc.base_fingerprint = fingerprint_module(build_encoder(str(base_dir), modality=enc.modality).model)
        heads = {}
        for name, task in merged.tasks.items():
            changes = task.save_merged(task.head, writer.path, f"heads/{name}")
            if changes:
                block = recipe.tasks[name] if recipe.tasks else recipe.task
                block.update(changes)
                heads[name] = changes
        metrics = json.loads((bundle / "metrics.json").read_text()) if (bundle / "metrics.json").is_file() else {}
        writer.add_model(merged.model, recipe, merged.tasks, metrics,
                         extra={"merged": True, "merge_report": report, "merged_heads": heads})
        writer.write_json("merge_report.json", report)
