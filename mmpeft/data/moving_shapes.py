"""Moving shapes: a generated video dataset in which order matters.

Every clip shows one easy-VQA-style shape (circle, square or triangle) of one colour (red,
green, blue or yellow) on a light background, moving in a straight line left, right, up
or down. Each clip has three questions: ``which way does the <colour> <shape> move?``
(needs the order of the frames), ``what color is the shape?`` and ``what shape is it?``
(any single frame tells), with the question type as the group ``question_type``; the
caption source gives each clip one caption, ``"a red circle moves left"``.

Where a shape starts is drawn so that its position in the middle frame, and the set of
positions it passes, tell nothing of the direction along that axis: one frame, or the
average of all frames, can tell horizontal from vertical motion, never left from right.

Clips are generated deterministically from the split's seed (``data.clips`` training
clips; a quarter as many for validation, half as many for test), written once as
lossless FFV1 files under ``$MMPEFT_CACHE/moving_shapes`` (default
``~/.cache/mmpeft``), and read back through the same decoder as any video.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .samples import Sample
from .video import write_clip

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZE, FRAMES, FPS, RADIUS, TRAVEL = 64, 8, 8, 7, 28  # pixels, frames per clip, frames a second, shape radius, distance moved
VERSION = "v1"  # part of the cache folder's name: a change to the generator writes new files
SPLIT_SEEDS = {"train": 0, "eval": 1, "test": 2}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, fill) -> None:
    r = RADIUS
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)


def make_clip(rng: random.Random, color: str, shape: str, direction: str) -> list[np.ndarray]:
    """One clip's frames (``[SIZE, SIZE, 3]`` uint8 RGB)."""
    dx, dy = DIRECTIONS[direction]
    margin = RADIUS + 2
    low, high = margin + TRAVEL / 2, SIZE - margin - TRAVEL / 2  # where the middle of the path may be
    centre = rng.uniform(low, high), rng.uniform(margin, SIZE - margin)  # along the motion, across it
    if dy:
        centre = centre[1], centre[0]
    background = tuple(rng.randint(225, 250) for _ in range(3))
    frames = []
    for t in range(FRAMES):
        step = (t / (FRAMES - 1) - 0.5) * TRAVEL
        image = Image.new("RGB", (SIZE, SIZE), background)
        draw_shape(ImageDraw.Draw(image), shape, centre[0] + dx * step, centre[1] + dy * step, COLORS[color])
        frames.append(np.asarray(image))
    return frames


def split_size(split: str, clips: int) -> int:
    return {"train": clips, "eval": max(1, clips // 4), "test": max(1, clips // 2)}[split]


def cache_root() -> Path:
    return Path(os.environ.get("MMPEFT_CACHE") or Path.home() / ".cache" / "mmpeft").expanduser() / "moving_shapes"


def clip_files(split: str, clips: int) -> list[tuple[str, str, str, str]]:
    """``(path, colour, shape, direction)`` of every clip of ``split``, written once (a folder
    is filled in a temporary folder and renamed: never half-written)."""
    rng = random.Random(f"moving_shapes/{VERSION}/{SPLIT_SEEDS[split]}")
    n = split_size(split, clips)
    kinds = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    chosen = [kinds[i % len(kinds)] for i in range(n)]  # balanced: every combination as often as n allows
    rng.shuffle(chosen)
    folder = cache_root() / f"{VERSION}-{clips}" / split
    rows = [(str(folder / f"{i:05d}.mkv"), *kind) for i, kind in enumerate(chosen)]
    if not (folder / "done").is_file():
        tmp = folder.with_name(f".{split}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for (path, color, shape, direction) in rows:
            write_clip(str(tmp / Path(path).name), make_clip(rng, color, shape, direction), FPS, codec="ffv1")
        (tmp / "done").write_text(f"{n} clips\n")
        if (folder / "done").is_file():  # another process wrote the same clips meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a folder left half-written by a killed run
            os.replace(tmp, folder)
    return rows


def moving_shapes_samples(split: str, clips: int) -> list[Sample]:
    """Three questions per clip (direction, colour, shape), grouped by ``question_type``."""
    samples = []
    for i, (path, color, shape, direction) in enumerate(clip_files(split, clips)):
        where = f"moving_shapes {split}, clip {i}"
        for kind, question, answer in (("direction", f"which way does the {color} {shape} move?", direction),
                                       ("color", "what color is the shape?", color),
                                       ("shape", "what shape is it?", shape)):
            samples.append(Sample("", question, answer, {"question_type": kind}, where, video=path))
    return samples


def moving_shapes_caption_samples(split: str, clips: int) -> list[Sample]:
    """One caption per clip (``"a red circle moves left"``), its class the answer (``"red circle
    moving left"``, 48 classes); groups
    ``color``, ``shape`` and ``direction``."""
    return [Sample("", f"a {color} {shape} moves {direction}", f"{color} {shape} moving {direction}",
                   {"color": color, "shape": shape, "direction": direction}, f"moving_shapes captions {split}, clip {i}",
                   video=path)
            for i, (path, color, shape, direction) in enumerate(clip_files(split, clips))]
