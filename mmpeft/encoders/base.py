"""The encoder interface every modality backbone is wrapped in.

An :class:`Encoder` owns a frozen pretrained ``model`` (the module PEFT methods
act on), knows how to turn raw inputs (strings, PIL images) into tensors, and
returns token features plus a pooled vector so any fusion head can consume it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .architectures import Architecture, architecture
from .images import augment, to_pixels


@dataclass
class EncoderOutput:
    """What an encoder hands to the fusion head.

    Attributes:
        tokens: ``[B, T, D]`` token (or spatial-position) features.
        mask: ``[B, T]`` bool, True where a token is real (not padding / prompt).
        pooled: ``[B, D]`` one vector per example.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class Encoder(nn.Module):
    """A frozen backbone with its preprocessing.

    Subclasses set ``modality`` ("text" or "image"), ``arch`` (the family name that
    :mod:`~mmpeft.encoders.architectures` knows it by), ``hidden_size`` and ``model``.

    ``input_prompt`` is an optional hook PEFT methods may install (prompt tuning):
    a module mapping ``(embeds [B,T,D], mask [B,T]) -> (embeds, mask)`` applied to
    the input embeddings (text) or pixels (CNN).
    """

    modality: str = "text"
    arch: str = "unknown"
    hidden_size: int = 0
    checkpointing: bool = False  # gradient checkpointing asked for and supported (set by build_model)
    checkpointed_layers: tuple = ()  # layers MultimodalModel.train flags as training (see below)
    checkpoint_head: Optional[dict] = None  # a dual-encoder checkpoint's projection of this tower (hf.dual_head)
    fused: bool = False  # CLAP with feature fusion: a long clip becomes four channels (hf_audio)

    def __init__(self, source: str, pooling: str = "auto"):
        super().__init__()
        self.source = source
        self.pooling = pooling
        self.input_prompt: Optional[nn.Module] = None
        # Number of leading tokens added by a prompt method, dropped before pooling.
        self.num_prompt_tokens = 0

    # The module that PEFT methods see (possibly replaced by a peft wrapper).
    model: nn.Module

    @property
    def family(self) -> Architecture:
        """What mmpeft knows about this encoder's architecture (default targets, placements...)."""
        return architecture(self.arch)

    def sequence_length(self) -> int:
        """Positions of the longest input (for the dry run's memory estimate)."""
        raise NotImplementedError

    @property
    def output_width(self) -> int:
        """The width of what the heads read of it (a video encoder's temporal width)."""
        return self.hidden_size

    def temporal_stage(self) -> Optional[nn.Module]:
        """A trainable module over its output that runs with the heads (a video encoder's
        temporal component: :mod:`.video`); None for encoders without one."""
        return None

    def export_preprocessing(self, name: str) -> dict:
        """What a consumer of an exported graph must do to raw inputs before feeding it."""
        raise NotImplementedError

    def save_preprocessor(self, folder, name: str) -> None:
        """Write the files :meth:`export_preprocessing` names (a tokenizer, a feature extractor)."""

    def batch(self, name: str, values: list, store, rng=None) -> tuple[dict[str, torch.Tensor], Optional[list]]:
        """One batch of this encoder's inputs: ``(tensors, keys)`` from the rows' values of its
        column (``store``: the data pipeline's decoded-file cache; ``rng``: an augmentation
        draw, or None), ``keys`` naming each tensor row for the frozen-feature cache (None: not
        cacheable). Text: tokenised as they are."""
        return self.preprocess(values), values

    def preprocess(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Turn a list of raw inputs into model tensors (batched)."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        raise NotImplementedError

    def base_model(self) -> nn.Module:
        """The underlying pretrained model, without any peft wrapper."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def save_base(self, directory) -> None:
        """Write the (possibly merged) base model in its native loadable format."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute each transformer layer's activations in backward instead of storing them.

        transformers checkpoints a layer only while that layer is in training mode, but the
        frozen parts of an encoder run in eval mode (see ``MultimodalModel.train``), so the
        layers are listed in ``checkpointed_layers`` for the model to flag as training on
        their own: their dropout and norm children stay in eval mode."""
        model = self.base_model()
        if self.family.checkpointing is False or not hasattr(model, "gradient_checkpointing_enable") \
                or not getattr(model, "supports_gradient_checkpointing", True):
            return False  # e.g. transformers' ResNet
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointed_layers = [m for m in model.modules() if m is not model and getattr(m, "gradient_checkpointing", False) is True]
        return True


class ImageEncoder(Encoder):
    """Shared image preprocessing (resize + the model's own mean/std) and pixel prompts.

    Subclasses set ``image_size``, ``mean``, ``std`` and implement :meth:`encode_pixels`.
    """

    modality = "image"
    image_size: int = 224
    mean: list = [0.5, 0.5, 0.5]
    std: list = [0.5, 0.5, 0.5]

    @property
    def pixel_shape(self) -> tuple[int, int]:
        """Height and width of the pixels it reads (an audio CNN: mel bins x frames)."""
        return self.image_size, self.image_size

    def sequence_length(self) -> int:
        return (self.image_size // 16) ** 2 + 1

    def export_preprocessing(self, name: str) -> dict:
        return {"image_size": self.image_size, "image_mean": list(self.mean), "image_std": list(self.std), "resize": "bicubic"}

    def batch(self, name: str, values: list, store, rng=None) -> tuple[dict[str, torch.Tensor], Optional[list]]:
        # VQA datasets ask many questions per image: encode each unique image once and let the
        # model index rows into it (``row_index``). With augmentation each unique image gets one
        # random view per batch, shared by its questions: a view per question would encode the
        # same image ~10 times (VQA-RAD); augmented views must never hit the feature cache.
        unique, rows = unique_rows(values)
        pixels = torch.stack([self.pixels(augment(store.get(p), rng)) if rng is not None else store.pixels_for(name, self, p)
                              for p in unique])
        return {"pixel_values": pixels, **rows}, (unique if rng is None else None)

    def preprocess(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.pixels(im) for im in items])}

    def pixels(self, image) -> torch.Tensor:
        """One PIL image -> ``[3, S, S]`` normalised pixels."""
        return to_pixels(image, self.image_size, self.mean, self.std)

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        pixel_values = inputs["pixel_values"]
        if self.input_prompt is not None:  # pixel-space prompts (CNN visual prompting)
            pixel_values, _ = self.input_prompt(pixel_values, None)
        return self.encode_pixels(pixel_values)

    def encode_pixels(self, pixel_values: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError


def unique_rows(values: list) -> tuple[list, dict[str, torch.Tensor]]:
    """The distinct ``values`` in order, and ``{"row_index": [B]}`` mapping each row to its
    value's position among them (empty when every value is distinct): a file read by many
    rows (one image, many questions) is encoded once."""
    unique = list(dict.fromkeys(values))
    if len(unique) == len(values):
        return unique, {}
    position = {v: i for i, v in enumerate(unique)}
    return unique, {"row_index": torch.tensor([position[v] for v in values], dtype=torch.long)}


def audio_batch(encoder, name: str, values: list, store) -> tuple[dict[str, torch.Tensor], list]:
    """An audio encoder's batch: each clip's features (cached by the store) and real frames."""
    clips = [store.audio_features_for(name, encoder, path) for path in values]
    return {"input_features": torch.stack([f for f, _ in clips]),
            "frames": torch.tensor([n for _, n in clips], dtype=torch.long)}, values


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. tokens ``[B,T,D]``, mask ``[B,T]`` -> ``[B,D]``."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
