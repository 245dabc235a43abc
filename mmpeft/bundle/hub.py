"""Share bundles: push to / pull from the Hugging Face Hub, a local directory standing
in for it, a bundle directory, or a ``.tar.gz`` of one.

Everything pulled is verified as copied (manifest, hashes, safetensors-only, and the digest
when one is pinned) before it is moved into place, and archives are unpacked without
following links or leaving the target.
Set ``MMPEFT_HUB_DIR`` (or pass ``hub_dir``) to use a local directory as the hub:
repositories are then ``<hub_dir>/<owner>/<name>/``; packaging and verification are the
same, only the transport differs (a file copy instead of an HTTP upload).
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Optional

from ..errors import BundleError, MMPeftError, UsageError
from ..files import MAX_MANIFEST_BYTES, atomic_directory
from .io import read_manifest, verify_files
from .manifest import bundle_digest

HUB_ENV = "MMPEFT_HUB_DIR"


def _hub_dir(hub_dir: Optional[str]) -> Optional[Path]:
    chosen = hub_dir or os.environ.get(HUB_ENV)
    return Path(chosen) if chosen else None


_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def _check_repo_id(repo_id: str) -> None:
    """``owner/name`` as the Hub spells them: letters, digits, ``.``, ``_``, ``-``, no ``..``,
    so a repo id can never name a folder outside the hub directory."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) and ".." not in p and "--" not in p for p in parts):
        raise UsageError(f"repository id {repo_id[:200]!r} must look like 'owner/name' (letters, digits, '.', '_', '-')")


def push(bundle, repo_id: str, *, hub_dir: Optional[str] = None, private: bool = False,
         token: Optional[str] = None) -> tuple[str, str]:
    """Verify ``bundle`` and upload it (with its README model card) to ``repo_id``.
    Returns where it went and the bundle's digest (to pin on ``pull --expect-digest``)."""
    bundle = Path(bundle)
    _check_repo_id(repo_id)
    manifest = read_manifest(bundle)
    digest = bundle_digest(manifest)
    files = _check_tree(bundle, manifest, str(bundle))
    verify_files(bundle, manifest)
    local = _hub_dir(hub_dir)
    if local is not None:
        target = local / repo_id
        with atomic_directory(target, overwrite=True) as tmp:
            _copy(bundle, files, tmp, manifest)
        return str(target), digest
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(bundle), repo_id=repo_id, commit_message="Upload mmpeft bundle")
    except Exception as exc:  # noqa: BLE001 - network/auth problems become one clear message
        raise MMPeftError(f"push to {repo_id!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                          f"(log in with `huggingface-cli login`, or set {HUB_ENV} to push to a local directory)") from None
    return f"https://huggingface.co/{repo_id}", digest


MAX_ARCHIVE_BYTES = 16 * 1024**3  # what an archive may unpack to
MAX_ARCHIVE_MEMBERS = 100_000


def _safe_extract(archive: Path, into: Path) -> None:
    """Unpack a ``.tar.gz`` of a bundle: plain files and folders only, inside the target, of a
    bounded total size, all checked from the headers before anything is written."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for member in tar:
                members.append(member)
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise BundleError(f"{archive}: more than {MAX_ARCHIVE_MEMBERS:,} members; not a bundle, refusing to unpack")
            total = 0
            for member in members:
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise BundleError(f"{archive}: member {member.name!r} points outside the archive; refusing to unpack")
                if not (member.isfile() or member.isdir()):
                    raise BundleError(f"{archive}: member {member.name!r} is a link or device; refusing to unpack")
                total += member.size
            if total > MAX_ARCHIVE_BYTES:
                raise BundleError(f"{archive}: unpacks to {total:,} bytes, more than the {MAX_ARCHIVE_BYTES:,} allowed; refusing")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(f"{archive}: not a readable .tar.gz (truncated, damaged, or another kind of file: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _check_tree(root: Path, manifest: dict, where: str, ignore: tuple = ()) -> list[str]:
    """Before any file is read: the bundle holds plain files and folders only (no links, FIFOs
    or devices, which could point anywhere or never end) and no file its manifest does not
    list (nothing unverified is copied into a bundle that is then called verified).
    Returns the files to copy."""
    listed = set(manifest["files"]) | {"manifest.json"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if here == Path(root):
            dirnames[:] = [d for d in dirnames if d not in ignore]
        for name in dirnames + filenames:
            full = here / name
            rel = full.relative_to(root).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{where}: {rel} is a symbolic link; a shared bundle holds plain files only, refusing it")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{where}: {rel} is not a regular file (a FIFO, device or socket); refusing it")
            if rel not in listed:
                raise BundleError(f"{where}: {rel} is not listed in the bundle's manifest; refusing it (a verified bundle "
                                  "holds only the files it lists)")
            files.append(rel)
    return files


def _bundle_root(directory: Path) -> Path:
    if (directory / "manifest.json").is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "manifest.json").is_file():
        return subdirs[0]
    raise BundleError(f"no mmpeft bundle (manifest.json) found in {directory}")


def pull(source: str, out, *, hub_dir: Optional[str] = None, overwrite: bool = False, token: Optional[str] = None,
         expect_digest: Optional[str] = None) -> tuple[Path, str]:
    """Fetch a bundle from a repo id, a local hub directory, a bundle directory or a ``.tar.gz``
    and place it at ``out``, verified; returns ``(out, digest)``.

    What is verified is the copy, after copying: a source file swapped after a check cannot
    land unverified. With a hub directory (``hub_dir`` or ``$MMPEFT_HUB_DIR``) ``source`` is a
    repo id (or an archive), looked up in that folder only, never on the Hugging Face Hub."""
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
        elif local is not None:  # a repo id in that folder, and nothing else
            _check_repo_id(source)
            root = local / source
            if not root.is_dir():
                raise BundleError(f"{source} is not in the hub folder {local}; a hub folder is looked up alone, never "
                                  f"the Hugging Face Hub (to pull a bundle folder, drop --hub-dir / {HUB_ENV})")
        elif src.is_dir():
            root = src
        else:
            _check_repo_id(source)
            from huggingface_hub import snapshot_download

            try:
                root = Path(snapshot_download(source, local_dir=str(scratch / "dl"), token=token))
            except Exception as exc:  # noqa: BLE001
                raise MMPeftError(f"pull of {source!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        manifest = read_manifest(root, expect_digest)  # refuse a wrong bundle before copying a byte of it
        files = _check_tree(root, manifest, source, ignore=(".cache",))  # hub downloads keep their cache there
        with atomic_directory(out, overwrite=overwrite) as tmp:
            _copy(root, files, tmp, manifest)
            copied = read_manifest(tmp, expect_digest)  # what was copied is what is checked
            _check_tree(tmp, copied, source)
            verify_files(tmp, copied)
    return out, bundle_digest(copied)


def _copy(root: Path, files: list[str], into: Path, manifest: dict) -> None:
    """Copy ``files`` and the manifest, each opened without following a link and read no
    further than its recorded size (plus one byte, so a longer file fails its hash)."""
    sizes = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
    for rel in ["manifest.json", *files]:
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise BundleError(f"{root / rel}: cannot be read as a plain file ({exc.strerror}); refusing it") from None
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise BundleError(f"{root / rel}: not a regular file; refusing it")
            limit = sizes.get(rel, MAX_MANIFEST_BYTES) + 1
            with open(into / rel, "wb") as dst:
                while limit > 0:
                    chunk = src.read(min(limit, 1 << 20))
                    if not chunk:
                        break
                    dst.write(chunk)
                    limit -= len(chunk)
