"""Checking a run's input files before anything trains: every image opened (within a pixel
bound), every audio and video header read, and a bad file reported with its row, or its rows skipped."""

from __future__ import annotations

import os
import stat
import statistics
import warnings
from typing import Optional

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..progress import progress
from .audio import BadAudio, audio_info
from .video import BadVideo, video_info
from .samples import Sample, files_of

BAD_IMAGE_HINT = "fix the file or set data.on_bad_image: skip to leave such rows out"
BAD_AUDIO_HINT = "fix the file or set data.on_bad_audio: skip to leave such rows out"
BAD_VIDEO_HINT = "fix the file or set data.on_bad_video: skip to leave such rows out"


# PIL's own limit (about 89 million pixels): larger is a decompression bomb, not a scan.
MAX_IMAGE_PIXELS = 89_478_485


class BadImage(ValueError):
    """An image file that must not be decoded (not a regular file, too many pixels)."""


def open_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open (lazily: only the header is read) an image that is a regular file of at most
    ``max_pixels`` pixels; a FIFO or device would block or never end, a bomb would fill memory."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise BadImage("not a regular file (a folder, FIFO or device?)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(f"more than {max_pixels:,} pixels (a decompression bomb?)") from None
    if image.width * image.height > max_pixels:
        image.close()
        raise BadImage(f"{image.width}x{image.height} = {image.width * image.height:,} pixels, more than the "
                       f"{max_pixels:,} allowed")
    return image


def probe_images(splits: dict[str, list[Sample]], on_bad_image: str, on_bad_audio: str = "error",
                 on_bad_video: str = "error") -> Optional[int]:
    """Before any model loads: every image, audio and video file exists and has a readable header, so a
    wrong path fails in seconds (``error`` mode; ``skip`` reports after the full check).
    Returns the median longer side of the images, in pixels (None when not probed or none)."""
    sides: list[int] = []

    def header(path: str) -> None:
        with open_image(path) as image:  # the header is parsed on open: it is an image of an allowed size
            sides.append(max(image.size))

    if on_bad_image == "error":
        bad = bad_files(splits, "image", header, "looking for images")
        if bad:
            raise_first_bad(splits, "image", bad, BAD_IMAGE_HINT)
    if on_bad_audio == "error":
        bad = bad_files(splits, "audio", audio_info, "looking for audio")
        if bad:
            raise_first_bad(splits, "audio", bad, BAD_AUDIO_HINT)
    if on_bad_video == "error":
        bad = bad_files(splits, "video", video_info, "looking for videos")
        if bad:
            raise_first_bad(splits, "video", bad, BAD_VIDEO_HINT)
    return int(statistics.median(sides)) if sides else None


def clip_seconds(path: str) -> float:
    rate, frames, _ = audio_info(path)
    return frames / rate


def bad_files(splits: dict[str, list[Sample]], kind: str, open_one, desc: str) -> dict[str, str]:
    """``{path: why}`` for the rows' ``kind`` ("image" / "audio" / "video") files that ``open_one`` refuses."""
    paths = sorted({p for rows in splits.values() for s in rows for p in files_of(s, kind)})
    bad: dict[str, str] = {}
    for path in progress(paths, desc=desc, unit="file", leave=False, disable=len(paths) < 200):
        try:
            open_one(path)
        except FileNotFoundError:
            bad[path] = "file not found"
        except (BadImage, BadAudio, BadVideo) as exc:
            bad[path] = str(exc)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad[path] = f"unreadable {kind} ({type(exc).__name__})"
    return bad


NOUNS = {"image": "image(s)", "audio": "audio file(s)", "video": "video(s)"}  # as the messages name each kind


def _row_number(where: str) -> tuple[str, int]:
    source, _, number = where.rpartition(", row ")
    return (source, int(number)) if number.isdigit() else (where, 0)


def raise_first_bad(splits: dict[str, list[Sample]], kind: str, bad: dict[str, str], hint: str) -> None:
    """Stop on the first bad row of the first file that has one, saying how many rows of how
    many are bad and the first bad row of every file; when most rows' files are missing, the
    paths are most likely read from the wrong folder, and skipping them is no advice."""
    every = [s for rows in splits.values() for s in rows]
    failing = [s for s in every if any(p in bad for p in files_of(s, kind))]
    if not failing:
        return
    first: dict[str, Sample] = {}  # data file (in the order the splits meet them) -> its first bad row
    for s in failing:
        source, number = _row_number(s.where)
        if source not in first or number < _row_number(first[source].where)[1]:
            first[source] = s
    row = next(iter(first.values()))
    path = next(p for p in files_of(row, kind) if p in bad)
    missing = all(why == "file not found" for why in bad.values())
    if missing and len(failing) > len(every) / 2:
        hint = (f"most rows' {NOUNS[kind]} are missing: paths in a manifest are read from the manifest's folder (or "
                "data.root when it is set); check that the paths are relative to that folder")
    others = "; first bad row of each file: " + ", ".join(s.where for s in first.values()) if len(first) > 1 else ""
    raise DataError(f"{row.where}: {bad[path]}: {path} ({len(bad)} bad {NOUNS[kind]} in all, in {len(failing)} of "
                    f"{len(every)} rows{others}; {hint})")


def skip_bad(splits: dict[str, list[Sample]], kind: str, bad: dict[str, str], setting: str) -> dict[str, list[Sample]]:
    kept = {name: [s for s in rows if not any(p in bad for p in files_of(s, kind))] for name, rows in splits.items()}
    skipped = sum(len(splits[n]) - len(kept[n]) for n in splits)
    print(f"{setting}=skip: skipped {skipped} row(s) with {len(bad)} bad {NOUNS[kind]}")
    return kept
