"""Share bundles: push to / pull from the Hugging Face Hub, a local directory standing
in for it, a bundle directory, or a ``.tar.gz`` of one.

Everything pulled is verified (manifest, hashes, safetensors-only) before it is moved
into place, and archives are unpacked without following links or leaving the target.
Set ``MMPEFT_HUB_DIR`` (or pass ``hub_dir``) to use a local directory as the hub:
repositories are then ``<hub_dir>/<owner>/<name>/``; packaging and verification are the
same, only the transport differs (a file copy instead of an HTTP upload).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import BundleError, MMPeftError, UsageError
from ..files import atomic_directory
from .io import read_manifest, verify_files

HUB_ENV = "MMPEFT_HUB_DIR"


def _hub_dir(hub_dir: Optional[str]) -> Optional[Path]:
    chosen = hub_dir or os.environ.get(HUB_ENV)
    return Path(chosen) if chosen else None


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise UsageError(f"repository id {repo_id!r} must look like 'owner/name'")


def push(bundle, repo_id: str, *, hub_dir: Optional[str] = None, private: bool = False, token: Optional[str] = None) -> str:
    """Verify ``bundle`` and upload it (with its README model card) to ``repo_id``. Returns where it went."""
    bundle = Path(bundle)
    verify_files(bundle, read_manifest(bundle))
    _check_repo_id(repo_id)
    local = _hub_dir(hub_dir)
    if local is not None:
        target = local / repo_id
        with atomic_directory(target, overwrite=True) as tmp:
            for item in bundle.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        return str(target)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(bundle), repo_id=repo_id, commit_message="Upload mmpeft bundle")
    except Exception as exc:  # noqa: BLE001 - network/auth problems become one clear message
        raise MMPeftError(f"push to {repo_id!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                          f"(log in with `huggingface-cli login`, or set {HUB_ENV} to push to a local directory)") from None
    return f"https://huggingface.co/{repo_id}"


def _safe_extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise BundleError(f"{archive}: member {member.name!r} points outside the archive; refusing to unpack")
            if not (member.isfile() or member.isdir()):
                raise BundleError(f"{archive}: member {member.name!r} is a link or device; refusing to unpack")
        tar.extractall(into, filter="data")


def _bundle_root(directory: Path) -> Path:
    if (directory / "manifest.json").is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "manifest.json").is_file():
        return subdirs[0]
    raise BundleError(f"no mmpeft bundle (manifest.json) found in {directory}")


def pull(source: str, out, *, hub_dir: Optional[str] = None, overwrite: bool = False, token: Optional[str] = None) -> Path:
    """Fetch a bundle from a repo id, a local hub directory, a bundle directory or a ``.tar.gz``,
    verify it, and place it at ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another --out")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        src = Path(source)
        local = _hub_dir(hub_dir)
        if src.is_file() and source.endswith((".tar.gz", ".tgz")):
            _safe_extract(src, scratch)
            root = _bundle_root(scratch)
        elif src.is_dir():
            root = src
        elif local is not None and (local / source).is_dir():
            root = local / source
        else:
            _check_repo_id(source)
            from huggingface_hub import snapshot_download

            try:
                root = Path(snapshot_download(source, local_dir=str(scratch / "dl"), token=token))
            except Exception as exc:  # noqa: BLE001
                raise MMPeftError(f"pull of {source!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        verify_files(root, read_manifest(root))
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for item in root.iterdir():
                if item.name.startswith(".cache"):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    return out
