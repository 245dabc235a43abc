"""What training, evaluation, prediction and the benchmarks share at run time: where a
recipe runs and under which precision, the accelerator, running a loader through the
model, scoring, and memory (measured and estimated).

Nothing here trains; ``mmpeft evaluate`` and ``mmpeft predict`` use this module without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import resource

import torch
import torch.nn.functional as F

from . import faults
from .config import Recipe
from .errors import RecipeError
from .progress import progress
from .quant import weight_bytes
from .tasks import Vocabulary, compute_metrics


def train_device(t) -> str:
    """Where a recipe's ``train`` block trains: "cuda" or "cpu" (``auto``: CUDA when visible)."""
    return "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_mixed_precision(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def inference_autocast(recipe: Recipe, device: str):
    """The autocast a bundle's model ran under when it was trained and scored, for
    evaluating or predicting on ``device`` (a bf16-trained model scored in float32 gives
    other numbers). fp16 is CUDA-only, so elsewhere it falls back to float32."""
    precision = resolve_mixed_precision(recipe.train.mixed_precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or (precision == "fp16" and device != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def fresh_accelerator(**settings):
    """An ``Accelerator`` with these settings, even if this process made another before.

    accelerate keeps one process-wide state and refuses a second Accelerator with other
    settings ("AcceleratorState has already been initialized"), so ``mmpeft.finetune`` of
    a bf16 recipe after a float32 one (or ``evaluate`` after a GPU run) failed in one
    Python process. Each run gets its own state; the distributed (partial) state is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**settings)


def make_accelerator(recipe: Recipe):
    t = recipe.train
    device = train_device(t)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(["train.device: 'cuda' but no CUDA GPU is visible; set train.device=cpu or auto"])
    precision = resolve_mixed_precision(t.mixed_precision, device)
    if precision == "fp16" and device == "cpu":
        raise RecipeError(["train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"])
    from accelerate.utils import DataLoaderConfiguration

    return fresh_accelerator(cpu=device == "cpu", mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                             dataloader_config=DataLoaderConfiguration(non_blocking=pin_memory(t, device)))  # copies overlap compute


def pin_memory(train, device: str) -> bool:
    """``train.pin_memory``, or on by default where batches are copied to a GPU."""
    return train.pin_memory if train.pin_memory is not None else device == "cuda"


@torch.no_grad()
def predict_logits(model, loader, accelerator, desc: str = "eval", use_cache: bool = False, fault: str = ""):
    """Run ``loader`` through the model. Returns ``(logits [N, C], index [N])`` on every process.
    ``fault`` names the :mod:`~mmpeft.faults` point reached after the first batch."""
    model.eval()
    all_logits, all_index = [], []
    for batch in progress(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(batch["inputs"], batch.get("keys") if use_cache else None).float()
        logits, index = accelerator.gather_for_metrics((logits, batch["index"]))
        all_logits.append(logits.cpu())
        all_index.append(index.cpu())
        if fault:
            faults.point(fault)
    return torch.cat(all_logits), torch.cat(all_index)


def score(logits, index, samples, vocab: Vocabulary, group_fields) -> dict:
    """Metrics from logits; gold answers outside the vocabulary count as wrong."""
    order = index.argsort()
    logits, index = logits[order], index[order]
    preds = [vocab.answers[i] for i in logits.argmax(-1).tolist()]
    rows = [samples[i] for i in index.tolist()]
    golds = [r.answer for r in rows]
    groups = {f: [r.groups.get(f, "") for r in rows] for f in group_fields}
    metrics = compute_metrics(preds, golds, groups, [vocab.encode(g) >= 0 for g in golds])
    labels = torch.tensor([vocab.encode(g) for g in golds])
    known = labels >= 0
    metrics["loss"] = float(F.cross_entropy(logits[known], labels[known])) if known.any() else float("nan")
    return metrics


def groups_to_report(recipe: Recipe, samples) -> list[str]:
    """The row fields reported per group: the recipe's, else every group the rows carry."""
    fields = list(recipe.task.group_fields)
    if not fields and samples:
        fields = sorted(samples[0].groups)
    return fields


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def estimate_training_memory(encoder, recipe) -> int:
    """Rough peak training memory of one encoder in bytes.

    weights as stored + 12 bytes per trainable parameter (gradient and two Adam moments) +
    activations: 64 bytes x hidden x tokens x (layers / 2) x batch, a quarter of that with
    gradient checkpointing, plus a bf16 copy of trainable weights under mixed precision.
    The constants were fitted to ``mmpeft bench memory`` on an H100 (BERT-base + ViT-B/16,
    batch 32, bf16 autocast), where the estimate came within 5% of the measured peak
    for full fine-tuning, LoRA bf16 and LoRA + NF4, with and without checkpointing.
    bitsandbytes' int8 layers held 2-4x this estimate on an H100 (see README).
    """
    t = recipe.train
    weights = weight_bytes(encoder)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    hidden = encoder.hidden_size
    if encoder.modality == "text":
        tokens = encoder.max_length
    else:
        tokens = (encoder.image_size // 16) ** 2 + 1
    layers = sum(1 for n, _ in encoder.named_modules() if n.count(".") >= 1 and n.rsplit(".", 1)[-1].isdigit()) or 12
    act = 64 * hidden * tokens * max(1, layers // 2) * t.batch_size
    if encoder.checkpointing:
        act //= 4
    if resolve_mixed_precision(t.mixed_precision, train_device(t)) != "no":
        act += 2 * trainable  # autocast keeps a low-precision copy of each trainable weight
    return weights + 12 * trainable + act
