"""Reading video files: a few RGB frames per clip, sampled uniformly or at a rate.

Decoding is PyAV's (FFmpeg's libraries, bundled in its wheels: MP4, MKV, WebM, AVI, MOV
with H.264, HEVC, VP8/9, AV1, MPEG-4, FFV1, MJPEG and more). PyAV is BSD-3-Clause; its
wheels bundle FFmpeg (built LGPL-3.0-or-later) with codec libraries of their own licences
(x264 and x265 are GPL-2.0-or-later). mmpeft does not ship or link them: ``av`` is an
optional dependency (``pip install "mmpeft[video]"``), used only to decode, and the clips
mmpeft writes itself (:func:`write_clip`: the generated moving-shapes data, tests) use
FFmpeg's own FFV1 and MPEG-4 Part 2 encoders, not x264.

A file is untrusted: only regular, non-empty files are opened; a clip whose frames have
more than :data:`MAX_FRAME_PIXELS` pixels is refused from its header before any frame is
decoded; frames are scaled to at most ``max_side`` pixels as they are decoded, and no
more than ``max_seconds`` of a clip (and never more than :data:`MAX_DECODED_FRAMES`
frames) is ever decoded, whatever its header claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
from PIL import Image

from .media import require_media_file

MAX_FRAME_PIXELS = 4096 * 4096  # one frame; beyond is not footage this toolkit can use
MAX_DECODED_FRAMES = 3600  # per clip: two minutes at 30 fps, however long max_seconds is


class BadVideo(ValueError):
    """A video file that cannot be used (the message says why)."""


@dataclass
class VideoInfo:
    """What a clip's header says: seconds (None: the container does not say), frame rate,
    frame size and the frame count it declares (0: not declared)."""

    seconds: Optional[float]
    fps: float
    width: int
    height: int
    frames: int


def _av():
    try:
        import av
    except ImportError:
        raise BadVideo('reading video needs the package av (PyAV): pip install "mmpeft[video]"') from None
    return av


def _open(path: str):
    require_media_file(path, BadVideo)
    av = _av()
    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError):
        raise BadVideo("not a video file FFmpeg can read (MP4, MKV, WebM, AVI, MOV, ...)") from None
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream in the file")
    return container


def _info(container) -> VideoInfo:
    stream = container.streams.video[0]
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise BadVideo("its video stream declares no frame size")
    if width * height > MAX_FRAME_PIXELS:
        raise BadVideo(f"{width}x{height} frames, more than the {MAX_FRAME_PIXELS:,} pixels allowed")
    rate = stream.average_rate or stream.guessed_rate or Fraction(0)
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # microseconds (AV_TIME_BASE)
    return VideoInfo(seconds if seconds and seconds > 0 else None, float(rate), width, height, int(stream.frames or 0))


def video_info(path: str) -> VideoInfo:
    """A clip's header, or :class:`BadVideo` (FileNotFoundError for a missing file)."""
    container = _open(path)
    try:
        return _info(container)
    finally:
        container.close()


def sample_positions(count: int, frames: int) -> list[int]:
    """``frames`` indices spread uniformly over ``count`` decoded frames: the middle frame of
    each of ``frames`` equal segments (TSN's segment sampling without the random offset, as
    CLIP4Clip and X-CLIP evaluate). A clip of fewer frames keeps every frame."""
    if count <= frames:
        return list(range(count))
    return [int((i + 0.5) * count / frames) for i in range(frames)]


def read_video(path: str, frames: int, max_seconds: float, fps: Optional[float] = None,
               max_side: int = 256) -> tuple[list[Image.Image], list[float]]:
    """Up to ``frames`` RGB frames of the first ``max_seconds`` of ``path`` (at most
    ``max_side`` pixels on their longer side) and their times in seconds: spread uniformly
    over that span, or (``fps``) one every ``1 / fps`` seconds from the start. Raises
    FileNotFoundError or :class:`BadVideo`."""
    av = _av()
    container = _open(path)
    try:
        info = _info(container)
        scale = min(1.0, max_side / max(info.width, info.height))
        size = max(1, round(info.width * scale)), max(1, round(info.height * scale))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        kept: list[tuple[float, Image.Image]] = []
        next_time = 0.0
        try:
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else len(kept) / (info.fps or 1.0)
                if time >= max_seconds or len(kept) >= MAX_DECODED_FRAMES:
                    break
                if fps is not None:  # at a rate: the first frame at or after each tick, at most `frames`
                    if time + 1e-6 < next_time:
                        continue
                    next_time += 1.0 / fps
                    while next_time <= time + 1e-6:
                        next_time += 1.0 / fps
                kept.append((time, frame.to_image(width=size[0], height=size[1])))
                if fps is not None and len(kept) >= frames:
                    break
        except (av.FFmpegError, ValueError):
            if not kept:
                raise BadVideo("its frames could not be decoded (damaged or truncated file)") from None
    finally:
        container.close()
    if not kept:
        raise BadVideo("no frames (zero length)")
    chosen = [kept[i] for i in sample_positions(len(kept), frames)] if fps is None else kept
    return [image.convert("RGB") for _, image in chosen], [time for time, _ in chosen]


def write_clip(path: str, frames: list[np.ndarray], fps: int = 8, codec: str = "ffv1") -> None:
    """Write ``frames`` (``[H, W, 3]`` uint8 RGB, all one size) as a clip: ``ffv1`` (lossless,
    in .mkv) or ``mpeg4`` (MPEG-4 Part 2, in .mp4 / .avi). FFmpeg's own encoders, no x264."""
    av = _av()
    height, width = frames[0].shape[:2]
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 2_000_000
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
