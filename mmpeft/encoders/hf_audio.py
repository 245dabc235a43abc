"""Audio encoders backed by Hugging Face transformers models, read through their own
feature extractor (``AutoFeatureExtractor``):

- waveform models: Wav2Vec2 (Baevski et al. 2020), HuBERT (Hsu et al. 2021), WavLM (Chen
  et al. 2022): the clip as samples, normalised as the extractor does (zero mean, unit
  variance over the real samples), padded with zeros; the attention mask is passed only
  where the extractor asks for one (wav2vec2-base was trained without it, on zero padding);
- Whisper's encoder (Radford et al. 2022): the extractor's log-mel spectrogram, always
  padded to the model's fixed window (``chunk_length`` seconds), as Whisper requires;
- AST (Gong et al. 2021): the extractor's Kaldi-style filter bank, padded or cut to its
  ``max_length`` frames; AST attends to every frame and pools its two leading tokens;
- CLAP's audio tower (Wu et al. 2023, HTSAT: Chen et al. 2022), from a whole CLAP
  checkpoint (its text tower is left out): the extractor's log-mel image of a clip repeated
  to fill its ``max_length_s`` window ("repeatpad", as CLAP trains); pooled by HTSAT's head.
  A checkpoint without feature fusion reads at most one window. One with it
  (``enable_fusion``, e.g. laion/clap-htsat-fused) reads clips up to ``audio.max_seconds``:
  a clip longer than the window becomes CLAP's four-channel input (the whole clip's mel
  shrunk to the window, and three window-long crops from its front, middle and back thirds)
  with ``is_longer`` set, so the attentional feature fusion sees the whole clip. The crops
  are drawn by the extractor from a generator seeded the same way for every call, so
  training, evaluate, predict and serve all read the same crops of a clip.

Clips are read at the extractor's sampling rate (``encoders.<name>.audio.sample_rate`` does
not apply to these models) and cut at ``audio.max_seconds`` (or at what the model can
take, if less). Pooling over frames respects the mask: only the frames a clip fills count
(waveform models: the convolutional front end's output lengths; Whisper: two mel frames
per position).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from .base import Encoder, EncoderOutput, audio_batch, masked_mean

WAVEFORM = ("wav2vec2", "hubert", "wavlm")
FUSION_SEED = 0  # CLAP fusion: the seed of the extractor's crop positions
_GLOBAL_GENERATOR = threading.Lock()  # held while numpy's global generator is seeded for those crops


class HFAudioEncoder(Encoder):
    """A transformers audio model with its feature extractor (see the module docstring).

    Inputs: ``input_features`` (the extractor's output per clip, padded to one shape) and
    ``frames [B]`` (real samples, or real spectrogram frames, per clip)."""

    modality = "audio"

    def __init__(self, source: str, model: nn.Module, extractor, settings, pooling: str = "auto"):
        super().__init__(source, pooling)
        model_type = model.config.model_type
        self._whole = None
        if model_type == "whisper" and hasattr(model, "get_encoder"):
            # a whole Whisper checkpoint: its encoder is what trains; the whole model (not a
            # submodule, so its decoder is neither adapted nor counted) is what save_base writes,
            # so a merged base loads back with AutoModel as the checkpoint did
            self._whole = [model]
            model = model.get_encoder()
        elif model_type == "clap":  # a whole CLAP checkpoint: its audio tower, saved whole for the same reason
            self._whole = [model]
            model = model.audio_model
            model_type = model.config.model_type
        self.model = model
        if getattr(model.config, "layerdrop", 0.0):
            # LayerDrop (on in Wav2Vec2 / HuBERT / WavLM configs) skips whole layers in training mode
            # (full fine-tuning): their adapters then get no gradient, which data-parallel training refuses
            model.config.layerdrop = 0.0
            for module in model.modules():
                if hasattr(module, "layerdrop"):
                    module.layerdrop = 0.0
        self.arch = model_type
        self.extractor = extractor
        self.fused = model_type == "clap_audio_model" and bool(getattr(model.config, "enable_fusion", False))
        self.hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        rate = int(extractor.sampling_rate)
        if model_type == "whisper":
            limit = float(extractor.chunk_length)
        elif model_type == "audio-spectrogram-transformer":
            limit = extractor.max_length * 0.01  # Kaldi filter banks: one frame every 10 ms
        elif model_type == "clap_audio_model":
            # without fusion a longer clip would be cropped at random by the extractor; with it,
            # the extractor reads the whole clip (see the module docstring)
            limit = settings.max_seconds if self.fused else float(extractor.max_length_s)
        else:
            limit = settings.max_seconds
        self.audio = settings.model_copy(update={"sample_rate": rate, "max_seconds": min(settings.max_seconds, limit)})
        self.samples = int(round(self.audio.max_seconds * rate))
        if model_type not in WAVEFORM + ("whisper", "audio-spectrogram-transformer", "clap_audio_model"):
            raise RecipeError([f"encoder {source!r}: audio model type {model_type!r} is not supported yet "
                               "(supported: wav2vec2, hubert, wavlm, whisper, audio-spectrogram-transformer, clap)"])

    def sequence_length(self) -> int:
        return self.max_tokens

    def batch(self, name: str, values: list, store, rng=None):
        return audio_batch(self, name, values, store)

    def export_preprocessing(self, name: str) -> dict:
        return {"audio": self.audio.model_dump(), "feature_extractor": f"feature_extractor_{name}",
                "input": "mono, resampled to the extractor's rate, cut at audio.max_seconds; input_features as "
                         "mmpeft/encoders/hf_audio.py makes them (waveform models: normalised samples padded with zeros; "
                         "Whisper / AST / CLAP: the extractor's output; CLAP with fusion: its crops drawn after "
                         "numpy.random.seed(0)), frames: real samples or frames per clip"}

    def save_preprocessor(self, folder, name: str) -> None:
        self.extractor.save_pretrained(str(folder / f"feature_extractor_{name}"))

    @property
    def max_tokens(self) -> int:
        """Output positions of a clip of ``max_seconds`` (for the dry run's memory estimate)."""
        cfg = self.base_model().config
        if self.arch in WAVEFORM:
            return int(self.base_model()._get_feat_extract_output_lengths(torch.tensor(self.samples)))
        if self.arch == "whisper":
            return int(cfg.max_source_positions)
        if self.arch == "clap_audio_model":
            return (cfg.spec_size // cfg.patch_stride[0] // 2 ** (len(cfg.depths) - 1)) ** 2
        rows = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
        return rows * ((cfg.max_length - cfg.patch_size) // cfg.time_stride + 1) + 2

    def features(self, wave: np.ndarray) -> tuple[torch.Tensor, int]:
        """One mono waveform at the extractor's rate -> ``(model input, real length)``."""
        wave = np.asarray(wave, dtype=np.float32)[: self.samples]
        if self.arch in WAVEFORM:
            if getattr(self.extractor, "do_normalize", True) and len(wave):
                wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
            padded = np.full(self.samples, float(getattr(self.extractor, "padding_value", 0.0)), dtype=np.float32)
            padded[: len(wave)] = wave
            return torch.from_numpy(padded), max(1, len(wave))
        if self.arch == "clap_audio_model":
            # shorter clips are repeated to the window (CLAP's "repeatpad"): no mask. Without fusion the
            # clip is already cut to the window, so the extractor never crops; with it, its three crops
            # come from numpy's global generator, seeded here and restored after (the same crops every call)
            # (one call at a time: serve preprocesses in threads, which would interleave seed and draws)
            with _GLOBAL_GENERATOR:
                state = np.random.get_state()
                np.random.seed(FUSION_SEED)
                try:
                    out = self.extractor(wave, sampling_rate=self.audio.sample_rate, return_tensors="np",
                                         truncation="fusion" if self.fused else "rand_trunc", padding="repeatpad")
                finally:
                    np.random.set_state(state)
            features = torch.from_numpy(np.asarray(out["input_features"][0], dtype=np.float32))  # [channels, frames, mels]
            return features, max(1, len(wave))  # real samples: forward tells the clips longer than the window by them
        out = self.extractor(wave, sampling_rate=self.audio.sample_rate, return_tensors="np")
        if self.arch == "whisper":
            features = torch.from_numpy(np.asarray(out["input_features"][0], dtype=np.float32))
            return features, max(1, math.ceil(len(wave) / self.extractor.hop_length))
        features = torch.from_numpy(np.asarray(out["input_values"][0], dtype=np.float32))  # AST: [frames, mel bins]
        return features, features.shape[0]

    def longer(self, samples: torch.Tensor) -> torch.Tensor:
        """CLAP with fusion: which clips (by real samples) the extractor read as four channels. Its
        own ``is_longer`` cannot be used: for a batch without a long clip it marks one at random
        (a training trick), and it is computed here per clip. A clip less than one hop over the
        window has as many frames as the window, and the extractor reads it whole."""
        if not self.fused:
            return torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
        hop, window = int(self.extractor.hop_length), int(self.extractor.nb_max_samples)
        return torch.div(samples, hop, rounding_mode="floor") > window // hop

    def preprocess(self, items) -> dict[str, torch.Tensor]:
        feats = [self.features(w) for w in items]
        return {"input_features": torch.stack([f for f, _ in feats]),
                "frames": torch.tensor([n for _, n in feats], dtype=torch.long)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        x, frames = inputs["input_features"], inputs["frames"].to(inputs["input_features"].device)
        base = self.base_model()
        front = next((m.weight for m in base.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
        if front is not None and front.is_floating_point():  # a quantized model keeps its convolutions in the compute dtype
            x = x.to(front.dtype)
        if self.arch in WAVEFORM:
            sample_mask = torch.arange(x.shape[1], device=x.device)[None] < frames[:, None]
            use_mask = getattr(self.extractor, "return_attention_mask", False)
            out = self.model(input_values=x, attention_mask=sample_mask.long() if use_mask else None)
            lengths = base._get_feat_extract_output_lengths(frames)
        elif self.arch == "whisper":
            out = self.model(input_features=x)
            lengths = torch.div(frames + 1, 2, rounding_mode="floor")  # the second convolution has stride 2
        elif self.arch == "clap_audio_model":
            out = self.model(input_features=x, is_longer=self.longer(frames)[:, None])
            lengths = None
        else:
            out = self.model(input_values=x)
            lengths = None
        tokens = out.last_hidden_state
        if tokens.dim() == 4:  # HTSAT's last feature map [B, C, F, T] -> tokens [B, FT, C]
            tokens = tokens.flatten(2).transpose(1, 2)
        if self.num_prompt_tokens:  # VPT tokens (AST) sit after its two leading tokens
            o, p = self.family.prompt_offset, self.num_prompt_tokens
            tokens = torch.cat([tokens[:, :o], tokens[:, o + p:]], dim=1)
        if lengths is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        else:
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths.clamp(1, tokens.shape[1])[:, None]
        pooling = self.family.pooling if self.pooling == "auto" else self.pooling
        if pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        elif pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = masked_mean(tokens, mask)
        if self.fused and self.training and torch.is_grad_enabled():
            pooled = pooled + 0.0 * self._fusion_touch(pooled.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def _fusion_touch(self, device) -> torch.Tensor:
        """Zero that depends on every trainable weight of CLAP's fusion branch. HTSAT runs that
        branch only for a batch with a clip longer than the window, and DistributedDataParallel
        stops at a step where a trainable weight got no gradient; this keeps every one in the
        graph (a zero gradient) without asking the device whether the batch had a long clip."""
        embed = self.base_model().audio_encoder.patch_embed  # HTSAT's one patch embedding, where the fusion sits
        weights = [p for part in (embed.mel_conv2d, embed.fusion_model) for p in part.parameters() if p.requires_grad]
        return sum((w.sum() for w in weights), torch.zeros((), device=device))

    def save_base(self, directory) -> None:
        (self._whole[0] if self._whole else self.base_model()).save_pretrained(directory)
        self.extractor.save_pretrained(directory)
