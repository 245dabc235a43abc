"""Audio through an ImageNet-pretrained CNN: a log-mel spectrogram read as an image.

``efficientnet-lite0-audio`` is the zoo's EfficientNet-Lite0 fed with log-mel spectrograms
(mel bins as height, time frames as width, the one channel repeated three times). Using
image-pretrained CNNs on spectrograms is established practice: Palanisamy, Singhania and
Yao, "Rethinking CNN Models for Audio Classification" (2020) show ImageNet weights help
(DenseNet/ResNet on ESC-50 and UrbanSound8K), as do Gong, Chung and Glass for AST ("AST:
Audio Spectrogram Transformer", Interspeech 2021, ImageNet-initialised ViT) and Kong et
al.'s PANNs (2020) for the CNNs they train from scratch on AudioSet.

Every clip becomes a fixed ``[3, n_mels, frames]`` input (``max_seconds`` long; shorter
clips are padded with silence on the right). The frames that hold real audio are kept
as a length; the CNN's output positions past it are masked out of pooling and out of the
tokens the fusion head attends to, so a short clip's features are not diluted by silence.

The spectrogram is the standard power STFT with a periodic Hann window, centred frames
with reflection padding, and a Slaney-style mel filter bank (transformers'
``mel_filter_bank``), in decibels; each clip is scaled from (its peak - ``top_db``) to
its peak onto [0, 1] (loudness-invariant), then normalised as the CNN's images are.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .base import EncoderOutput, audio_batch
from .zoo import EfficientNetEncoder

AUDIO_ARCH = "efficientnet_lite_audio"


def frame_settings(settings) -> tuple[int, int, int]:
    """``(window, hop, n_fft)`` in samples for an :class:`~mmpeft.config.AudioConfig`."""
    window = max(2, round(settings.sample_rate * settings.window_ms / 1000))
    hop = max(1, round(settings.sample_rate * settings.hop_ms / 1000))
    return window, hop, 1 << (window - 1).bit_length()


@lru_cache(maxsize=16)
def mel_filters(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """``[n_fft // 2 + 1, n_mels]`` Slaney mel filter bank (area-normalised)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                           max_frequency=f_max, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(np.asarray(bank, dtype=np.float32))


def log_mel(wave: torch.Tensor, settings) -> torch.Tensor:
    """Mono waveform ``[n]`` -> log-mel power spectrogram ``[n_mels, frames]`` in dB."""
    window, hop, n_fft = frame_settings(settings)
    if wave.numel() <= n_fft // 2:  # reflection padding needs more samples than half a window
        wave = torch.nn.functional.pad(wave, (0, n_fft // 2 + 1 - wave.numel()))
    spec = torch.stft(wave, n_fft, hop, window, torch.hann_window(window, periodic=True), center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)
    f_max = settings.f_max or settings.sample_rate / 2
    mel = mel_filters(n_fft, settings.n_mels, settings.sample_rate, float(settings.f_min), float(f_max)).T @ spec
    return 10.0 * torch.log10(mel.clamp_min(1e-10))


def max_frames(settings) -> int:
    """Frames of a ``max_seconds`` clip (centred frames: one per hop, plus one)."""
    _, hop, _ = frame_settings(settings)
    return 1 + int(round(settings.max_seconds * settings.sample_rate)) // hop


class EfficientNetAudioEncoder(EfficientNetEncoder):
    """EfficientNet-Lite on log-mel spectrograms (see the module docstring).

    Inputs: ``input_features [B,3,n_mels,frames]`` and ``frames [B]`` (real frames per clip).
    """

    modality = "audio"
    arch = AUDIO_ARCH

    def batch(self, name: str, values: list, store, rng=None):
        return audio_batch(self, name, values, store)

    def export_preprocessing(self, name: str) -> dict:
        return {"audio": self.audio.model_dump(), "frames": self.frames, "image_mean": list(self.mean),
                "image_std": list(self.std),
                "spectrogram": "mono; resampled; power STFT (periodic Hann, centred, reflect padding); Slaney mel; dB; "
                               "(dB - (peak - top_db)) / top_db clipped to [0, 1]; padded with 0 to `frames`; normalised; "
                               "repeated to 3 channels (mmpeft/encoders/audio.py)"}

    def __init__(self, source, backbone, meta, settings, pooling: str = "auto"):
        super().__init__(source, backbone, meta, None, pooling)
        self.audio = settings
        self.frames = max_frames(settings)
        self.image_size = max(self.pixel_shape)  # the dry run's memory estimate reads a size

    @property
    def pixel_shape(self) -> tuple[int, int]:
        return self.audio.n_mels, self.frames

    def features(self, wave: np.ndarray) -> tuple[torch.Tensor, int]:
        """One mono waveform at ``audio.sample_rate`` -> ``([3, n_mels, frames], real frames)``."""
        db = log_mel(torch.from_numpy(np.asarray(wave, dtype=np.float32)), self.audio)
        db = db[:, : self.frames]
        peak = db.max()
        scaled = ((db - (peak - self.audio.top_db)) / self.audio.top_db).clamp(0.0, 1.0)
        length = scaled.shape[1]
        image = torch.zeros(self.audio.n_mels, self.frames)
        image[:, :length] = scaled
        mean, std = self.mean[0], self.std[0]
        return ((image - mean) / std).unsqueeze(0).expand(3, -1, -1).contiguous(), length

    def preprocess(self, items) -> dict[str, torch.Tensor]:
        feats = [self.features(w) for w in items]
        return {"input_features": torch.stack([f for f, _ in feats]),
                "frames": torch.tensor([n for _, n in feats], dtype=torch.long)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        features = inputs["input_features"]
        if self.input_prompt is not None:
            features, _ = self.input_prompt(features, None)
        fmap = self.model(features)  # [B, C, h, w]: w spans time
        b, c, h, w = fmap.shape
        # an output column holds real audio when its receptive field's start does
        valid = torch.clamp(torch.ceil(inputs["frames"].to(fmap.device).float() * w / self.frames), 1, w).long()
        columns = torch.arange(w, device=fmap.device).unsqueeze(0) < valid.unsqueeze(1)  # [B, w]
        mask = columns.unsqueeze(1).expand(b, h, w).reshape(b, h * w)
        tokens = fmap.flatten(2).transpose(1, 2)
        if self.pooling == "cls":
            pooled = tokens.masked_fill(~mask.unsqueeze(-1), -math.inf).amax(1)
        else:
            weights = mask.to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * weights).sum(1) / weights.sum(1)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def encode_pixels(self, pixel_values: torch.Tensor) -> EncoderOutput:
        frames = torch.full((pixel_values.shape[0],), self.frames, dtype=torch.long)
        return self.forward({"input_features": pixel_values, "frames": frames})
