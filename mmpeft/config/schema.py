"""The recipe schema: strict, typed, every key documented.

Method and fusion settings are validated by the settings class registered under
the method's / head's name (``mmpeft.config.methods``, ``mmpeft.config.fusion``), so
adding a method never means editing this file.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator, PositiveFloat, PositiveInt, NonNegativeFloat, NonNegativeInt

from .datasets import DATASET_SPECS


class Strict(BaseModel):
    """Base for every recipe block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(Strict):
    """Load the frozen base weights quantized with bitsandbytes (QLoRA style)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4) or 8 (LLM.int8) bit base weights")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="also quantize the 4-bit quantization constants")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "float32", description="dtype of the matmuls on de-quantized weights"
    )


class AudioConfig(Strict):
    """How an audio encoder reads a clip: mono, resampled, then a log-mel spectrogram
    (efficientnet-lite0-audio). A longer clip is truncated (and counted in the run's summary)."""

    sample_rate: PositiveInt = Field(16000, ge=1000, le=192000, description="audio: clips are resampled to this rate (Hz)")
    max_seconds: PositiveFloat = Field(2.0, le=600, description="audio: clips are cut to this length (counted), shorter ones padded with silence")
    window_ms: PositiveFloat = Field(25.0, le=1000, description="audio: spectrogram window (Hann), milliseconds")
    hop_ms: PositiveFloat = Field(10.0, le=1000, description="audio: step between spectrogram frames, milliseconds")
    n_mels: PositiveInt = Field(64, ge=8, le=512, description="audio: mel bins (the spectrogram image's height)")
    f_min: NonNegativeFloat = Field(0.0, description="audio: lowest mel frequency (Hz)")
    f_max: Optional[PositiveFloat] = Field(None, description="audio: highest mel frequency (Hz; null: half the sample rate)")
    top_db: PositiveFloat = Field(80.0, le=200, description="audio: dynamic range kept below each clip's peak (dB)")

    @model_validator(mode="after")
    def _consistent(self):
        nyquist = self.sample_rate / 2
        if self.f_max is not None and self.f_max > nyquist:
            raise ValueError(f"f_max {self.f_max:g} Hz is above half the sample rate ({nyquist:g} Hz)")
        if self.f_min >= (self.f_max or nyquist):
            raise ValueError(f"f_min {self.f_min:g} Hz must be below f_max ({self.f_max or nyquist:g} Hz)")
        if self.hop_ms > self.window_ms:
            raise ValueError(f"hop_ms {self.hop_ms:g} is longer than window_ms {self.window_ms:g}: frames would skip audio")
        if self.max_seconds * 1000 / self.hop_ms > 100_000:
            raise ValueError("max_seconds / hop_ms gives more than 100,000 frames a clip; raise hop_ms or lower max_seconds")
        return self


class VideoConfig(Strict):
    """How a video encoder reads a clip: ``frames`` frames of its first ``max_seconds``, each
    through the image encoder named by ``model`` (one PEFT method, weights shared by every
    frame), then a temporal component over the frame embeddings."""

    frames: PositiveInt = Field(8, le=64, description="video: frames read from each clip (fewer in a shorter clip: masked)")
    fps: Optional[PositiveFloat] = Field(None, le=120, description="video: read one frame every 1/fps seconds from the start "
                                         "(at most `frames`); null: `frames` spread uniformly over the clip")
    max_seconds: PositiveFloat = Field(10.0, le=600, description="video: only this much of a clip is decoded")
    temporal: Literal["mean", "transformer", "tdconv"] = Field(
        "mean", description="video: over the frame embeddings, mean pooling (CLIP4Clip meanP), a temporal transformer with "
        "learned frame positions (CLIP4Clip seqTransf) or a temporal-difference 1-D convolution; trained with the heads")
    layers: PositiveInt = Field(2, le=12, description="video: temporal transformer layers")
    heads: PositiveInt = Field(4, le=64, description="video: temporal transformer attention heads (must divide the width)")
    width: Optional[PositiveInt] = Field(None, le=8192, description="video: transformer / tdconv width (frame embeddings are "
                                         "projected to it; null: the image encoder's width)")


class EncoderConfig(Strict):
    """One frozen pretrained encoder and the PEFT method attached to it."""

    model: str = Field(..., description="zoo short name (minilm, efficientnet-lite0, efficientnet-lite0-audio), hub id or local directory")
    modality: Optional[Literal["text", "image", "audio", "video"]] = Field(
        None, description="what the encoder reads; inferred from the model when omitted (video: an image encoder's "
        "model read frame by frame, always given)"
    )
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit)")
    max_length: PositiveInt = Field(32, le=65536, description="text: maximum number of tokens")
    image_size: Optional[PositiveInt] = Field(None, le=8192, description="image: resize to this square size (default: the model's own)")
    pooling: Literal["auto", "cls", "mean", "pooler"] = Field("auto", description="how token features become one vector")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="audio encoders: how clips are read")
    video: VideoConfig = Field(default_factory=VideoConfig, description="video encoders: how clips are read and frames combined")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="transformers models: attention implementation (auto: the library's choice, SDPA where supported)")
    peft: dict[str, Any] = Field(
        default_factory=lambda: {"method": "lora"},
        description="method: lora|bitfit|none|full|... plus that method's own settings",
    )
    quantization: Optional[QuantizationConfig] = Field(None, description="load the base quantized (bitsandbytes)")


class DataConfig(Strict):
    source: str = Field("manifest", description="where rows come from: a registered data source (manifest, huggingface, "
                        "easy_vqa, easy_vqa_captions, vqa_rad, fsdd, moving_shapes, moving_shapes_captions; easy_vqa_captions: one caption per easy-VQA image, "
                        "\"a red circle\", its class the answer)")
    path: Optional[str] = Field(None, description="huggingface: a datasets save_to_disk folder, a .parquet / .arrow file or a "
                                "folder of them, or an imagefolder / audiofolder folder (relative paths in a recipe file are "
                                "read from its folder); data.test: a second one for the test rows")
    split: str = Field("train", min_length=1, max_length=200, description="huggingface: the split holding the training rows")
    eval_split: Optional[str] = Field(None, max_length=200, description="huggingface: a split of validation rows (default: "
                                      "eval_fraction of the training rows held out)")
    test_split: str = Field("test", min_length=1, max_length=200, description="huggingface: the split holding the test rows "
                            "(of data.test when given, else of data.path)")
    root: Optional[str] = Field(None, description="vqa_rad / fsdd: dataset directory ($MMPEFT_VQA_RAD_ROOT / $MMPEFT_FSDD_ROOT replace it; default ../shared/vqa_rad, ../shared/fsdd); manifest: the folder data.train/eval/test are relative to")
    pair_images: bool = Field(False, description="fsdd: give each recording a handwritten image of its digit (scikit-learn's digits; disjoint image halves for train and test, seeded)")
    text: str = Field("", max_length=1000, description="fsdd: the text of every row (for recipes with a text encoder)")
    holdout_speakers: list[str] = Field(default_factory=list, max_length=16, description="fsdd: these speakers' recordings are the test set (speaker-independent split); empty: the official split (indices 0-4 of every digit and speaker)")
    clips: PositiveInt = Field(600, le=100_000, description="moving_shapes: generated training clips (validation: a quarter "
                               "as many, test: half as many)")
    train: Optional[str] = Field(None, description="manifest: training file (.jsonl, .csv or .json); relative paths in a recipe file are read from its folder (or data.root)")
    eval: Optional[str] = Field(None, description="manifest: validation file; default: a held-out part of train")
    test: Optional[str] = Field(None, description="manifest: test file; huggingface: a second dataset for the test rows")
    image_field: str = Field("image", description="manifest column holding the image path (relative to the manifest)")
    text_field: str = Field("question", description="manifest column holding the text")
    label_field: str = Field("answer", description="manifest column holding the answer / label")
    audio_field: str = Field("audio", description="manifest column holding the audio path (relative to the manifest)")
    video_field: str = Field("video", description="manifest column holding the video path (relative to the manifest)")
    encoder_fields: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="manifest: {encoder name: column} for an encoder that reads a "
        "column of its own instead of its modality's image_field / text_field / audio_field (e.g. two image encoders on "
        "the current and the prior scan)")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of train held out for validation when no eval file")
    on_bad_image: Literal["error", "skip"] = Field("error", description="a missing or unreadable image stops the run, or its rows are skipped")
    on_bad_audio: Literal["error", "skip"] = Field("error", description="a missing, unreadable, empty or zero-length audio file stops the run, or its rows are skipped")
    on_bad_video: Literal["error", "skip"] = Field("error", description="a missing, unreadable, damaged or zero-length video stops the run, or its rows are skipped")
    image_cache_mb: PositiveInt = Field(8192, le=1_000_000, description="decoded images and their pixels kept in memory, "
                                        "at most this many MiB (the least recently used are dropped, and decoded again when needed)")
    max_train_samples: Optional[PositiveInt] = Field(None, description="use only the first N training rows (after shuffling)")
    max_eval_samples: Optional[PositiveInt] = Field(None, description="cap on validation rows")
    max_test_samples: Optional[PositiveInt] = Field(None, description="cap on test rows")
    group_by_image: bool = Field(False, description="batch all questions of an image together (VQA: encodes each image once per epoch)")
    augment: bool = Field(False, description="light training augmentation (small crops, colour jitter; never flips: left/right matters); one random view per image per batch, shared by its questions")

    @field_validator("source")
    @classmethod
    def _registered_source(cls, value: str):
        if value not in DATASET_SPECS:
            raise ValueError(DATASET_SPECS.unknown_message(value))
        return value

    @field_validator("encoder_fields")
    @classmethod
    def _columns_named(cls, value: dict[str, str]):
        empty = [name for name, column in value.items() if not column.strip() or len(column) > 200]
        if empty:
            raise ValueError(f"the column of {', '.join(map(repr, empty))} must be a column name (1-200 characters)")
        return value


class TrainConfig(Strict):
    epochs: PositiveInt = Field(3, le=100_000, description="passes over the training data")
    batch_size: PositiveInt = Field(32, le=65536, description="per-process batch size")
    eval_batch_size: PositiveInt = Field(64, le=65536, description="batch size for evaluation")
    lr: PositiveFloat = Field(5e-4, description="learning rate of encoder adapters")
    head_lr: PositiveFloat = Field(1e-3, description="learning rate of the fusion head")
    weight_decay: NonNegativeFloat = Field(0.01, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="share of steps with linear warm-up, then cosine decay")
    max_grad_norm: Optional[PositiveFloat] = Field(1.0, description="gradient clipping (null: off)")
    gradient_accumulation_steps: PositiveInt = Field(1, le=65536, description="micro-batches per optimizer step")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: bf16 on GPUs that support it, else off")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("adamw", description="bitsandbytes 8-bit variants save optimizer memory")
    gradient_checkpointing: bool = Field(False, description="recompute encoder activations in backward (saves memory)")
    early_stopping_patience: Optional[PositiveInt] = Field(None, description="stop after N evals without improvement (null: off)")
    eval_every_epochs: PositiveInt = Field(1, description="evaluate every N epochs")
    select: Optional[str] = Field(None, description="<task>.<metric> that picks the best checkpoint and drives early "
                                  "stopping, e.g. answer.accuracy (null: the first task's own metric)")
    task_sampling: Literal["proportional", "round_robin", "temperature"] = Field(
        "proportional", description="multi-task with tasks' own data: which dataset each batch is drawn from "
        "(proportional: every row once an epoch; round_robin: datasets in turn; temperature: dataset i with probability "
        "proportional to rows_i^(1/T)); an epoch has as many batches as the datasets have together")
    sampling_temperature: float = Field(2.0, ge=1.0, le=1000.0, description="task_sampling temperature: T (1: "
                                        "proportional to rows, large: every dataset equally often)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    seed: NonNegativeInt = Field(0, le=2**32 - 1, description="seed for weights, shuffling and dropout")
    cache_frozen_features: bool = Field(True, description="encode each input of a fully frozen (method none) encoder once and reuse it (not with data.augment)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    num_workers: Optional[NonNegativeInt] = Field(None, le=256, description="DataLoader worker processes (null: none on a CPU, "
                                                  "where they take cores from the compute threads; on a GPU half the cores "
                                                  "of each process, at most 8)")
    pin_memory: Optional[bool] = Field(None, description="pinned host memory and non-blocking copies to the GPU (null: on with CUDA)")
    compile: bool = Field(False, description="torch.compile the model (opt-in; the first steps compile, and the log says how long)")
    profile_steps: NonNegativeInt = Field(0, le=1000, description="run this many training steps under torch.profiler "
                                          "and keep where their time went in the bundle (profile.json, profile.txt); 0: off")
    profile_skip: NonNegativeInt = Field(2, le=10_000_000, description="steps before the profiled ones (which compile, fill "
                                         "caches and warm up; one more step warms the profiler)")
    log_every: PositiveInt = Field(20, description="steps between progress-bar/TensorBoard loss updates")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"], max_length=9,
        description="experiment trackers the losses and validation metrics go to, through accelerate's trackers (as the "
                    "Hugging Face Trainer's report_to; [] for none): tensorboard writes <output.dir>/.runs/<run>; mlflow "
                    "reads MLFLOW_TRACKING_URI (a file: store needs no server); each needs its own package installed")
    checkpoint_every: Optional[Union[int, str]] = Field(
        "epoch", description="write a checkpoint at the end of every epoch ('epoch'), every N optimizer steps (N), or "
        "never (null); `finetune --resume` continues from the newest")
    checkpoint_minutes: Optional[PositiveFloat] = Field(10.0, description="also write one when this many minutes have "
                                                        "passed since the last (null: off)")
    keep_checkpoints: PositiveInt = Field(2, le=1000, description="checkpoints kept (the newest); all are removed once the bundle is written")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _epoch_steps_or_null(cls, value):
        if value is None or value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("must be 'epoch', a positive number of steps, or null")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value):
        # YAML 1.1 reads a bare `no` as false, so `mixed_precision: no` (accelerate's own
        # spelling) and `train.mixed_precision=no` would otherwise be refused.
        return "no" if value is False else value


# A run name is one folder name inside output.dir: no path separators, not "." or "..", not hidden.
RUN_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$"


class OutputConfig(Strict):
    dir: str = Field("adapters", description="bundles are written to <dir>/<name>/")
    name: Optional[str] = Field(None, pattern=RUN_NAME, description="run name, a folder inside output.dir (default: the recipe's name)")
    overwrite: bool = Field(False, description="replace an existing bundle of the same name")
    plots: bool = Field(True, description="save training-curve and per-group accuracy PNGs in the bundle")


class Recipe(Strict):
    """A whole run: encoders, fusion, task(s), data, training, output."""

    name: str = Field("run", pattern=RUN_NAME, description="run name (letters, digits, _ . -; not starting with '.')")
    encoders: dict[str, EncoderConfig] = Field(..., min_length=1, description="one block per modality, e.g. text: and image:")
    fusion: dict[str, Any] = Field(default_factory=lambda: {"type": "gated"}, description="type: concat|gated|... plus its settings")
    task: Optional[dict[str, Any]] = Field(default_factory=lambda: {"type": "vqa"},
                                 description="type: vqa|classification|multilabel|regression|contrastive plus its settings "
                                 "(the one task of a recipe, named answer)")
    tasks: Optional[dict[str, dict[str, Any]]] = Field(
        None, max_length=32, description="multi-task: {name: task block} instead of task:, all sharing the encoders")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def run_name(self) -> str:
        return self.output.name or self.name
