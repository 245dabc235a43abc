"""One training loop, top to bottom: recipe -> data -> model -> train/eval -> bundle.

Built on accelerate, so the same code runs on CPU, one GPU, or several processes
under ``accelerate launch`` (data parallel). The run writes checkpoints as it goes
(:mod:`mmpeft.checkpoint`) and ``resume=True`` continues from the newest one exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import faults
from .bundle.card import write_card
from .bundle.writer import bundle_writer
from .bundle.manifest import bundle_digest
from .checkpoint import (LoopState, RunningLoss, capture_rng, data_fingerprint, is_final, list_checkpoints, load_trainable_state, newest_checkpoint,
                         remove_checkpoints, restore_rng, run_settings, trainable_state, write_checkpoint)
from .config import Recipe, load_recipe
from .config.paths import require_data
from .data import probe_images, recipe_splits
from .data.batching import Collator, ImageStore, make_loader
from .data.sampling import DatasetBatches, epoch_sampler, timed
from .errors import Interrupted, UsageError
from .files import check_writable, output_lock
from .interrupt import stop_on_signals
from .model import build_model, summarize
from .profiling import StepProfiler
from .progress import progress
from .report import sampling_line, print_epoch, print_summary, print_test, save_plots
from .memory import peak_memory_mib
from .optim import cosine_with_warmup, make_optimizer
from .tracking import Trackers, check_trackers
from .runtime import agree_across_processes, make_accelerator, num_workers, pin_memory
from .scoring import flat_metrics, groups_to_report, in_order, predict_logits, prepare_tasks, score, select_metric, task_rows
from .tasks import recipe_task_set


@dataclass
class Run:
    """What one training run holds while it trains (built by :func:`finetune`)."""

    recipe: Recipe
    accelerator: Any
    model: Any  # prepared (possibly wrapped for data parallel)
    raw_model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    test_loader: Any
    collator: Collator
    splits: Any
    tasks: dict
    group_fields: dict
    checkpoints: Path
    settings: dict
    data_fp: str
    writer: Any = None
    last_checkpoint: float = 0.0
    profiler: Any = None  # a StepProfiler while training (train.profile_steps)

    def log(self, message: str) -> None:
        self.accelerator.print(message)


def finetune(recipe: Recipe | str | Path, overrides: Sequence[str] = (), dry_run: bool = False, overwrite: Optional[bool] = None,
             resume: bool = False):
    """Train a recipe end to end and write its bundle.

    Args:
        recipe: a :class:`Recipe` or a YAML path.
        overrides: dotted ``key=value`` overrides.
        dry_run: build the model, print what each method touches and the parameter counts, stop.
        overwrite: replace an existing bundle (default: ``output.overwrite``).
        resume: continue from the newest checkpoint of this run (start from the beginning
            when there is none; do nothing when the run is already complete).

    Returns:
        The bundle directory (or the summary rows for a dry run).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    require_data(recipe)  # a missing data file is named before any model loads
    t = recipe.train
    from accelerate.utils import set_seed

    out_dir = Path(recipe.output.dir) / recipe.run_name
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    accelerator = make_accelerator(recipe)
    is_main = accelerator.is_main_process
    if not dry_run:
        check_writable(out_dir)  # a folder that cannot be written fails now, not after training
    with ExitStack() as stack:
        if not dry_run and is_main:
            note = stack.enter_context(output_lock(out_dir.parent / f".{out_dir.name}.lock", str(out_dir)))
            if note:
                accelerator.print(note)
        checkpoints = out_dir.parent / ".checkpoints" / out_dir.name
        if not dry_run:
            found = list_checkpoints(checkpoints)
            if resume and out_dir.exists() and (not found or is_final(found[-1])):
                # the bundle is in place: the run completed (a final checkpoint left means its removal was cut short)
                others = sorted(p.name for p in checkpoints.parent.iterdir()
                                if p.is_dir() and p.name != out_dir.name and list_checkpoints(p)) \
                    if checkpoints.parent.is_dir() else []
                accelerator.print(f"{out_dir} is complete (its bundle is written); nothing to resume" + (
                    f". Interrupted runs beside it: {', '.join(others)} (resume one with output.name=<run> --resume)"
                    if others else ""))
                if is_main:
                    remove_checkpoints(checkpoints)
                return out_dir
            if out_dir.exists() and not overwrite and not resume:
                raise UsageError(f"{out_dir} already exists; pass --overwrite (or output.overwrite=true) or set output.name")
            if found and not resume:
                if not overwrite:
                    raise UsageError(f"{checkpoints} holds checkpoints of an interrupted run of {out_dir.name}: pass --resume "
                                     "to continue it, or --overwrite to start again")
                if is_main:
                    remove_checkpoints(checkpoints)
        set_seed(t.seed)
        started = time.perf_counter()
        result = _run(recipe, accelerator, out_dir, checkpoints, dry_run, resume)
        if not dry_run:
            minutes, seconds = divmod(round(time.perf_counter() - started), 60)
            accelerator.print(f"finished in {minutes} min {seconds:02d} s" if minutes else f"finished in {seconds} s")
        return result



def _run(recipe: Recipe, accelerator, out_dir: Path, checkpoints: Path, dry_run: bool, resume: bool):
    t = recipe.train
    is_main = accelerator.is_main_process
    trackers = check_trackers(t.report_to) if is_main and not dry_run else []  # a missing package fails before the data loads
    splits = recipe_splits(recipe)
    typical = probe_images({"train": splits.train, "eval": splits.eval, "test": splits.test}, recipe.data.on_bad_image,
                           recipe.data.on_bad_audio, recipe.data.on_bad_video)
    tasks = recipe_task_set(recipe, splits.train, check={"train": splits.train, "eval": splits.eval, "test": splits.test})
    for task in tasks.values():
        task.configure(t)
    model = build_model(recipe, tasks, device=str(accelerator.device.type))
    for note in filter(None, (task.start_note(model) for task in tasks.values())):
        accelerator.print(note)
    for name, enc in model.encoders.items():  # said once: real photos read at a copied recipe's 64 px lose their detail
        if typical and enc.modality == "image" and enc.image_size and typical >= 4 * enc.image_size:
            accelerator.print(f"images are {typical} px on their longer side (median); encoder {name!r} reads them at "
                              f"{enc.image_size} px (encoders.{name}.image_size): fine detail is lost, raise it if the "
                              "task needs it")
    if is_main:
        print_summary(summarize(model, recipe, tasks), model, recipe, tasks, splits)
    if dry_run:
        return summarize(model, recipe, tasks)

    store = ImageStore.for_encoders(model.encoders.values(), recipe.data.image_cache_mb)
    checked = store.check({"train": splits.train, "eval": splits.eval, "test": splits.test}, recipe.data.on_bad_image,
                          on_bad_audio=recipe.data.on_bad_audio, on_bad_video=recipe.data.on_bad_video)
    splits.train, splits.eval, splits.test = checked["train"], checked["eval"], checked["test"]
    faults.point("data.checked")
    encoders = dict(model.encoders.items())
    collator = Collator(splits.train, encoders, tasks, store, recipe.data.augment, t.seed)
    pin = pin_memory(t, accelerator.device.type)
    workers = num_workers(t, accelerator.device.type, accelerator.num_processes)
    if workers:
        accelerator.print(f"data loading: {workers} DataLoader worker(s) a process{', pinned memory' if pin else ''}")
    train_loader = make_loader(splits.train, collator, t.batch_size, True, t.seed, workers, recipe.data.group_by_image, pin,
                               t.task_sampling, t.sampling_temperature)
    if isinstance(train_loader.batch_sampler, DatasetBatches):
        accelerator.print(sampling_line(train_loader.batch_sampler, t))
    eval_loader = make_loader(splits.eval, Collator(splits.eval, encoders, tasks, store), t.eval_batch_size, False, t.seed,
                              workers, pin_memory=pin) if splits.eval else None
    test_loader = make_loader(splits.test, Collator(splits.test, encoders, tasks, store), t.eval_batch_size, False, t.seed,
                              workers, pin_memory=pin)

    optimizer = make_optimizer(model, t)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / t.gradient_accumulation_steps)
    total_steps = steps_per_epoch * t.epochs
    scheduler = cosine_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    if t.cache_frozen_features and not recipe.data.augment:
        cached = model.enable_feature_cache()
        if cached:
            accelerator.print(f"caching features of frozen encoder(s): {', '.join(cached)}")
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, test_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    raw_model = accelerator.unwrap_model(model)
    if t.compile:
        model = torch.compile(model)  # the first steps compile; _train reports how long they took
    run = Run(recipe, accelerator, model, raw_model, optimizer, scheduler, train_loader, eval_loader,
              test_loader, collator, splits, tasks, groups_to_report(recipe, splits.test), checkpoints,
              run_settings(recipe), data_fingerprint(splits), last_checkpoint=time.perf_counter())

    loop, best_state, saved = LoopState(), None, None
    if resume:
        found = newest_checkpoint(checkpoints, run.settings, run.data_fp, notice=run.log)
        if found is None:
            run.log(f"no checkpoint of this run in {checkpoints}; starting from the beginning")
        else:
            best_state = found.restore(run.raw_model, optimizer, scheduler, accelerator.scaler, accelerator.device)
            loop, saved = found.loop, found.meta
            accelerator.step = loop.accelerator_step
            where = "training done" if loop.finished else f"epoch {loop.epoch}, {loop.batches_done} batch(es) done"
            run.log(f"resuming from {found.path} ({where}, step {loop.step})")
    run.writer = Trackers(trackers, recipe.run_name, out_dir.parent / ".runs", run.settings) if is_main else None
    with stop_on_signals(notice=run.log) as stop:
        if not loop.finished:
            best_state = _train(run, loop, best_state, saved, stop)
            _checkpoint(run, loop, best_state, None, finished=True)
        if best_state is not None:
            load_trainable_state(run.raw_model, best_state)
            task_name, metric, _ = select_metric(recipe, tasks)
            run.log(f"restored best checkpoint from epoch {loop.best_epoch} ({task_name}.{metric}={loop.best_value:.4f})")
        _tune_on_validation(run)
        # The test pass never uses the feature cache, so `mmpeft evaluate` reproduces it exactly.
        test_metrics = _evaluate(run, test_loader, splits.test, desc="test", fault="test")
        if agree_across_processes(accelerator, stop, False)[0]:  # the final checkpoint is written: a resume repeats only the test pass
            raise _interrupted(stop, recipe, checkpoints)
    if run.writer:
        run.writer.close()
    accelerator.wait_for_everyone()
    if is_main:
        _write_bundle(run, out_dir, loop, test_metrics)
        faults.point("bundle.written")
        remove_checkpoints(checkpoints)
    accelerator.wait_for_everyone()
    return out_dir


def _train(run: Run, loop: LoopState, best_state, saved: Optional[dict], stop) -> Optional[dict]:
    """The epochs from ``loop``'s position on; returns the best trainable state (None without validation)."""
    t = run.recipe.train
    with StepProfiler(t.profile_steps, t.profile_skip, run.accelerator.device) as run.profiler:
        return _epochs(run, loop, best_state, saved, stop)


def _epochs(run: Run, loop: LoopState, best_state, saved: Optional[dict], stop) -> Optional[dict]:
    recipe, accelerator, model = run.recipe, run.accelerator, run.model
    t = recipe.train
    rank = accelerator.process_index
    generator, sampler = run.train_loader.generator, epoch_sampler(run.train_loader)
    select_task, select, higher_better = select_metric(recipe, run.tasks)
    averages = RunningLoss(loop)
    for epoch in range(loop.epoch, t.epochs + 1):
        resumed = saved is not None and epoch == loop.epoch
        mid_epoch = resumed and loop.batches_done > 0
        if hasattr(run.train_loader, "iteration"):
            run.train_loader.iteration = epoch - 1  # accelerate sets the sampler's epoch from it (a resumed run starts at 0)
        if resumed:  # mid-epoch: replay the epoch's data order from its start; else continue from the last step
            restore_rng(saved["epoch_rng"][rank] if mid_epoch else saved["rng"][rank], generator, sampler)
        epoch_rng = capture_rng(generator, sampler)
        run.collator.epoch = epoch
        model.train()
        start = time.perf_counter()
        if not mid_epoch:
            loop.seen, loop.batches_done = 0, 0
        loader = _skip_batches(run.train_loader, loop.batches_done) if mid_epoch else run.train_loader
        epoch_batches = loop.batches_done + len(loader)  # counted before the sampler moves on to the next epoch
        waiting = [0.0]  # seconds this epoch spent waiting for batches (loading, collating), not computing
        batches = timed(iter(loader), waiting)
        first = next(batches, None)  # draws the epoch's order (and prefetches) before the RNG is set below
        if mid_epoch:
            restore_rng(saved["rng"][rank], data_order=False)
        bar = progress(itertools.chain([first], batches) if first is not None else [], desc=f"epoch {epoch}/{t.epochs}",
                       total=len(loader), unit="batch", disable=not accelerator.is_local_main_process)
        for batch in bar:
            with accelerator.accumulate(model):
                out = model(batch["inputs"], batch.get("keys"))
                losses = {name: task.loss(out[name], batch["targets"][name], batch["counts"][name])
                          for name, task in run.tasks.items()}
                loss = sum(run.tasks[name].settings.weight * value for name, value in losses.items())
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.batches_done += 1
            if t.compile and loop.batches_done == 1 and epoch == 1:
                run.log(f"torch.compile: the first step took {time.perf_counter() - start:.1f} s (compiling)")
            loop.seen += batch["index"].shape[0] * accelerator.num_processes
            averages.update(loss, losses, batch["counts"])
            if loop.step % t.log_every == 0 or loop.step == 1 or loop.batches_done == epoch_batches:  # and each epoch's end
                averages.sync()
                each = {name: f"{v:.3f}" for name, v in loop.task_running.items()}
                bar.set_postfix(loss=f"{loop.running:.4f}", **each,
                                samples_per_s=f"{loop.seen / max(1e-9, time.perf_counter() - start):.1f}")
                if run.writer:
                    run.writer.log({"train/loss": loop.running,
                                    **{f"train/loss_{name}": v for name, v in loop.task_running.items()}}, loop.step)
            run.profiler.step()
            faults.point("train.step")
            if accelerator.sync_gradients and loop.batches_done < epoch_batches:  # the epoch's end has its own checkpoint
                loop.epoch = epoch
                stopping, save = agree_across_processes(accelerator, stop, _due(run, loop, per_epoch=False))
                if save:
                    averages.sync()
                    _checkpoint(run, loop, best_state, epoch_rng)
                    if stopping:
                        raise _interrupted(stop, recipe, run.checkpoints)
        if first is None:  # no batch ran (each epoch's last step synced the averages above)
            averages.sync()
        epoch_seconds = time.perf_counter() - start
        row = {"epoch": epoch, "step": loop.step, "train_loss": loop.running, "epoch_seconds": round(epoch_seconds, 2),
               "samples_per_second": round(loop.seen / max(1e-9, epoch_seconds), 2), "data_seconds": round(waiting[0], 2),
               "ended_at": round(time.time(), 3),  # unix time: where the epoch sits in a log or a GPU trace
               **{f"train_loss.{name}": v for name, v in loop.task_running.items()}}
        if run.eval_loader is not None and (epoch % t.eval_every_epochs == 0 or epoch == t.epochs):
            metrics = _evaluate(run, run.eval_loader, run.splits.eval, use_cache=True, fault="eval")
            row.update({f"eval_{k}": v for k, v in flat_metrics(run.tasks, metrics).items()})
            value = metrics[select_task].get(select, float("nan"))
            improved = math.isfinite(value) and (loop.best_value is None or (value > loop.best_value if higher_better else value < loop.best_value))
            if improved:
                loop.best_value, loop.best_epoch, loop.stale = value, epoch, 0
                best_state = trainable_state(run.raw_model)
            else:
                loop.stale += 1
        loop.history.append(row)
        if accelerator.is_main_process:
            print_epoch(row)
            if run.writer:  # per epoch: eval/accuracy, train/loss, epoch/seconds, ...
                run.writer.log({k.replace("_", "/", 1): v for k, v in row.items() if k not in ("epoch", "step", "ended_at")},
                               epoch)
        loop.epoch, loop.batches_done, saved = epoch + 1, 0, None
        if t.early_stopping_patience and loop.stale >= t.early_stopping_patience:
            run.log(f"early stopping: no {select_task}.{select} improvement for {loop.stale} evaluation(s); best epoch {loop.best_epoch}")
            break
        if epoch < t.epochs:  # after the last epoch comes the final checkpoint, below the loop
            stopping, save = agree_across_processes(accelerator, stop, _due(run, loop, per_epoch=True))
            if save:
                _checkpoint(run, loop, best_state, None)
                if stopping:
                    raise _interrupted(stop, recipe, run.checkpoints)
    return best_state


def _evaluate(run: Run, loader, rows, desc: str = "eval", use_cache: bool = False, fault: str = "") -> dict[str, dict]:
    """Every task's metrics on a split (contrastive class embeddings refreshed first)."""
    prepare_tasks(run.raw_model, run.tasks, run.accelerator.device, run.recipe)
    outputs, index = predict_logits(run.model, loader, run.accelerator, desc=desc, use_cache=use_cache, fault=fault)
    return score(outputs, index, rows, run.tasks, run.group_fields)


def _tune_on_validation(run: Run) -> None:
    """Settings a task chooses on the validation split (a multilabel threshold), once, with the final weights."""
    tuning = [task for task in run.tasks.values() if task.tunes]
    if not tuning:
        return
    if run.eval_loader is None:
        run.log("tune_threshold: no validation split (data.eval_fraction is 0); the threshold stays as set")
        return
    outputs, index = predict_logits(run.model, run.eval_loader, run.accelerator, desc="tune")
    ordered = in_order(outputs, index, run.splits.eval)
    for task in tuning:
        run.log(task.tune(*task_rows(ordered, task)))



def _due(run: Run, loop: LoopState, per_epoch: bool) -> bool:
    """Whether a checkpoint is due now: ``train.checkpoint_every`` (every epoch, or every N
    steps) or ``train.checkpoint_minutes`` since the last one."""
    t = run.recipe.train
    every = t.checkpoint_every
    if per_epoch and every == "epoch" or not per_epoch and isinstance(every, int) and loop.step % every == 0:
        return True
    return bool(t.checkpoint_minutes) and time.perf_counter() - run.last_checkpoint >= 60 * t.checkpoint_minutes


def _checkpoint(run: Run, loop: LoopState, best_state, epoch_rng: Optional[dict], finished: bool = False) -> None:
    """Write a checkpoint of the current state (every process's RNG, gathered to the first)."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    loop.finished = finished
    loop.accelerator_step = accelerator.step
    rng = capture_rng(run.train_loader.generator, epoch_sampler(run.train_loader))
    rngs = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    epoch_rngs = (gather_object([epoch_rng]) if accelerator.num_processes > 1 else [epoch_rng]) if epoch_rng else None
    if accelerator.is_main_process:
        write_checkpoint(run.checkpoints, model=run.raw_model, optimizer=run.optimizer, scheduler=run.scheduler,
                         scaler=accelerator.scaler, loop=loop, rng=rngs, epoch_rng=epoch_rngs, best_state=best_state,
                         settings=run.settings, data_fp=run.data_fp, keep=run.recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    run.last_checkpoint = time.perf_counter()


RESUME_COMMAND = "mmpeft finetune <the same recipe and overrides> --resume"  # the CLI puts the command it ran here


def _interrupted(stop, recipe: Recipe, checkpoints: Path) -> Interrupted:
    why = f"stopped by {stop.name}" if stop else "stopped with another process of this run, which was signalled"
    return Interrupted(f"{why}; checkpoint written to {checkpoints}. Resume with: {RESUME_COMMAND}", stop.exit_code)


def _skip_batches(loader, count: int):
    from accelerate import skip_first_batches

    return skip_first_batches(loader, count)


def _write_bundle(run: Run, out_dir: Path, loop: LoopState, test_metrics: dict) -> None:
    recipe, splits = run.recipe, run.splits
    print_test(test_metrics, run.tasks)
    first = next(iter(run.tasks))
    metrics = {
        "test": test_metrics[first],  # the first task's, where earlier versions kept the only one
        "tasks": test_metrics,
        "best_epoch": loop.best_epoch or len(loop.history),
        "history": loop.history,
        "group_fields": run.group_fields[first],
        "task_group_fields": run.group_fields,
        "data": {"source": recipe.data.source, "train": len(splits.train), "eval": len(splits.eval), "test": len(splits.test)},
        "eval_batch_size": recipe.train.eval_batch_size,
    }
    with bundle_writer(out_dir, overwrite=True) as bundle:  # sealed (every file hashed) when the block ends
        manifest = bundle.add_model(run.raw_model.cpu(), recipe, run.tasks, metrics)
        bundle.write_text("train_log.jsonl", "".join(json.dumps(row) + "\n" for row in loop.history))
        if run.profiler is not None and run.profiler.summary is not None:
            bundle.write_json("profile.json", run.profiler.summary)
            bundle.write_text("profile.txt", run.profiler.table)
        if recipe.output.plots:
            save_plots(bundle.path, loop.history, test_metrics[first], run.group_fields[first])
            for name, task in run.tasks.items():
                task.save_pictures(bundle.path, test_metrics[name])
        write_card(bundle.path, manifest, metrics, recipe, name=out_dir.name)
        faults.point("bundle.writing")
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    run.log(f"bundle written to {out_dir} ({size / 1e6:.2f} MB), digest {bundle_digest(manifest)}")
    device = run.accelerator.device
    run.log(f"peak memory: {peak_memory_mib(device):.0f} MiB "
            f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process peak RSS'})")




