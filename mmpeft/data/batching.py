"""The image, audio and video cache, and batching: rows into the tensors each encoder reads (rows
and splits: :mod:`.splits`; file checks: :mod:`.checks`). The one part of ``mmpeft.data``
that needs torch: the package itself does not import it."""

from __future__ import annotations

import random
from collections import OrderedDict

import torch
from PIL import Image

from ..tasks import TASK_INPUTS, Task
from .audio import read_audio
from .checks import (BAD_AUDIO_HINT, BAD_IMAGE_HINT, BAD_VIDEO_HINT, MAX_IMAGE_PIXELS, bad_files, clip_seconds, open_image,
                     raise_first_bad, skip_bad)
from .video import read_video
from .sampling import DatasetBatches, ImageGroupedBatches
from .samples import Sample, input_of


class ImageStore:
    """Decodes each image once, keeps a downsized RGB copy, and caches pixel tensors per
    encoder (preprocessing is deterministic unless augmenting), within a memory budget:
    beyond ``cache_mb`` the least recently used entries are dropped and made again when
    needed (same values: the cache changes speed, never numbers). Images put in by hand
    (uploads, probes) have no file to be read again from, so they are never dropped.
    Audio clips are read (:func:`~mmpeft.data.audio.read_audio`) and their spectrograms
    cached per encoder the same way, within the same budget; so are video clips' sampled
    frames (:func:`~mmpeft.data.video.read_video`) and each video encoder's pixels of them."""

    def __init__(self, max_side: int = 512, max_pixels: int = MAX_IMAGE_PIXELS, cache_mb: int = 8192,
                 max_audio_seconds: float | None = None, video_readers: tuple = ()):
        self.max_side = max_side
        self.video_readers = tuple(video_readers)  # (frames, fps, max_seconds) of each video encoder
        self.max_pixels = max_pixels
        self.max_audio_seconds = max_audio_seconds  # the shortest audio encoder's limit: longer clips are counted
        self.budget = cache_mb * 2**20
        self.cached_bytes = 0
        self._cache: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._pinned: set = set()

    @classmethod
    def for_encoders(cls, encoders, cache_mb: int = 8192) -> "ImageStore":
        """Keep decoded images at twice the largest image input (at least 256 px)."""
        encoders = list(encoders)
        largest = max((e.image_size for e in encoders if e.modality == "image"), default=0)
        largest = max([largest] + [e.image_size for e in encoders if e.modality == "video"])
        limits = [e.audio.max_seconds for e in encoders if e.modality == "audio"]
        readers = dict.fromkeys(e.video_reader for e in encoders if e.modality == "video")
        return cls(max_side=max(256, 2 * largest), cache_mb=cache_mb, max_audio_seconds=min(limits) if limits else None,
                   video_readers=tuple(readers))

    def _lookup(self, key):
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._cache.move_to_end(key)
        return entry[0]

    def _keep(self, key, value, size: int, pinned: bool = False):
        old = self._cache.pop(key, None)
        if old is not None:
            self.cached_bytes -= old[1]
        self._cache[key] = (value, size)
        self.cached_bytes += size
        if pinned:
            self._pinned.add(key)
        excess, victims = self.cached_bytes - self.budget, []
        for victim, (_, victim_size) in self._cache.items():  # least recently used first; stops once enough is freed
            if excess <= 0:
                break
            if victim not in self._pinned and victim != key:
                victims.append(victim)
                excess -= victim_size
        for victim in victims:
            self.cached_bytes -= self._cache.pop(victim)[1]
        return value

    def get(self, path: str) -> Image.Image:
        image = self._lookup(("image", path))
        if image is None:
            with open_image(path, self.max_pixels) as raw:
                image = self._prepare(raw)
            self._keep(("image", path), image, 3 * image.width * image.height)
        return image

    def put(self, key: str, raw: Image.Image) -> Image.Image:
        """Keep ``raw`` (an image already decoded elsewhere, e.g. an upload) under ``key``,
        downsized exactly as files read by :meth:`get` are."""
        image = self._prepare(raw)
        return self._keep(("image", key), image, 3 * image.width * image.height, pinned=True)

    def _prepare(self, raw: Image.Image) -> Image.Image:
        image = raw.convert("RGB")
        if max(image.size) > self.max_side:
            image.thumbnail((self.max_side, self.max_side), Image.BICUBIC)
        return image

    def pixels_for(self, name: str, encoder, path: str) -> torch.Tensor:
        """``encoder``'s pixel tensor of the image at ``path`` (cached per encoder name)."""
        pixels = self._lookup(("pixels", name, path))
        if pixels is None:
            pixels = encoder.pixels(self.get(path))
            pixels = self._keep(("pixels", name, path), pixels, pixels.numel() * pixels.element_size())
        return pixels

    def audio_features_for(self, name: str, encoder, path: str) -> tuple[torch.Tensor, int]:
        """``encoder``'s ``(spectrogram, real frames)`` of the clip at ``path`` (cached per encoder name)."""
        found = self._lookup(("audio", name, path))
        if found is None:
            wave = self._lookup(("wave", path))  # a clip put in by hand, already at the encoder's rate
            if wave is None:
                wave, _ = read_audio(path, encoder.audio.sample_rate, encoder.audio.max_seconds)
            features, frames = encoder.features(wave)
            found = self._keep(("audio", name, path), (features, frames), features.numel() * features.element_size())
        return found

    def put_audio(self, key: str, wave) -> None:
        """Keep a decoded mono waveform (at the encoders' sample rate) under ``key``, never dropped."""
        self._keep(("wave", key), wave, wave.nbytes, pinned=True)

    def clip(self, path: str, reader: tuple) -> list[Image.Image]:
        """The frames ``reader`` (``(frames, fps, max_seconds)``) samples from the clip at ``path``."""
        key = ("clip", path, reader)
        frames = self._lookup(key)
        if frames is None:
            count, fps, seconds = reader
            frames, _ = read_video(path, count, seconds, fps, max_side=self.max_side)
            frames = self._keep(key, frames, sum(3 * f.width * f.height for f in frames))
        return frames

    def put_clip(self, key: str, frames: list[Image.Image]) -> None:
        """Keep frames made elsewhere (a probe) under ``key`` for every video reader, never
        dropped (already sampled: each reader takes its first ``frames`` of them)."""
        for reader in self.video_readers:
            kept = [self._prepare(f) for f in frames[: reader[0]]]
            self._keep(("clip", key, reader), kept, sum(3 * f.width * f.height for f in kept), pinned=True)

    def video_pixels_for(self, name: str, encoder, path: str) -> tuple[torch.Tensor, int]:
        """``encoder``'s ``([frames, 3, S, S] pixels, real frames)`` of the clip at ``path`` (cached per encoder)."""
        found = self._lookup(("video", name, path))
        if found is None:
            frames = self.clip(path, encoder.video_reader)
            pixels = torch.zeros(encoder.video.frames, 3, *encoder.pixel_shape)
            for i, frame in enumerate(frames):
                pixels[i] = encoder.pixels(frame)
            found = self._keep(("video", name, path), (pixels, len(frames)), pixels.numel() * pixels.element_size())
        return found

    @property
    def pixels(self) -> dict:
        """The cached pixel tensors, ``{(encoder name, path): tensor}``."""
        return {key[1:]: value for key, (value, _) in self._cache.items() if key[0] == "pixels"}

    def check(self, splits: dict[str, list[Sample]], on_bad_image: str, hint: str = BAD_IMAGE_HINT,
              on_bad_audio: str = "error", on_bad_video: str = "error") -> dict[str, list[Sample]]:
        """Open every image, read every audio header and decode every video clip's frames (as
        each video encoder samples them: kept in the cache) before training. ``error``: stop at
        the first bad file with its row; ``skip``: drop rows with bad files and report how
        many. Clips longer than the audio encoders read are counted and reported."""
        bad = bad_files(splits, "image", self.get, "checking images")
        if bad:
            if on_bad_image == "error":
                raise_first_bad(splits, "image", bad, hint)
            splits = skip_bad(splits, "image", bad, "data.on_bad_image")
        lengths: dict[str, float] = {}  # seconds of every readable clip, read from its header

        def measure(path: str) -> None:
            lengths[path] = clip_seconds(path)

        bad = bad_files(splits, "audio", measure, "checking audio")
        if bad:
            if on_bad_audio == "error":
                raise_first_bad(splits, "audio", bad, BAD_AUDIO_HINT if hint == BAD_IMAGE_HINT else hint)
            splits = skip_bad(splits, "audio", bad, "data.on_bad_audio")
        if lengths and self.max_audio_seconds is not None:
            long = sum(1 for seconds in lengths.values() if seconds > self.max_audio_seconds)
            if long:
                print(f"audio: {long} of {len(lengths)} clip(s) are longer than {self.max_audio_seconds:g} s and are cut "
                      "to that length (encoders.<name>.audio.max_seconds)")

        def decode(path: str) -> None:
            for reader in self.video_readers:
                self.clip(path, reader)

        bad = bad_files(splits, "video", decode, "checking videos")
        if bad:
            if on_bad_video == "error":
                raise_first_bad(splits, "video", bad, BAD_VIDEO_HINT if hint == BAD_IMAGE_HINT else hint)
            splits = skip_bad(splits, "video", bad, "data.on_bad_video")
        return splits


class Collator:
    """Turns a list of sample indices into encoder inputs and labels.

    Returns ``{"inputs": {encoder name: tensors}, "targets": {task: tensor}, "index": [B] long}``
    (each task collates its own targets: :meth:`~mmpeft.tasks.Task.collate`).

    Augmentation draws from a generator seeded by (seed, epoch, the batch's indices), not
    from one stream, so a batch's views do not depend on which batches were collated
    before it: the same in DataLoader workers, with prefetching, and after a resume.
    """

    def __init__(self, samples: list[Sample], encoders: dict, tasks: dict[str, Task], store: ImageStore,
                 augment_images: bool = False, seed: int = 0):
        self.samples = samples
        self.encoders = encoders
        self.tasks = tasks
        self.store = store
        self.augment_images = augment_images
        self.seed = seed
        self.epoch = 0  # set by the training loop before each epoch
        # tasks with their own data: a row of such a dataset needs only the inputs of the encoders its tasks read
        self.needs: dict[str, set] = {}
        for task in tasks.values():
            self.needs.setdefault(task.dataset, set()).update(task.settings.encoders or encoders)

    def __call__(self, indices: list[int]) -> dict:
        rows = [self.samples[i] for i in indices]
        rng = random.Random(f"{self.seed}/{self.epoch}/{list(indices)}") if self.augment_images else None
        inputs, keys = {}, {}
        # one dataset: every encoder reads every row (as recipe_splits asks of the rows); several: each its own
        needed = (set(self.encoders) if set(self.needs) <= {""} else
                  set().union(*(self.needs.get(d, ()) for d in {r.dataset for r in rows})))
        for name, enc in self.encoders.items():
            if name not in needed:
                continue
            values = [input_of(r, name, enc.modality) for r in rows]  # its own column's (data.encoder_fields) or its modality's
            inputs[name], key = enc.batch(name, values, self.store, rng)  # each encoder prepares its own batch
            if key is not None:
                keys[name] = key
        fed = {name: task.inputs(rows) for name, task in self.tasks.items() if task.feeds_head}
        if fed:
            inputs[TASK_INPUTS] = fed  # what those tasks' heads read besides the encoders (a prompt's tokens)
        targets = {name: task.collate(rows) for name, task in self.tasks.items()}
        # rows each task learns from, counted here on the host so the loss need not ask the device
        counts = {name: int(task.usable(targets[name]).sum()) for name, task in self.tasks.items()}
        return {"inputs": inputs, "targets": targets, "index": torch.tensor(indices, dtype=torch.long), "keys": keys,
                "counts": counts}


class IndexDataset(torch.utils.data.Dataset):
    """Yields row indices; the :class:`Collator` does the work in batches."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_loader(samples, collator, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0, group_by_image: bool = False,
                pin_memory: bool = False, rule: str = "proportional", temperature: float = 2.0):
    """A DataLoader of row indices; rows of several datasets (tasks' own data) are batched one
    dataset at a time (:class:`~mmpeft.data.sampling.DatasetBatches`, mixed by ``rule``)."""
    several = len(dict.fromkeys(s.dataset for s in samples)) > 1
    if several or group_by_image and shuffle:
        batches = (DatasetBatches(samples, batch_size, seed, shuffle, rule, temperature, group_by_image) if several
                   else ImageGroupedBatches(samples, batch_size, seed))
        return torch.utils.data.DataLoader(IndexDataset(len(samples)), batch_sampler=batches, collate_fn=collator,
                                           num_workers=num_workers, pin_memory=pin_memory)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        IndexDataset(len(samples)), batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
        num_workers=num_workers, generator=generator, pin_memory=pin_memory,
    )
