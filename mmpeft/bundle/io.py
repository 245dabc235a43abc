"""Read adapter bundles: the manifest, its file hashes, and the model rebuilt from them.

Bundles are untrusted when shared: they are read as JSON, YAML (safe loader) and
safetensors only; every file named in the manifest must lie inside the bundle and
match its recorded sha256 (:mod:`mmpeft.files`). The layout is described in
:mod:`mmpeft.bundle.writer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ..config import load_recipe
from ..errors import BundleError
from ..files import (MAX_MANIFEST_BYTES, add_integrity, atomic_text_file, check_state, read_safetensors, read_text,
                     safetensors_shapes, verify_sealed)
from ..model import assemble, build_encoders
from ..tasks import stored_task_set
from .manifest import bundle_digest, check_digest, parse_manifest


def read_manifest(bundle: Path, expect_digest: Optional[str] = None, *, allow_unsealed: bool = False) -> dict:
    """A bundle's manifest, its shape and integrity checked (:mod:`mmpeft.bundle.manifest`),
    and its digest the pinned one when ``expect_digest`` is given."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    try:
        if not bundle.is_dir():
            raise BundleError(f"bundle not found: {bundle} (expected a directory written by 'mmpeft finetune')")
        if not path.is_file():
            raise BundleError(f"{bundle} is not an mmpeft bundle: no manifest.json")
    except OSError as exc:  # a symbolic-link loop, a name too long
        raise BundleError(f"{bundle}: cannot be read as a bundle ({exc.strerror or exc})") from None
    manifest = parse_manifest(path, allow_unsealed=allow_unsealed)
    check_digest(manifest, expect_digest, bundle)
    return manifest


def seal_bundle(bundle) -> tuple[str, bool]:
    """Seal a format 1 bundle one made oneself: its files must still match the hashes its
    manifest recorded (sealing never blesses a changed file); the manifest then gets its
    integrity hash and format 2. Returns ``(digest, whether it was sealed now)``."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, allow_unsealed=True)
    verify_files(bundle, manifest)
    if manifest["format_version"] >= 2:
        return bundle_digest(manifest), False
    manifest["format_version"] = 2
    add_integrity(manifest)
    with atomic_text_file(bundle / "manifest.json") as handle:
        handle.write(json.dumps(manifest, indent=2))
    return bundle_digest(manifest), True


def verify_files(bundle: Path, manifest: dict) -> None:
    """Every listed file, and every file the manifest names, lies inside the bundle and has its recorded hash."""
    listed = manifest.get("files", {})
    names = set(listed) if isinstance(listed, dict) else set()
    for entry in manifest.get("encoders", {}).values():
        names.update(entry.get("files", []))
    names.add(manifest.get("head", {}).get("file", "head.safetensors"))
    verify_sealed(Path(bundle), listed, names, f"{bundle}/manifest.json")


@dataclass
class LoadedBundle:
    path: Path
    manifest: dict
    recipe: object
    model: object
    vocab: list[str]  # the first task's output names
    tasks: dict  # name -> Task, with the state the bundle stored


def load_bundle(path, *, device: str = "cpu", allow_base_mismatch: bool = False, overrides: Sequence[str] = (),
                verify_base: bool = True, expect_digest: Optional[str] = None) -> LoadedBundle:
    """Rebuild the model from its base encoders and a bundle's trained weights.

    Args:
        path: bundle directory.
        device: where to put the model.
        allow_base_mismatch: load even if a base encoder's fingerprint differs (warns).
        overrides: dotted recipe overrides that do not change the architecture (e.g. ``data.root=...``).
        verify_base: compare base fingerprints (internal merges of a de-quantized copy turn it off).
        expect_digest: the bundle's pinned digest (``sha256:...``); any other bundle is refused.

    Raises:
        BundleError: missing/tampered files, wrong shapes, or a different base encoder.
    """
    bundle, manifest, recipe, tasks = read_bundle(path, overrides, expect_digest)
    encoders, methods = build_encoders(recipe, device)
    check_head_size(recipe, encoders, methods, tasks, bundle, manifest)
    model = assemble(recipe, encoders, methods, tasks)
    for name, enc in model.encoders.items():
        if verify_base:
            check_base(name, enc, manifest, recipe, allow_base_mismatch)
        model.methods[name].load(enc, bundle / "encoders" / name)
    load_head(model.head, bundle, manifest)
    model.to(device)
    model.train(False)
    return LoadedBundle(bundle, manifest, recipe, model, manifest["vocabulary"], tasks)


def read_bundle(path, overrides: Sequence[str] = (), expect_digest: Optional[str] = None):
    """A bundle's verified manifest, its resolved recipe and its tasks: ``(path, manifest, recipe, tasks)``."""
    bundle = Path(path)
    manifest = read_manifest(bundle, expect_digest)
    verify_files(bundle, manifest)
    overrides = list(overrides)
    if manifest.get("merged"):
        # A merged model carries its own base encoders, named relative to the directory.
        root = bundle.resolve()
        for name, entry in manifest.get("encoders", {}).items():
            base = (root / str(entry.get("model", ""))).resolve()
            if root not in base.parents or not base.is_dir():
                raise BundleError(f"{bundle}/manifest.json: encoder {name!r} base {entry.get('model')!r} is not a directory inside the bundle")
            overrides.insert(0, f"encoders.{name}.model={base}")
        heads = manifest.get("merged_heads") or {}
        if not isinstance(heads, dict):
            raise BundleError(f"{bundle}/manifest.json: merged_heads must be a mapping")
        # the recipe's one task: block, or a block of tasks: (named as the manifest names it)
        single = not heads or not (yaml.safe_load(read_text(bundle / "recipe.yaml", BundleError, max_bytes=MAX_MANIFEST_BYTES))
                                   or {}).get("tasks")
        for name, changes in heads.items():
            folder = changes.get("decoder") if isinstance(changes, dict) else None
            base = (root / str(folder)).resolve()
            if not isinstance(folder, str) or root not in base.parents or not base.is_dir():
                raise BundleError(f"{bundle}/manifest.json: task {name!r}'s merged decoder {folder!r} is not a directory "
                                  "inside the bundle")
            overrides.insert(0, f"{'task' if single else f'tasks.{name}'}.decoder={base}")
    recipe = load_recipe(bundle / "recipe.yaml", overrides, anchor=False)  # a resolved recipe: its paths are as trained
    if set(manifest["encoders"]) != set(recipe.encoders):
        raise BundleError(f"{bundle}: manifest encoders {sorted(manifest['encoders'])} differ from the recipe's {sorted(recipe.encoders)}")
    tasks = stored_task_set(recipe, manifest, f"{bundle}/manifest.json")
    return bundle, manifest, recipe, tasks


def check_head_size(recipe, encoders: dict, methods: dict, tasks: dict, bundle: Path, manifest: dict) -> None:
    """Before the heads are allocated: the heads the manifest describes (its vocabulary, its
    tasks) must have the names and shapes the head file holds, so an edited manifest (a
    vocabulary of a million answers) cannot make us build gigabytes. Built on the meta
    device, which allocates nothing; a task whose head is a decoder sizes it from the
    decoder's own files, so such bundles are checked by the head file's names and shapes
    only, when it is read."""
    if any(task.feeds_head for task in tasks.values()):
        return
    path = bundle / manifest["head"]["file"]
    with torch.device("meta"):
        probe = assemble(recipe, encoders, methods, tasks)
    check_state(safetensors_shapes(path), probe.head.state_dict(), path)  # what load_head checks, before allocating


def check_base(name: str, enc, manifest: dict, recipe, allow_base_mismatch: bool = False) -> None:
    """The base encoder loaded here must be the one the bundle was trained on (its fingerprint)."""
    recorded = manifest["encoders"][name].get("fingerprint")
    if recorded and recorded != enc.base_fingerprint:
        message = (
            f"encoder {name!r}: the base model {recipe.encoders[name].model!r} loaded here has fingerprint "
            f"{enc.base_fingerprint[:19]}..., but the bundle was trained on a base with {recorded[:19]}... "
            "(another checkpoint or revision)"
        )
        if not allow_base_mismatch:
            raise BundleError(message + "; pass --allow-base-mismatch to load anyway")
        print(f"warning: {message}; loading anyway (--allow-base-mismatch)")


def load_head(head, bundle: Path, manifest: dict) -> None:
    head.load_state_dict(read_safetensors(Path(bundle) / manifest["head"]["file"], head.state_dict()))
