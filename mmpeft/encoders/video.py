"""Video through any image encoder: every frame through the same (adapted) image encoder,
then a temporal component over the frame embeddings.

A video encoder *is* its image encoder, read frame by frame (:func:`as_video` gives the
loaded image encoder a video class): the module PEFT methods act on, the architecture
table row, the parameter names and the merge are the image encoder's own, so every method
that adapts an image encoder adapts a video one, with one set of weights for all frames
(as CLIP4Clip and X-CLIP share CLIP's image tower over frames).

Its output is one token per frame (the frame's pooled embedding; clips shorter than
``frames`` are masked) and their masked mean. The temporal component (:func:`build_temporal`)
is trainable and order-aware (but for ``mean``); it runs after the encoder, with the task
heads (``TaskHeads.temporal``), so a frozen image encoder's frame embeddings can be cached
between epochs while the temporal part trains:

- ``mean``: mean pooling of the frame embeddings (CLIP4Clip's meanP; Luo et al., "CLIP4Clip:
  An Empirical Study of CLIP for End to End Video Clip Retrieval", 2021). Order-free.
- ``transformer``: a transformer over the frames with learned frame positions, its output
  added to its input, then mean pooled (CLIP4Clip's seqTransf; X-CLIP's multi-frame
  integration transformer, Ni et al., "Expanding Language-Image Pretrained Models for
  General Video Recognition", ECCV 2022).
- ``tdconv``: a 1-D convolution over time of each frame embedding and its difference from
  the previous frame (temporal difference, Wang et al., "TDN: Temporal Difference Networks
  for Efficient Action Recognition", CVPR 2021; a temporal convolution over frame features
  as in R(2+1)D, Tran et al., CVPR 2018), added to its input, then mean pooled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RecipeError
from .base import EncoderOutput, masked_mean, unique_rows

_CLASSES: dict[type, type] = {}
# Frame positions are drawn at the scale of the normalised frame embeddings they are added to:
# on moving-shapes validation clips (600 training clips, frozen EfficientNet-Lite0 frames),
# std 1 gave 88% direction accuracy where CLIP4Clip's 0.02 (for CLIP's own widths) gave 81%.
POSITION_STD = 1.0


class VideoFrames:
    """What turns an image encoder class into a video one (mixed in first by :func:`as_video`)."""

    modality = "video"
    video: Any  # the encoder block's VideoConfig

    @property
    def video_reader(self) -> tuple:
        """How clips are decoded for it: ``(frames, fps, max_seconds)`` (the store caches by it)."""
        return self.video.frames, self.video.fps, self.video.max_seconds

    @property
    def output_width(self) -> int:
        return self.video.width or self.hidden_size

    def sequence_length(self) -> int:
        return self.video.frames * super().sequence_length()  # every frame's positions are in memory at once

    def export_preprocessing(self, name: str) -> dict:
        return {**super().export_preprocessing(name), "video": self.video.model_dump(),
                "frames": "pixel_values [batch, frames, 3, S, S] of frames sampled as `video` says (mmpeft/data/video.py), "
                          "zero past a clip's real frames; frames [batch]: real frames per clip"}

    def batch(self, name: str, values: list, store, rng=None):
        # several questions per clip: each clip is decoded and encoded once (as images are);
        # no augmentation: a crop or jitter per frame would be noise in time
        unique, rows = unique_rows(values)
        clips = [store.video_pixels_for(name, self, path) for path in unique]
        return {"pixel_values": torch.stack([p for p, _ in clips]),
                "frames": torch.tensor([n for _, n in clips], dtype=torch.long), **rows}, unique

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        """Clips as lists of PIL frames -> ``pixel_values [B, frames, 3, S, S]`` and ``frames [B]``."""
        pixels = torch.zeros(len(items), self.video.frames, 3, *self.pixel_shape)
        counts = []
        for i, frames in enumerate(items):
            frames = list(frames)[: self.video.frames]
            for j, frame in enumerate(frames):
                pixels[i, j] = self.pixels(frame.convert("RGB"))
            counts.append(len(frames))
        return {"pixel_values": pixels, "frames": torch.tensor(counts, dtype=torch.long)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        pixels = inputs["pixel_values"]
        b, f = pixels.shape[:2]
        mask = torch.arange(f, device=pixels.device).unsqueeze(0) < inputs["frames"].to(pixels.device).unsqueeze(1)
        frames = super().forward({"pixel_values": pixels[mask]})  # real frames only, through the image encoder
        tokens = frames.pooled.new_zeros(b, f, frames.pooled.shape[-1])
        tokens[mask] = frames.pooled
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))

    def temporal_stage(self) -> nn.Module:
        return build_temporal(self.video, self.hidden_size)


def as_video(encoder, settings) -> None:
    """Make the loaded image encoder ``encoder`` read clips (in place; see the module docstring)."""
    if encoder.modality != "image":
        raise RecipeError([f"encoder {encoder.source!r} reads {encoder.modality}: a video encoder reads frames through an "
                           "image encoder (an image model with modality: video)"])
    base = type(encoder)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Video{base.__name__}", (VideoFrames, base),
                              {"__module__": __name__, "__doc__": f"{base.__name__} read frame by frame (VideoFrames)."})
    encoder.__class__ = _CLASSES[base]
    encoder.video = settings


class MeanPool(nn.Module):
    """Mean of the real frames' embeddings (order-free)."""

    def forward(self, out: EncoderOutput) -> EncoderOutput:
        return EncoderOutput(out.tokens, out.mask, masked_mean(out.tokens, out.mask))


class TemporalTransformer(nn.Module):
    """Frame embeddings (projected, layer-normalised) + learned frame positions through a
    pre-norm transformer, added to the projected embeddings, then mean pooled over real
    frames (CLIP4Clip seqTransf)."""

    def __init__(self, frames: int, width_in: int, width: int, layers: int, heads: int):
        super().__init__()
        self.project = nn.Linear(width_in, width) if width != width_in else nn.Identity()
        self.norm = nn.LayerNorm(width)
        self.positions = nn.Parameter(torch.randn(frames, width) * POSITION_STD)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, out: EncoderOutput) -> EncoderOutput:
        x = self.project(out.tokens)
        h = self.layers(self.norm(x) + self.positions[: x.shape[1]], src_key_padding_mask=~out.mask)
        y = (x + h) * out.mask.unsqueeze(-1).to(x.dtype)
        return EncoderOutput(y, out.mask, masked_mean(y, out.mask))


class TemporalDifference(nn.Module):
    """A kernel-3 convolution over time of each frame embedding and its difference from the
    previous real frame, added to the (projected) embeddings, then mean pooled."""

    def __init__(self, width_in: int, width: int):
        super().__init__()
        self.project = nn.Linear(width_in, width) if width != width_in else nn.Identity()
        self.norm = nn.LayerNorm(2 * width)
        self.conv = nn.Conv1d(2 * width, width, kernel_size=3, padding=1)

    def forward(self, out: EncoderOutput) -> EncoderOutput:
        keep = out.mask.unsqueeze(-1).to(out.tokens.dtype)
        x = self.project(out.tokens) * keep
        previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # the first frame's difference is zero
        both = self.norm(torch.cat([x, (x - previous) * keep], dim=-1)) * keep  # padded frames stay zero
        y = (x + torch.nn.functional.gelu(self.conv(both.transpose(1, 2)).transpose(1, 2))) * keep
        return EncoderOutput(y, out.mask, masked_mean(y, out.mask))


def build_temporal(settings, width_in: int) -> nn.Module:
    """The temporal component a :class:`~mmpeft.config.VideoConfig` names, over ``width_in``-wide frames."""
    width = settings.width or width_in
    if settings.temporal == "mean":
        if width != width_in:
            raise RecipeError([f"video.width {width} needs a temporal component that projects (transformer or tdconv); "
                               "mean pooling keeps the image encoder's width"])
        return MeanPool()
    if settings.temporal == "transformer":
        if width % settings.heads:
            raise RecipeError([f"video.heads {settings.heads} must divide the temporal width {width}"])
        return TemporalTransformer(settings.frames, width_in, width, settings.layers, settings.heads)
    return TemporalDifference(width_in, width)
