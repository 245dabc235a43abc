"""``contrastive``: two encoders aligned in one embedding space (CLIP: Radford et al., 2021,
"Learning Transferable Visual Models From Natural Language Supervision"; LiT: Zhai et al.,
2022, when one tower is locked; SigLIP: Zhai et al., 2023, "Sigmoid Loss for Language
Image Pre-Training").

Each of the two encoders' pooled output goes through its own linear projection, is
L2-normalised, and a loss over in-batch negatives is minimised with a learned logit scale
(initialised at 1/temperature, clamped at ``max_logit_scale``, as CLIP):

- ``loss: softmax`` (CLIP): the symmetric InfoNCE, cross-entropy over each row's and each
  column's similarities;
- ``loss: sigmoid`` (SigLIP): every pair is its own binary problem, ``-log sigmoid(z *
  (scale * similarity + bias))`` with ``z = +1`` for a matching pair and ``-1`` otherwise,
  summed over the batch's pairs and divided by the batch size; the bias (initialised at
  ``logit_bias``, SigLIP's -10) is learned with the scale.

Rows that share an input of either encoder (the same caption, the same image) are
positives of each other: the softmax loss spreads each row's target evenly over its
positives, the sigmoid loss labels every such pair a match, instead of pushing identical
captions apart; retrieval counts any of them as a hit.

Metrics on a split (its rows are the gallery): recall@1/5/10 in both directions (and their
mean), the median rank of the first correct match, and with ``class_field`` zero-shot
classification: the non-text side's embedding against the mean embedding of the prompt
templates filled with each class name.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.tasks import SINGLE_TASK, ContrastiveSettings
from ..errors import RecipeError
from .base import TASKS, Task


EVAL_BATCH = 256  # rows per chunk of the validation / test loss


class ContrastiveHead(nn.Module):
    """Projects two encoders' pooled outputs into one space; output ``[B, 2 * dim]``: the two normalised embeddings."""

    def __init__(self, dims: dict[str, int], dim: int, temperature: float, max_logit_scale: float,
                 logit_bias: Optional[float] = None):
        super().__init__()
        self.names = list(dims)
        self.projections = nn.ModuleDict({n: nn.Linear(d, dim, bias=False) for n, d in dims.items()})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # the sigmoid loss's bias (None: the softmax loss, which a shared bias would not change)
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)))
        self.max_logit_scale = max_logit_scale
        self.dim = dim

    def project(self, name: str, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projections[name](pooled.float()), dim=-1)

    def forward(self, outputs) -> torch.Tensor:
        return torch.cat([self.project(n, outputs[n].pooled) for n in self.names], dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pair logits ``[len(a), len(b)]`` of normalised embeddings."""
        logits = self.scale() * a @ b.T
        return logits if self.logit_bias is None else logits + self.logit_bias


def first_hit_ranks(queries: torch.Tensor, gallery: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                    chunk: int = 1024) -> torch.Tensor:
    """1-based rank of the best-placed positive in the gallery for each query (embeddings
    ``[N, D]`` and ``[M, D]``; ``*_ids [N, 2]``: rows sharing either id are positives), a
    chunk of queries at a time, so a large split never holds an N x M matrix."""
    ranks = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ gallery.T
        ids = query_ids[start:start + chunk]
        positive = (ids[:, None, 0] == gallery_ids[None, :, 0]) | (ids[:, None, 1] == gallery_ids[None, :, 1])
        best = similarity.masked_fill(~positive, float("-inf")).max(1).values
        ranks.append((similarity > best[:, None]).sum(1) + 1)
    return torch.cat(ranks)


@TASKS.register("contrastive")
class ContrastiveTask(Task):
    """Two encoders aligned in one embedding space: CLIP's softmax or SigLIP's sigmoid loss."""

    Settings = ContrastiveSettings

    def __init__(self, name, settings, state, label_field="answer"):
        super().__init__(name, settings, state, label_field)
        self.field = settings.class_field or ""
        self.class_embeddings = None  # [classes, dim], computed by the runtime for zero-shot scoring and answers
        self.from_checkpoint = None  # the dual-encoder checkpoint whose projections the head started from
        self.skipped_checkpoint = None  # why the head could not (said in the run's log)
        self.checkpoint_start = ""  # what of the checkpoint it started from (said in the run's log)

    @classmethod
    def fit(cls, name, settings, rows, label_field="answer"):
        labels = []
        if settings.class_field:
            probe = cls(name, settings, {}, label_field)
            labels = sorted({str(v).strip().lower() for v in (probe.raw(r) for r in rows) if v not in (None, "")})
        return cls(name, settings, {"labels": labels}, label_field)

    @property
    def width(self) -> int:
        return 2 * self.settings.projection_dim

    def build_head(self, dims, encoders=None):
        s = self.settings
        head = ContrastiveHead(dims, s.projection_dim, s.start_temperature, s.logit_scale_cap,
                               s.logit_bias if s.loss == "sigmoid" else None)
        if s.checkpoint_head and encoders:
            self._start_from_checkpoint(head, dims, encoders)
        return head

    @torch.no_grad()
    def _start_from_checkpoint(self, head: ContrastiveHead, dims: dict, encoders: dict) -> None:
        """Where the two encoders are the two towers of one CLIP or SigLIP checkpoint, its own
        projections (SigLIP has none: each tower's pooled output is its embedding, so the
        projections start as the identity), logit scale and SigLIP's bias replace the random
        start, so the model first scores pairs as the checkpoint does (Radford et al., 2021;
        Zhai et al., 2023; the LiT / CLIP fine-tuning practice)."""
        infos = [getattr(encoders[n], "checkpoint_head", None) for n in head.names]
        if any(i is None for i in infos) or len({i["source"] for i in infos}) != 1 or len({i["side"] for i in infos}) != 2:
            return
        where = "task" if self.name == SINGLE_TASK else f"tasks.{self.name}"
        kind, source = infos[0]["kind"], infos[0]["source"]
        if kind not in ("clip", "siglip"):
            self.skipped_checkpoint = f"a {kind} checkpoint's own head is not built here, only CLIP's and SigLIP's"
            return
        if any(i["quantized"] for i in infos):
            self.skipped_checkpoint = "the checkpoint's projections are quantized"
            return
        if kind == "siglip" and self.settings.loss != "sigmoid":
            raise RecipeError([f"{where}.loss: softmax, but the siglip checkpoint {source} scores pairs with the sigmoid "
                               f"loss and a bias: set {where}.loss: sigmoid (or {where}.checkpoint_head: false)"])
        for name, info in zip(head.names, infos):
            weight = info["projection"] if info["projection"] is not None else torch.eye(dims[name])
            if weight.shape != (head.dim, dims[name]):
                raise RecipeError([f"{where}.projection_dim: {head.dim}, but the {kind} checkpoint {source} "
                                   f"projects to {weight.shape[0]}: set {where}.projection_dim: {weight.shape[0]} (or "
                                   f"{where}.checkpoint_head: false for new random projections)"])
            head.projections[name].weight.copy_(weight)
        if infos[0]["logit_scale"] is not None:
            # trained CLIPs sit at their clamp, stored a hair above it (open_clip's 4.6052 is
            # exp 100.0007): within 0.1% of the cap it is the cap, beyond that a real conflict
            if math.exp(infos[0]["logit_scale"]) > head.max_logit_scale * 1.001:
                raise RecipeError([f"{where}.max_logit_scale: {head.max_logit_scale:g}, but the {kind} checkpoint {source} "
                                   f"has a logit scale of {math.exp(infos[0]['logit_scale']):.4g}: raise "
                                   f"{where}.max_logit_scale above it (or {where}.checkpoint_head: false)"])
            head.logit_scale.fill_(min(infos[0]["logit_scale"], math.log(head.max_logit_scale)))
        if head.logit_bias is not None and infos[0].get("logit_bias") is not None:
            head.logit_bias.fill_(infos[0]["logit_bias"])
        self.from_checkpoint = source
        self.checkpoint_start = "identity projections, logit scale and bias" if kind == "siglip" else "projections and logit scale"

    @property
    def text_side(self):
        """``(text encoder, other encoder)`` for zero-shot classification, or None."""
        names = list(self.modalities)
        texts = [n for n in names if self.modalities[n] == "text"]
        if not texts or len(names) != 2:
            return None
        other = names[1] if names[0] == texts[0] else names[0]
        return texts[0], other

    def prompts(self) -> list[str]:
        return [t.format(label) for label in self.labels for t in self.settings.templates]

    def start_note(self, model) -> Optional[str]:
        if self.from_checkpoint:
            kind = model.encoders[next(iter(self.modalities))].checkpoint_head["kind"]
            return f"task {self.name} starts from the {self.checkpoint_start} of the {kind} checkpoint {self.from_checkpoint}"
        if self.skipped_checkpoint:
            return f"task {self.name}: new random projections ({self.skipped_checkpoint})"
        return None

    @torch.no_grad()
    def prepare(self, model, device, autocast) -> None:
        """With classes: each class's embedding (its prompt templates, averaged) from the current
        text encoder and projection, for zero-shot classification."""
        side = self.text_side
        if not self.labels or side is None:
            return
        encoder = model.encoders[side[0]]
        prompts, chunks = self.prompts(), []
        was_training = model.training
        model.eval()
        with autocast:
            for start in range(0, len(prompts), 64):
                inputs = {k: v.to(device) for k, v in encoder.preprocess(prompts[start:start + 64]).items()}
                chunks.append(self.head.project(side[0], encoder(inputs).pooled).float())
        model.train(was_training)
        per_class = torch.cat(chunks).view(len(self.labels), len(self.settings.templates), -1).mean(1)
        self.class_embeddings = F.normalize(per_class, dim=-1).cpu()

    def keys(self, row) -> tuple:
        # each encoder's input: its own column's (Sample.inputs, data.encoder_fields) or its modality's
        return tuple(row.inputs[name][2] if name in row.inputs else getattr(row, m) for name, m in self.modalities.items())

    def collate(self, rows: Sequence) -> torch.Tensor:
        """``[B, 2]`` ids of each row's two inputs within the batch (equal ids: the same input;
        -1 for a row of another task's data)."""
        ids = [{}, {}]
        return torch.tensor([[ids[k].setdefault(key, len(ids[k])) for k, key in enumerate(self.keys(r))]
                             if self.owns(r) else [-1, -1] for r in rows], dtype=torch.long).reshape(len(rows), 2)

    def split(self, out: torch.Tensor):
        d = self.settings.projection_dim
        return out[:, :d].float(), out[:, d:].float()

    def usable(self, target):
        return target[:, 0] >= 0

    def loss(self, out, target, usable=None):
        rows = self.learnable(out, target, usable)  # rows of another task's data have no pair here
        if rows is None:
            return out.sum() * 0.0
        out, target = rows
        if len(out) < 2:  # an epoch's last batch of one row has nothing to contrast with (train.batch_size >= 2 is checked)
            return out.sum() * 0.0
        a, b = self.split(out)
        positive = ((target[:, None, 0] == target[None, :, 0]) | (target[:, None, 1] == target[None, :, 1])).float()
        logits = self.head.logits(a, b)
        if self.head.logit_bias is not None:  # SigLIP: each pair a binary problem, summed over pairs, per row
            return -F.logsigmoid((2 * positive - 1) * logits).sum() / len(out)
        forward = positive / positive.sum(1, keepdim=True)  # each row's target, spread over its positives
        backward = positive.T / positive.T.sum(1, keepdim=True)  # the same for each column (not forward.T: positives need
        # not be transitive, e.g. rows 0 and 1 share a caption, rows 1 and 2 an image)
        return 0.5 * (torch.sum(-forward * logits.log_softmax(1), 1).mean() + torch.sum(-backward * logits.T.log_softmax(1), 1).mean())

    @torch.no_grad()
    def score(self, out, rows, group_fields=()):
        if not rows:
            return {"count": 0, **{m: float("nan") for m in self.settings.metrics}}
        a, b = self.split(out)
        ids = self.collate(rows)
        forward, backward = first_hit_ranks(a, b, ids, ids), first_hit_ranks(b, a, ids, ids)
        names = list(self.modalities) or ["a", "b"]
        metrics = {"count": len(rows)}
        for direction, r in ((f"{names[0]}_to_{names[1]}", forward), (f"{names[1]}_to_{names[0]}", backward)):
            for k in (1, 5, 10):
                metrics[f"{direction}_recall@{k}"] = float((r <= k).double().mean())
            metrics[f"{direction}_median_rank"] = float(r.double().median())
        both = torch.cat([forward, backward]).double()
        for k in (1, 5, 10):
            metrics[f"recall@{k}"] = float((both <= k).double().mean())
        metrics["mean_recall"] = (metrics["recall@1"] + metrics["recall@5"] + metrics["recall@10"]) / 3
        metrics["median_rank"] = float(both.median())
        # the loss of in-batch negatives, over consecutive chunks of EVAL_BATCH rows (one split-wide
        # batch would hold an N x N matrix), averaged by rows
        chunks = [(start, min(start + EVAL_BATCH, len(rows))) for start in range(0, len(rows), EVAL_BATCH)]
        chunks = [(s, e) for s, e in chunks if e - s > 1]
        metrics["loss"] = (sum(float(self.loss(out[s:e], self.collate(rows[s:e]))) * (e - s) for s, e in chunks)
                           / sum(e - s for s, e in chunks)) if chunks else float("nan")
        metrics["logit_scale"] = float(self.head.scale())
        if self.head.logit_bias is not None:
            metrics["logit_bias"] = float(self.head.logit_bias)
        if self.class_embeddings is not None and self.text_side is not None:
            other = self.text_side[1]
            image_side = a if names[0] == other else b
            guesses = (image_side @ self.class_embeddings.T).argmax(1)
            index = {label: i for i, label in enumerate(self.labels)}
            right = [index.get(str(value).strip().lower()) == int(p) for value, p in zip((self.raw(r) for r in rows), guesses)
                     if value not in (None, "")]  # rows without a class are left out, not counted wrong
            metrics["zero_shot_accuracy"] = sum(right) / len(right) if right else float("nan")
            metrics["zero_shot_rows"] = len(right)
            metrics["zero_shot_classes"] = len(self.labels)
        return metrics

    def headline(self, metrics):
        keys = ("recall@1", "recall@5", "recall@10", "mean_recall", "median_rank", "zero_shot_accuracy")
        return {k: metrics[k] for k in keys if k in metrics}

    @torch.no_grad()
    def answer(self, out, top_k):
        a, b = self.split(out)
        results = []
        for i in range(len(out)):
            result = {"similarity": round(float(a[i] @ b[i]), 6)}
            if self.class_embeddings is not None and self.text_side is not None:
                side = a if list(self.modalities)[0] == self.text_side[1] else b
                logits = self.head.logits(side[i:i + 1], self.class_embeddings.to(side.device)).detach().cpu()[0]
                # softmax: a distribution over the classes; sigmoid: each class's own match probability (SigLIP)
                probs = logits.sigmoid() if self.head.logit_bias is not None else logits.softmax(-1)
                top = probs.topk(min(top_k, len(probs)))
                result["zero_shot"] = [{"class": self.labels[j], "probability": round(float(p), 6)}
                                       for p, j in zip(top.values, top.indices.tolist())]
            results.append(result)
        return results
