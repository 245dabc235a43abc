"""A bundle's ``manifest.json``, read as untrusted input.

Its shape is checked before anything uses it (types, required keys, bounded sizes), so an
edited or damaged manifest is refused with the key named, never a ``KeyError``. Its own
integrity is checked too (format 2 and later): ``integrity`` is the sha256 of the rest of
the manifest, so an edit of the vocabulary or the task (which no file hash covers) is
caught. Format 1 manifests carry no such hash and are refused (``mmpeft seal`` seals one's
own), so a file cannot switch its own check off by declaring an older format.

The integrity hash protects against damage and careless edits, not against someone who
recomputes the hashes on purpose. Against that, pin the bundle's **digest**
(:func:`bundle_digest`: one sha256 over the sealed manifest, which holds every file's
sha256), as pip's ``--require-hashes`` or a container digest pins what was reviewed:
``--expect-digest`` on pull / predict / evaluate / merge / serve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config.problems import describe_error
from ..errors import BundleError
from ..files import MAX_MANIFEST_BYTES, check_integrity, json_fingerprint, read_text

FORMAT = "mmpeft-bundle"
FORMAT_VERSION = 3  # 2: the manifest carries its own integrity hash; 3: heads' own files (a decoder's adapter), every kind's task state
MAX_VOCABULARY = 1_000_000


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # later versions may add keys; no coercion ("2" is not 2)


class FileEntry(_Open):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class EncoderEntry(_Open):
    model: str
    modality: str
    arch: str
    method: str
    settings: dict[str, Any]
    files: list[str] = Field(max_length=1000)
    fingerprint: Optional[str] = None
    trainable_parameters: int = Field(ge=0)
    total_parameters: int = Field(ge=0)
    quantization: Optional[dict[str, Any]] = None


class HeadEntry(_Open):
    type: str
    file: str
    parameters: int = Field(ge=0)


class BundleManifest(_Open):
    format: str
    format_version: int = Field(ge=1)
    run_name: str
    task: str
    versions: dict[str, str] = Field(default_factory=dict)
    encoders: dict[str, EncoderEntry] = Field(min_length=1, max_length=64)
    head: HeadEntry
    vocabulary: list[str] = Field(max_length=MAX_VOCABULARY)
    tasks: Optional[dict[str, dict[str, Any]]] = Field(None, max_length=32)
    files: dict[str, FileEntry] = Field(max_length=100_000)


DIGEST_PREFIX = "sha256:"


def bundle_digest(manifest: dict) -> str:
    """``sha256:<hex>`` over the whole sealed manifest (canonical JSON): it covers every file's
    hash, the vocabulary, the tasks and the integrity hash, so it names one bundle exactly."""
    return DIGEST_PREFIX + json_fingerprint(manifest)


def check_digest(manifest: dict, expected: Optional[str], where) -> None:
    """Refuse a bundle whose digest is not the pinned one (``expected``; None pins nothing)."""
    if expected is None:
        return
    want = expected.strip().lower()
    want = want if want.startswith(DIGEST_PREFIX) else DIGEST_PREFIX + want
    found = bundle_digest(manifest)
    if found != want:
        raise BundleError(f"{where}: its digest is {found}, not the expected {want[:80]}: this is not the bundle that "
                          "was pinned (changed, resealed or another one); do not use it")


def parse_manifest(path, *, allow_unsealed: bool = False) -> dict:
    """The manifest at ``path`` as a dict whose shape and integrity have been checked.

    ``allow_unsealed`` admits a format 1 manifest (no integrity hash) for ``mmpeft seal`` only."""
    text = read_text(path, BundleError, max_bytes=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{path}: not an mmpeft bundle manifest (format {found!r})")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version} is newer than this mmpeft understands; upgrade mmpeft")
    try:
        BundleManifest.model_validate(manifest)
    except ValidationError as exc:
        problems = [describe_error(err, BundleManifest) for err in exc.errors()[:10]]
        raise BundleError(f"{path} is damaged or was edited: " + "; ".join(problems)) from None
    if manifest["format_version"] >= 2:
        check_integrity(manifest, path)
    elif not allow_unsealed:
        bundle = Path(path).parent
        raise BundleError(f"{path}: bundle format 1 is not sealed (no integrity hash), so an edit of it cannot be "
                          f"detected; refusing it. If you made this bundle yourself, seal it once: mmpeft seal {bundle}")
    return manifest
