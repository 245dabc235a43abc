"""One training loop, top to bottom: recipe -> data -> model -> train/eval -> bundle.

Built on accelerate, so the same code runs on CPU, one GPU, or several processes
under ``accelerate launch`` (data parallel).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bundle.card import write_card
from .bundle.writer import bundle_writer
from .config import Recipe, load_recipe
from .config.paths import require_data
from .data import Collator, ImageStore, load_splits, make_loader, probe_images
from .errors import UsageError
from .model import build_model, summarize
from .quant import require_bitsandbytes
from .report import print_epoch, print_summary, print_test, save_plots
from .runtime import groups_to_report, make_accelerator, peak_memory_mib, predict_logits, score
from .tasks import Vocabulary, summary_row


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, t):
    """AdamW with separate learning rates for adapters and head; no decay on biases/norms."""
    groups = []
    for params, lr in ((model.adapter_parameters(), t.lr), (model.head_parameters(), t.head_lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [g for g in ({"params": decay, "lr": lr, "weight_decay": t.weight_decay},
                               {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    bnb = require_bitsandbytes()
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups)


def finetune(recipe: Recipe | str | Path, overrides: Sequence[str] = (), dry_run: bool = False, overwrite: Optional[bool] = None):
    """Train a recipe end to end and write its bundle.

    Args:
        recipe: a :class:`Recipe` or a YAML path.
        overrides: dotted ``key=value`` overrides.
        dry_run: build the model, print what each method touches and the parameter counts, stop.
        overwrite: replace an existing bundle (default: ``output.overwrite``).

    Returns:
        The bundle directory (or the summary rows for a dry run).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    require_data(recipe)  # a missing data file is named before any model loads
    t = recipe.train
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe)
    is_main = accelerator.is_main_process
    log = accelerator.print
    set_seed(t.seed)
    out_dir = Path(recipe.output.dir) / recipe.run_name
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    if not dry_run and out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir} already exists; pass --overwrite (or output.overwrite=true) or set output.name")

    splits = load_splits(recipe.data, recipe.task.group_fields, t.seed)
    probe_images({"train": splits.train, "eval": splits.eval, "test": splits.test}, recipe.data.on_bad_image)
    vocab = Vocabulary.build([s.answer for s in splits.train], recipe.task.min_answer_count)
    device = str(accelerator.device.type)
    model = build_model(recipe, len(vocab), device=device)
    if is_main:
        print_summary(summarize(model, recipe), model, recipe, len(vocab), splits)
    if dry_run:
        return summarize(model, recipe)

    store = ImageStore.for_encoders(model.encoders.values())
    checked = store.check({"train": splits.train, "eval": splits.eval, "test": splits.test}, recipe.data.on_bad_image)
    splits.train, splits.eval, splits.test = checked["train"], checked["eval"], checked["test"]
    group_fields = groups_to_report(recipe, splits.test)
    encoders = dict(model.encoders.items())
    train_loader = make_loader(splits.train, Collator(splits.train, encoders, vocab, store, recipe.data.augment, t.seed),
                               t.batch_size, True, t.seed, t.num_workers, recipe.data.group_by_image)
    eval_loader = make_loader(splits.eval, Collator(splits.eval, encoders, vocab, store), t.eval_batch_size, False, t.seed, t.num_workers) if splits.eval else None
    test_loader = make_loader(splits.test, Collator(splits.test, encoders, vocab, store), t.eval_batch_size, False, t.seed, t.num_workers)

    optimizer = make_optimizer(model, t)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / t.gradient_accumulation_steps)
    total_steps = steps_per_epoch * t.epochs
    scheduler = cosine_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    if t.cache_frozen_features and not recipe.data.augment:
        cached = model.enable_feature_cache()
        if cached:
            log(f"caching features of frozen encoder(s): {', '.join(cached)}")
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, test_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    raw_model = accelerator.unwrap_model(model)

    writer = _tensorboard(out_dir.parent / ".runs" / recipe.run_name) if is_main else None
    higher_better = recipe.task.metric != "loss"
    best_value, best_state, best_epoch, stale = None, None, 0, 0
    history: list[dict] = []
    step = 0
    for epoch in range(1, t.epochs + 1):
        model.train()
        start, seen, running = time.perf_counter(), 0, 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{t.epochs}", disable=not accelerator.is_local_main_process, unit="batch")
        for batch in bar:
            with accelerator.accumulate(model):
                logits = model(batch["inputs"], batch.get("keys"))
                loss = F.cross_entropy(logits.float(), batch["labels"], ignore_index=-1, label_smoothing=t.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += batch["labels"].shape[0] * accelerator.num_processes
            running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
            if step % t.log_every == 0 or step == 1:
                rate = seen / max(1e-9, time.perf_counter() - start)
                bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{rate:.1f}")
                if writer:
                    writer.add_scalar("train/loss", running, step)
        epoch_seconds = time.perf_counter() - start
        row = {"epoch": epoch, "step": step, "train_loss": running, "epoch_seconds": round(epoch_seconds, 2),
               "samples_per_second": round(seen / max(1e-9, epoch_seconds), 2)}
        if eval_loader is not None and (epoch % t.eval_every_epochs == 0 or epoch == t.epochs):
            logits, index = predict_logits(model, eval_loader, accelerator, use_cache=True)
            metrics = score(logits, index, splits.eval, vocab, group_fields)
            row.update({f"eval_{k}": v for k, v in summary_row(metrics, group_fields).items()})
            row["eval_loss"] = metrics["loss"]
            value = metrics[recipe.task.metric]
            improved = best_value is None or (value > best_value if higher_better else value < best_value)
            if improved:
                best_value, best_epoch, stale = value, epoch, 0
                best_state = _trainable_state(raw_model)
            else:
                stale += 1
        history.append(row)
        if is_main:
            print_epoch(row)
            if writer:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch)
        if t.early_stopping_patience and stale >= t.early_stopping_patience:
            log(f"early stopping: no {recipe.task.metric} improvement for {stale} evaluation(s); best epoch {best_epoch}")
            break
    if best_state is not None:
        _load_trainable_state(raw_model, best_state)
        log(f"restored best checkpoint from epoch {best_epoch} ({recipe.task.metric}={best_value:.4f})")

    # The test pass never uses the feature cache, so `mmpeft evaluate` reproduces it exactly.
    logits, index = predict_logits(model, test_loader, accelerator, desc="test")
    test_metrics = score(logits, index, splits.test, vocab, group_fields)
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    if is_main:
        print_test(test_metrics, group_fields)
        metrics = {
            "test": test_metrics,
            "best_epoch": best_epoch or len(history),
            "history": history,
            "group_fields": group_fields,
            "data": {"source": recipe.data.source, "train": len(splits.train), "eval": len(splits.eval), "test": len(splits.test)},
            "eval_batch_size": t.eval_batch_size,
        }
        with bundle_writer(out_dir, overwrite=overwrite) as bundle:  # sealed (every file hashed) when the block ends
            manifest = bundle.add_model(raw_model.cpu(), recipe, vocab.to_list(), metrics)
            bundle.write_text("train_log.jsonl", "".join(json.dumps(row) + "\n" for row in history))
            if recipe.output.plots:
                save_plots(bundle.path, history, test_metrics, group_fields)
            write_card(bundle.path, manifest, metrics, recipe, name=out_dir.name)
        size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
        log(f"bundle written to {out_dir} ({size / 1e6:.2f} MB)")
        log(f"peak memory: {peak_memory_mib(accelerator.device):.0f} MiB "
            f"({'torch.cuda.max_memory_allocated' if accelerator.device.type == 'cuda' else 'process peak RSS'})")
    accelerator.wait_for_everyone()
    return out_dir


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: logging is optional
        return None
    return SummaryWriter(str(logdir))
