"""Reading audio files: mono float32 waveforms at the encoder's sample rate.

Reading is soundfile's (libsndfile, bundled in its wheels: WAV, FLAC, OGG/Vorbis, MP3 and
more), resampling soxr's (the SoX resampler, high quality, wheels for CPython on Linux,
macOS and Windows). torchaudio was not chosen: each of its wheels pins one exact torch
version (2.11.1 pins torch 2.11), so installing it beside torch 2.13 would replace torch.

A file is untrusted: only regular files are read, its header is read first, and no more
than ``max_seconds`` of it (plus a bound on channels) is ever decoded, whatever length its
header claims. Multi-channel audio is mixed down to mono by averaging the channels.
"""

from __future__ import annotations


import numpy as np

from .media import require_media_file

MAX_CHANNELS = 32  # more is not a recording this toolkit can use: refused before decoding


class BadAudio(ValueError):
    """An audio file that cannot be used (the message says why)."""


def _soundfile():
    try:
        import soundfile
    except ImportError:  # pragma: no cover - a dependency of mmpeft
        raise BadAudio("reading audio needs the package soundfile: pip install soundfile") from None
    return soundfile


def audio_info(path: str) -> tuple[int, int, int]:
    """``(sample rate, frames, channels)`` from the file's header, or :class:`BadAudio`."""
    require_media_file(path, BadAudio)
    sf = _soundfile()
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise BadAudio("not an audio file soundfile can read (WAV, FLAC, OGG, MP3, ...)") from None
    if info.frames <= 0:
        raise BadAudio("no samples (zero length)")
    if not 0 < info.channels <= MAX_CHANNELS or info.samplerate <= 0:
        raise BadAudio(f"implausible header ({info.channels} channels at {info.samplerate} Hz)")
    return info.samplerate, info.frames, info.channels


def read_audio(path: str, sample_rate: int, max_seconds: float) -> tuple[np.ndarray, bool]:
    """The first ``max_seconds`` of ``path`` as mono float32 at ``sample_rate``, and whether
    the file was longer (truncated). Raises FileNotFoundError or :class:`BadAudio`."""
    rate, frames, _ = audio_info(path)
    limit = max(1, int(round(max_seconds * rate)))  # frames at the file's own rate
    sf = _soundfile()
    try:
        data, rate = sf.read(path, frames=min(frames, limit), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        raise BadAudio("its samples could not be decoded (damaged or truncated file)") from None
    if data.shape[0] == 0:
        raise BadAudio("no samples (zero length)")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise BadAudio("its samples are not finite numbers")
    if rate != sample_rate:
        import soxr

        wave = soxr.resample(wave, rate, sample_rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(wave, dtype=np.float32), frames > limit
