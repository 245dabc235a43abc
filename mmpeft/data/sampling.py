"""Batch samplers that count epochs themselves (so a resumed run replays an epoch's order):
whole images per batch, and one dataset per batch for tasks with their own data.

Mixing rules for several datasets follow the multi-task literature: examples-proportional
mixing, round-robin (equal turns), and temperature-scaled mixing, where dataset ``i`` is
drawn with probability proportional to ``n_i ** (1 / T)`` (Raffel et al., 2020, "Exploring
the Limits of Transfer Learning with a Unified Text-to-Text Transformer", section 3.5.2;
Arivazhagan et al., 2019, for the same rule over languages).
"""

from __future__ import annotations

import random
import time

import torch

RULES = ("proportional", "round_robin", "temperature")


def pack(groups: list[list[int]], order: list[int], batch_size: int) -> list[list[int]]:
    """Batches of whole groups, in ``order``: a group that does not fit starts the next batch
    (a group larger than a batch is one batch of its own)."""
    batches, current = [], []
    for g in order:
        group = groups[g]
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current = current + group
    if current:
        batches.append(current)
    return batches


def image_groups(samples, indices) -> list[list[int]]:
    """``indices`` grouped by their rows' image, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(samples[i].image, []).append(i)
    return list(groups.values())


class ImageGroupedBatches(torch.utils.data.Sampler):
    """Batches made of whole images: all questions of an image land in the same batch,
    images in a new seeded random order every epoch. With the collator's de-duplication,
    the image encoder then runs once per image per epoch."""

    def __init__(self, samples, batch_size: int, seed: int):
        self.groups = image_groups(samples, range(len(samples)))
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._batches = self._make(0)

    def _make(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = list(range(len(self.groups)))
        rng.shuffle(order)
        return pack(self.groups, order, self.batch_size)

    def __iter__(self):
        batches = self._batches
        self.epoch += 1
        self._batches = self._make(self.epoch)
        return iter(batches)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields epoch ``epoch``'s batches (0-based; for resuming)."""
        self.epoch = epoch
        self._batches = self._make(epoch)

    def __len__(self) -> int:
        return len(self._batches)


class DatasetBatches(ImageGroupedBatches):
    """Batches that each hold the rows of one dataset (``Sample.dataset``): a task with its own
    data then sees whole batches of its rows (a contrastive task its in-batch negatives), and
    a batch needs only the inputs of that dataset's encoders.

    Without shuffling (evaluation) every dataset's rows come in order, a dataset at a time.
    With shuffling, each dataset's rows (or whole images, ``group_by_image``) are shuffled
    into batches, and an epoch of as many batches as the datasets have together is drawn by
    ``rule``: ``proportional`` (every batch of every dataset once, in a random order),
    ``round_robin`` (datasets in turn) or ``temperature``; under the last two a dataset whose
    batches run out starts a new shuffled pass. Everything is seeded by (seed, epoch).
    """

    def __init__(self, samples, batch_size: int, seed: int, shuffle: bool = True, rule: str = "proportional",
                 temperature: float = 2.0, group_by_image: bool = False):
        if rule not in RULES:
            raise ValueError(f"task sampling rule {rule!r} is not one of {', '.join(RULES)}")
        parts: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            parts.setdefault(s.dataset, []).append(i)
        self.names = list(parts)
        self.rows = [len(p) for p in parts.values()]
        self.groups = [image_groups(samples, p) if group_by_image else [[i] for i in p] for p in parts.values()]
        self.shuffle, self.rule, self.temperature = shuffle, rule, temperature
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self._batches = self._make(0)

    def shares(self) -> list[float]:
        """Each dataset's expected share of an epoch's batches under the rule."""
        if self.rule == "proportional" or not self.shuffle:
            weights = [len(pack(g, list(range(len(g))), self.batch_size)) for g in self.groups]  # batches a pass
        elif self.rule == "round_robin":
            weights = [1.0] * len(self.groups)
        else:
            weights = [n ** (1.0 / self.temperature) for n in self.rows]
        return [w / sum(weights) for w in weights]

    def _pass(self, part: int, epoch: int, number: int) -> list[list[int]]:
        """One shuffled pass over a dataset's rows, as batches (the same for the same seed, epoch and pass)."""
        groups = self.groups[part]
        order = list(range(len(groups)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/{self.names[part]}/{number}").shuffle(order)
        return pack(groups, order, self.batch_size)

    def _make(self, epoch: int) -> list[list[int]]:
        first = [self._pass(p, epoch, 0) for p in range(len(self.groups))]
        if not self.shuffle:
            return [b for batches in first for b in batches]
        total = sum(len(b) for b in first)
        rng = random.Random(f"{self.seed}/{epoch}/order")
        if self.rule == "proportional":
            turns = [p for p, batches in enumerate(first) for _ in batches]
            rng.shuffle(turns)
        elif self.rule == "round_robin":
            turns = [t % len(first) for t in range(total)]
        else:
            turns = rng.choices(range(len(first)), weights=self.shares(), k=total)
        queues, taken, passes, out = [list(b) for b in first], [0] * len(first), [0] * len(first), []
        for p in turns:
            if taken[p] == len(queues[p]):  # this dataset's batches ran out: a new shuffled pass
                passes[p] += 1
                queues[p], taken[p] = self._pass(p, epoch, passes[p]), 0
            out.append(queues[p][taken[p]])
            taken[p] += 1
        return out


def epoch_sampler(loader):
    """The batch sampler that counts epochs itself (:class:`ImageGroupedBatches`, :class:`DatasetBatches`), if any."""
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not hasattr(sampler, "set_epoch"):
        sampler = getattr(sampler, "batch_sampler", None)
    return sampler


def timed(iterator, total: list):
    """Yield from ``iterator``, adding the time spent waiting for each item to ``total[0]``."""
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        total[0] += time.perf_counter() - start
        yield item
