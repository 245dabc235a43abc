"""The multimodal model: frozen encoders with their PEFT methods, plus a fusion head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config.tasks import recipe_tasks
from .encoders import Encoder, EncoderOutput, build_encoder
from .files import fingerprint_module
from .fusion import build_fusion
from .methods import PeftMethod, build_method, count_parameters
from .quant import prepare_for_kbit_training
from .tasks import TASK_INPUTS, Task


class TaskHeads(nn.Module):
    """Several tasks' heads over shared encoder outputs: each reads its own encoders (and,
    for the tasks in ``fed``, the task's own batch inputs) and returns its own output.
    ``temporal`` holds the video encoders' temporal components (:mod:`~mmpeft.encoders.video`):
    trained and saved with the heads, run on those encoders' outputs before any head reads them."""

    def __init__(self, heads: dict[str, nn.Module], reads: dict[str, list[str]], widths: dict[str, int],
                 fed: frozenset = frozenset(), temporal: dict[str, nn.Module] | None = None):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.temporal = nn.ModuleDict(temporal or {})
        self.reads = reads
        self.widths = widths
        self.fed = fed

    def forward(self, outputs: dict, fed: dict | None = None) -> dict[str, torch.Tensor]:
        rows = next(iter(outputs.values())).pooled
        results = {}
        for name, head in self.heads.items():
            if all(n in outputs for n in self.reads[name]) and (name not in self.fed or name in (fed or {})):
                sub = {n: outputs[n] for n in self.reads[name]}
                results[name] = as_output(head(sub, fed[name]) if name in self.fed else head(sub))
            else:  # a batch of another task's data, without this head's inputs: its output is not read
                results[name] = rows.new_zeros(rows.shape[0], self.widths[name], dtype=torch.float32)
        return results


def as_output(out: torch.Tensor) -> torch.Tensor:
    """A head's output as the tasks read it: float32 where it is floating point."""
    return out.float() if out.is_floating_point() else out


class MultimodalModel(nn.Module):
    """``encoders[name](inputs[name]) -> EncoderOutput``, then the head(s): ``{task: output}``,
    each task's own output (``widths[task]`` columns). :meth:`logits` puts them side by side
    (``slices[task]``), the one tensor merge checks and ONNX export compare."""

    def __init__(self, encoders: dict[str, Encoder], methods: dict[str, PeftMethod], head: nn.Module,
                 widths: dict[str, int], fed: frozenset = frozenset()):
        super().__init__()
        self.fed = fed  # tasks whose heads read the task's own batch inputs (inputs[TASK_INPUTS][task])
        self.encoders = nn.ModuleDict(encoders)
        self.methods = methods
        self.head = head
        self.widths = dict(widths)  # task name -> output width, in the tasks' order
        self.feature_caches: dict[str, "FeatureCache"] = {}

    @property
    def slices(self) -> dict[str, slice]:
        """Each task's columns of :meth:`logits`."""
        found, start = {}, 0
        for name, width in self.widths.items():
            found[name] = slice(start, start + width)
            start += width
        return found

    def logits(self, inputs, keys=None) -> torch.Tensor:
        """Every task's output side by side, as float32 ``[B, sum of widths]``."""
        outputs = [out.float() for out in self(inputs, keys).values()]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def enable_feature_cache(self) -> list[str]:
        """Cache the outputs of fully frozen encoders (methods that train nothing in them, such
        as ``none``): each question or image is encoded once, later epochs reuse it. Returns
        the encoders cached."""
        for name, method in self.methods.items():
            if not method.trains_encoder:
                self.feature_caches[name] = FeatureCache()
        return list(self.feature_caches)

    def disable_feature_cache(self) -> None:
        self.feature_caches = {}

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]], keys: dict[str, list] | None = None) -> dict[str, torch.Tensor]:
        """``inputs[name]`` are encoder tensors; an optional ``row_index`` ``[B]`` maps each
        example to a row of a de-duplicated batch (one image, many questions). ``keys[name]``
        (question text / image path per tensor row) lets frozen encoders use the feature cache."""
        outputs = self.encode(inputs, keys)
        fed = inputs.get(TASK_INPUTS)
        if isinstance(self.head, TaskHeads):
            return self.head(outputs, fed)
        name = next(iter(self.widths))  # one task over every encoder
        return {name: as_output(self.head(outputs, fed[name]) if name in self.fed else self.head(outputs))}

    def task_head(self, name: str) -> nn.Module:
        """The head of task ``name``."""
        return self.head.heads[name] if isinstance(self.head, TaskHeads) else self.head

    def encode(self, inputs: dict, keys: dict | None = None) -> dict[str, EncoderOutput]:
        """Every encoder's output for the encoders ``inputs`` has tensors for."""
        outputs = {}
        for name, enc in self.encoders.items():
            if name not in inputs:  # a batch of a task's own data, which this encoder does not read
                continue
            tensors = dict(inputs[name])
            rows = tensors.pop("row_index", None)
            cache = self.feature_caches.get(name)
            if cache is not None and keys is not None and name in keys:
                out = cache(enc, tensors, keys[name])
            else:
                out = enc(tensors)
            if isinstance(self.head, TaskHeads) and name in self.head.temporal:
                out = self.head.temporal[name](out)  # after the feature cache: a frozen encoder's frames are cached
            if rows is not None:
                out = EncoderOutput(out.tokens[rows], out.mask[rows], out.pooled[rows])
            outputs[name] = out
        return outputs

    def train(self, mode: bool = True):
        """Frozen encoder parts always run in eval mode (dropout off, batch-norm statistics
        fixed); only the modules a method owns (and the head) follow ``mode``."""
        super().train(mode)
        for name, enc in self.encoders.items():
            enc.eval()
            if mode:
                for module in self.methods[name].train_modules(enc):
                    module.train()
                for layer in enc.checkpointed_layers:
                    layer.training = True  # the flag alone: turns checkpointing on, leaves dropout off
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoders.parameters() if p.requires_grad]


class FeatureCache:
    """Per-example outputs of a frozen encoder, keyed by its input (text or image path)."""

    def __init__(self):
        self.store: dict = {}

    @torch.no_grad()
    def __call__(self, encoder, tensors: dict[str, torch.Tensor], keys: list) -> EncoderOutput:
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            index = torch.tensor(missing, device=next(iter(tensors.values())).device)
            out = encoder({k: v.index_select(0, index) for k, v in tensors.items()})
            for j, i in enumerate(missing):
                keep = out.mask[j]
                self.store[keys[i]] = (out.tokens[j][keep].clone(), out.pooled[j].clone())
        rows = [self.store[k] for k in keys]
        length = max(r[0].shape[0] for r in rows)
        first = rows[0][0]
        tokens = first.new_zeros(len(rows), length, first.shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=first.device)
        for i, (t, _) in enumerate(rows):
            tokens[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
        return EncoderOutput(tokens, mask, torch.stack([r[1] for r in rows]))


@dataclass
class EncoderSummary:
    name: str
    model: str
    method: str
    touched: list[str]
    trainable: int
    total: int


def build_model(recipe, tasks: dict[str, Task] | int, device: str = "cpu") -> MultimodalModel:
    """Build encoders, attach each encoder's method, and add each task's head.

    Args:
        recipe: a validated :class:`~mmpeft.config.Recipe`.
        tasks: the recipe's tasks (:func:`~mmpeft.tasks.build_task`), or a number of outputs
            for one fusion head over every encoder (benchmarks).
        device: where quantized weights are placed at load.
    """
    return assemble(recipe, *build_encoders(recipe, device), tasks)


def build_encoders(recipe, device: str = "cpu") -> tuple[dict, dict]:
    """Every encoder of ``recipe``, frozen, with its method attached: ``(encoders, methods)`` by name."""
    encoders, methods = {}, {}
    for name, cfg in recipe.encoders.items():
        encoders[name], methods[name] = build_adapted_encoder(name, cfg, recipe.train, device)
    return encoders, methods


def method_refusal(recipe, name: str) -> str | None:
    """Why encoder ``name``'s method cannot adapt it (None: it can); builds the frozen encoder
    and asks the method, so a benchmark can record the refusal instead of stopping on it."""
    cfg = recipe.encoders[name]
    return build_method(cfg.peft, where=f"encoders.{name}.peft").unavailable(frozen_encoder(cfg))


def frozen_encoder(cfg, device: str = "cpu"):
    """The recipe block's encoder, as loaded (quantized where it says), before any method."""
    return build_encoder(
        cfg.model, modality=cfg.modality, revision=cfg.revision, max_length=cfg.max_length,
        image_size=cfg.image_size, pooling=cfg.pooling, quantization=cfg.quantization, device=device, attention=cfg.attention,
        audio=cfg.audio, video=cfg.video,
    )


def build_adapted_encoder(name: str, cfg, train, device: str = "cpu"):
    """One frozen encoder with its fingerprint taken and its method attached: ``(encoder, method)``."""
    enc = frozen_encoder(cfg, device)
    if cfg.quantization is not None:
        prepare_for_kbit_training(enc)
    enc.base_fingerprint = fingerprint_module(enc.model)
    method = build_method(cfg.peft, where=f"encoders.{name}.peft")
    method.attach(enc)
    if train.gradient_checkpointing:
        enc.checkpointing = enc.enable_gradient_checkpointing()  # False: the model cannot (reported by dry runs)
    return enc, method


def assemble(recipe, encoders: dict, methods: dict, tasks: dict[str, Task] | int) -> MultimodalModel:
    """The model of ``encoders`` (built, possibly shared with other models) and new heads:
    one per task, each over the encoders it reads (its own head kind, else ``fusion:``)."""
    dims = {name: enc.output_width for name, enc in encoders.items()}
    torch.manual_seed(recipe.train.seed)  # head init is reproducible
    if isinstance(tasks, int):
        model = MultimodalModel(encoders, methods, build_fusion(recipe.fusion, dims, tasks), {"output": tasks})
        model.train(False)
        return model
    heads, reads = {}, {}
    for name, task in tasks.items():
        reads[name] = task.settings.encoders or list(encoders)
        task.reading({n: encoders[n].modality for n in reads[name]})
        sub = {n: dims[n] for n in reads[name]}
        heads[name] = task.build_head(sub, {n: encoders[n] for n in reads[name]}) or build_fusion(task.settings.head or recipe.fusion, sub, task.width)
        task.attach(heads[name])
    only = next(iter(heads.values()))
    # one task over every encoder: its head is the model's head (bundles of earlier versions load unchanged)
    widths = {n: t.width for n, t in tasks.items()}
    fed = frozenset(n for n, t in tasks.items() if t.feeds_head)
    temporal = {n: stage for n, enc in encoders.items() if (stage := enc.temporal_stage()) is not None}
    head = (only if len(heads) == 1 and reads[next(iter(reads))] == list(encoders) and not temporal
            else TaskHeads(heads, reads, widths, fed, temporal))
    model = MultimodalModel(encoders, methods, head, widths, fed)
    model.train(False)
    return model


def summarize(model: MultimodalModel, recipe, tasks: dict[str, Task] | None = None) -> list[EncoderSummary]:
    """A row per encoder, per part a task's head holds of its own (a decoder), and the heads."""
    rows = []
    for name, enc in model.encoders.items():
        method = model.methods[name]
        rows.append(EncoderSummary(
            name, recipe.encoders[name].model, method.name, method.touched,
            count_parameters(enc, trainable_only=True), count_parameters(enc),
        ))
    head = model.head
    only = next(iter(recipe_tasks(recipe).values()))
    kinds = (f"{len(head.heads)} task heads" if isinstance(head, TaskHeads) and len(head.heads) > 1 else
             recipe.fusion["type"] if only.uses_fusion else f"{only.registry_name} head")
    heads = head.heads if isinstance(head, TaskHeads) else {next(iter(model.widths)): head}
    parts = [(f"{name}.{label}", *part) for name, task in (tasks or {}).items() if name in heads
             for label, *part in task.head_parts(heads[name])]
    for label, module, source, method, touched in parts:
        rows.append(EncoderSummary(label, source, method, touched, count_parameters(module, True), count_parameters(module)))
    trained = count_parameters(head, True) - sum(count_parameters(p[1], True) for p in parts)
    every = count_parameters(head) - sum(count_parameters(p[1]) for p in parts)
    rows.append(EncoderSummary("head", kinds, "trainable", ["(all)"], trained, every))
    return rows
