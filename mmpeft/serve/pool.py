"""Many bundles over one copy of their base encoders.

Bundles are loaded once, with the checks :func:`~mmpeft.bundle.io.load_bundle` makes
(hashes, the manifest's shape and integrity, safetensors only, shapes, base fingerprints).
An encoder is shared by every bundle whose encoder has the same structure: the same base
model (fingerprint), quantization and method with the same settings. Each bundle keeps
only what its method trained (a LoRA's matrices, BitFit's biases, an adapter's
bottlenecks, a prompt) and its own head; before a batch of that bundle runs, its trained
tensors are copied into the shared encoder (a few MB; skipped when it is already the
active one). A method that trains the whole encoder (``full``) cannot share it: such an
encoder is the bundle's own, and the start-up log says so.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import send_to_device

from ..bundle.io import check_base, check_head_size, load_head, read_bundle
from ..bundle.manifest import bundle_digest
from ..config.tasks import recipe_own_columns
from ..data import Sample
from ..data.batching import Collator, ImageStore
from ..errors import UsageError
from ..inference import answer_rows, stored_metrics
from ..model import assemble, build_adapted_encoder
from ..runtime import inference_autocast
from ..tasks import TASK_INPUTS, Vocabulary


@dataclass
class Shared:
    """One encoder module and which bundle's trained tensors it currently holds."""

    encoder: torch.nn.Module
    method: object
    shareable: bool
    states: dict = field(default_factory=dict)  # bundle name -> its trained tensors
    active: Optional[str] = None
    users: list = field(default_factory=list)


@dataclass
class Served:
    """A bundle as the server answers with it."""

    name: str
    path: Path
    manifest: dict
    recipe: object
    vocab: Vocabulary
    tasks: dict
    model: object  # a MultimodalModel over shared encoders and the bundle's own head
    shared: dict  # encoder name -> Shared
    version: str
    summary: dict = field(default_factory=dict)
    own: dict = field(default_factory=dict)  # encoders reading an input of their own: {name: (modality, column)}

    @property
    def top_k_answers(self) -> bool:
        """One task with one answer per row: the API answers ``answer`` and a ``top_k`` list;
        any other bundle answers its tasks' own ``result`` (as ``mmpeft predict`` prints it)."""
        return len(self.tasks) == 1 and next(iter(self.tasks.values())).settings.single_answer

    @property
    def video_readers(self) -> list:
        """How its video encoders decode a clip (checked on upload as they will read it)."""
        return list(dict.fromkeys(e.video_reader for e in self.model.encoders.values() if e.modality == "video"))


def describe(name: str, path: Path, manifest: dict, recipe, vocab_size: int, version: str, inputs=(), own=None,
             task=None, generates: int | None = None) -> dict:
    """What ``GET /bundles`` says of a bundle: the inputs it reads (``inputs``: modalities; ``own``:
    encoders reading an input of their own, by name), methods, ``task``'s headline metrics (and its
    first one per group), whether it generates text (``generates``: its reply length in tokens; the
    chat API serves it), data, its model card."""
    card = (path / "README.md").read_text(errors="replace")[:4000] if (path / "README.md").is_file() else ""
    metrics, test_rows = {}, None
    if (path / "metrics.json").is_file():
        stored = stored_metrics(path)
        test = stored["test"]
        try:  # the kind names its numbers (accuracy for a classifier, exact match for a captioner)
            metrics = {k: v for k, v in task.headline(test).items() if isinstance(v, (int, float))} if task else {}
        except (KeyError, TypeError):
            metrics = {}
        test_rows = test.get("count")
        primary = next(iter(metrics), None)
        first = (stored.get("group_fields") or list(test.get("groups", {})))[:1]  # e.g. answer_type: open / closed
        for field_name in first:
            for value, group in test.get("groups", {}).get(field_name, {}).items():
                if isinstance(group, dict) and isinstance(group.get(primary), (int, float)):
                    metrics[f"{field_name}={value}"] = group[primary]
    return {"name": name, "version": version, "digest": bundle_digest(manifest), "created": manifest.get("created"),
            "task": manifest["task"],
            "inputs": [m for m in ("image", "text", "audio", "video") if m in inputs],
            "encoder_inputs": {n: modality for n, (modality, _) in (own or {}).items()},
            "methods": {n: e["method"] for n, e in manifest["encoders"].items()}, "head": manifest["head"]["type"],
            "vocabulary_size": vocab_size, "generates": generates is not None,
            "max_new_tokens": generates, "data": recipe.data.source, "test_rows": test_rows, "metrics": metrics, "card": card,
            "intended_use": "research; not a medical device, not for diagnosis"}


def _own_copy(state: dict) -> dict:
    """A copy that does not alias the live parameters (``.cpu()`` of a CPU tensor is the tensor)."""
    return {k: v.detach().clone() for k, v in state.items()}


def _structure(cfg, entry: dict) -> str:
    """What makes two bundles' encoders the same module (their trained values aside)."""
    return json.dumps([cfg.model_dump(mode="json"), entry.get("fingerprint")], sort_keys=True)


class AdapterPool:
    """Loads bundles, shares their encoders, answers batches of one bundle at a time."""

    def __init__(self, paths: dict[str, Path], device: str = "cpu", log=print, digests: Optional[dict[str, str]] = None):
        """``digests``: the pinned digest of some (or all) bundles, by name; another bundle there is refused."""
        self.device = device
        self.log = log
        self.bundles: dict[str, Served] = {}
        self._encoders: dict[str, Shared] = {}  # and the decoders that heads share
        self._parts: dict = {}  # a task's cache of shareable head parts (GenerateTask: its adapted decoder)
        self._lock = threading.Lock()  # one forward at a time: it uses every core anyway
        for name, path in paths.items():
            self._add(name, Path(path), (digests or {}).get(name))
        for shared in self._encoders.values():
            users = ", ".join(shared.users)
            if shared.shareable and len(shared.users) > 1:
                self.log(f"one {type(shared.encoder.base_model()).__name__} base ({shared.method.name}) shared by: {users}")
            elif not shared.shareable:
                self.log(f"{users}: {shared.method.name} trains the whole encoder, so it has its own copy")

    def _add(self, name: str, path: Path, expect_digest: Optional[str] = None) -> None:
        if name in self.bundles:
            raise UsageError(f"two bundles are named {name!r}; give one another name with NAME=PATH")
        bundle, manifest, recipe, tasks = read_bundle(path, expect_digest=expect_digest)
        first = next(iter(tasks.values()))
        vocab = first.labels if len(tasks) == 1 and first.settings.single_answer else []
        encoders, methods, shared_of = {}, {}, {}
        for enc_name, cfg in recipe.encoders.items():
            key = _structure(cfg, manifest["encoders"][enc_name])
            shared = self._encoders.get(key)
            if shared is not None and name in shared.states:  # two encoders of this bundle alike (a scan and its prior
                key = f"{key}/{enc_name}"  # on one base): each holds its own trained tensors, so each its own module
                shared = self._encoders.get(key)
            if shared is None or not shared.shareable:
                enc, method = build_adapted_encoder(enc_name, cfg, recipe.train, self.device)
                shared = Shared(enc, method, shareable=method.keeps_base_frozen)
                self._encoders[key if shared.shareable else f"{key}/{name}"] = shared
            check_base(enc_name, shared.encoder, manifest, recipe)
            previous = _own_copy(shared.method.trainable_state(shared.encoder)) if shared.active else None
            shared.method.load(shared.encoder, bundle / "encoders" / enc_name)  # checks names, shapes, finiteness
            shared.states[name] = _own_copy(shared.method.trainable_state(shared.encoder))
            if previous is not None:
                self._copy_in(shared, previous)  # the bundle that was active stays active
            else:
                shared.active = name
            shared.users.append(name)
            encoders[enc_name], methods[enc_name], shared_of[enc_name] = shared.encoder, shared.method, shared
        check_head_size(recipe, encoders, methods, tasks, bundle, manifest)
        for task in tasks.values():
            task.share_parts(self._parts)
        model = assemble(recipe, encoders, methods, tasks)
        load_head(model.head, bundle, manifest)
        for task_name, task in tasks.items():  # a decoder of another bundle: keep this one's tensors, restore that one's
            for key, (module, method) in task.shared_parts.items():
                shared = self._encoders.setdefault(key, Shared(module, method, shareable=True))
                shared.states[name] = _own_copy(method.trainable_state(module))
                if shared.active is not None:
                    self._copy_in(shared, shared.states[shared.active])
                else:
                    shared.active = name
                shared.users.append(name)
                shared_of[f"{task_name} decoder"] = shared
        model.to(self.device).train(False)
        version = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]
        generating = next((t.settings.max_new_tokens for t in tasks.values() if t.feeds_head), None)
        own = recipe_own_columns(recipe)
        self.bundles[name] = Served(name, bundle, manifest, recipe, Vocabulary(vocab), tasks, model, shared_of, version,
                                    describe(name, bundle, manifest, recipe, len(vocab), version,
                                             {e.modality for n, e in model.encoders.items() if n not in own}, own,
                                             first, generating), own)

    @staticmethod
    def _copy_in(shared: Shared, state: dict) -> None:
        params = dict(shared.encoder.state_dict(keep_vars=True))
        with torch.no_grad():
            for key, value in state.items():
                params[key].data.copy_(value.to(params[key].device, params[key].dtype))

    def _activate(self, served: Served) -> None:
        for shared in served.shared.values():
            if shared.active != served.name:
                self._copy_in(shared, shared.states[served.name])
                shared.active = served.name

    def answer(self, name: str, images: list, questions: list[str], top_k: int, audios: list | None = None,
               owns: list | None = None, videos: list | None = None) -> list[dict]:
        """Answers for decoded images (PIL, or None for a bundle without an image encoder),
        questions and uploaded clips (file paths), and the inputs of encoders reading one of
        their own (``owns``: per request ``{encoder: image, text or clip path}``), with bundle
        ``name``; the same preprocessing, autocast and rounding as ``mmpeft predict``."""
        served = self.bundles[name]
        store = ImageStore.for_encoders(served.model.encoders.values())  # per batch: nothing outlives the request
        rows = []
        for i, (image, question, audio, own, video) in enumerate(zip(images, questions, audios or [None] * len(images),
                                                                    owns or [{}] * len(images),
                                                                    videos or [None] * len(images))):
            key = f"<upload {i}>"
            if image is not None:
                store.put(key, image)
            inputs = {}
            for enc_name, value in own.items():
                modality, column = served.own[enc_name]
                if modality == "image":
                    store.put(f"<upload {i} {enc_name}>", value)
                    value = f"<upload {i} {enc_name}>"
                inputs[enc_name] = (modality, column, value)
            rows.append(Sample(key if image is not None else "", question, "", {}, f"request {i + 1}", audio or "",
                               inputs=inputs, video=video or ""))
        with self._lock:
            self._activate(served)
            return answer_rows(served.model, served.tasks, served.recipe, rows, store, top_k, self.device,
                               batch_size=max(1, len(rows)), where=name)

    def generating(self) -> list[str]:
        """The bundles with a task that generates text (those the chat API serves)."""
        return [n for n, b in self.bundles.items() if any(t.feeds_head for t in b.tasks.values())]

    def chat(self, name: str, requests: list[tuple], options: dict, on_texts: list | None = None) -> list[dict]:
        """Bundle ``name``'s generating task's replies to ``requests`` (``(image decoded or None,
        text, history of earlier {role, content} turns)`` each), generated as one batch with the
        decoding settings ``options`` (for this call only); reply ``i``'s pieces go to
        ``on_texts[i]`` as they come. Returns each reply's text, OpenAI ``usage`` counts and
        ``finish_reason``."""
        served = self.bundles[name]
        task_name = next(n for n, t in served.tasks.items() if t.feeds_head)
        task = served.tasks[task_name]
        store = ImageStore.for_encoders(served.model.encoders.values())
        rows, pieces = [], [[] for _ in requests]
        for i, (image, text, history) in enumerate(requests):
            if image is not None:
                store.put(f"<upload {i}>", image)
            rows.append(Sample(f"<upload {i}>" if image is not None else "", text, "", {}, f"request {i + 1}",
                               extra={"messages": history}))

        def taker(i: int):
            def take(piece: str) -> None:
                pieces[i].append(piece)
                if on_texts is not None and on_texts[i] is not None:
                    on_texts[i](piece)
            return take

        with self._lock:
            before = task.settings
            try:
                task.decode_with(**options)
                self._activate(served)
                batch = Collator(rows, dict(served.model.encoders.items()), served.tasks, store)(list(range(len(rows))))
                inputs = send_to_device(batch["inputs"], self.device)
                fed = inputs[TASK_INPUTS][task_name]
                with torch.no_grad(), inference_autocast(served.recipe, self.device):
                    outputs = served.model.encode(inputs)
                    usage = task.stream(served.model.task_head(task_name), outputs, fed,
                                        [taker(i) for i in range(len(rows))])
            finally:
                task.decode_with(**before.model_dump())
        return [{"text": "".join(p), **u} for p, u in zip(pieces, usage)]

    def weight_bytes(self) -> dict:
        """Bytes of the shared encoders' (and decoders') tensors and of what each bundle keeps for itself."""
        shared = [t for s in self._encoders.values() for t in s.encoder.state_dict().values()]
        held = {t.data_ptr() for t in shared}
        base = sum(t.numel() * t.element_size() for t in shared)
        own = {name: sum(t.numel() * t.element_size() for s in b.shared.values() for t in s.states[name].values())
               + sum(t.numel() * t.element_size() for t in b.model.head.state_dict().values() if t.data_ptr() not in held)
               for name, b in self.bundles.items()}
        return {"encoders": base, "bundles": own}
