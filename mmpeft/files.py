"""The rules for the files mmpeft reads from others and writes for them, in one place.

Reading (bundles, pulled archives, uploads are untrusted):
- tensors come from safetensors only, never from pickle; the header is read first and
  checked against the names and shapes the model expects, so a file cannot make us
  allocate tensors we did not ask for;
- paths named in a manifest must stay inside their folder;
- every file must match the size and sha256 recorded when it was written.

Writing: into a temporary sibling, renamed into place once complete (a folder or a text
file), so an interrupted write leaves the old content or nothing, never half of it. A
*sealed* folder lists every file's size and sha256 in its manifest, written last.

Fingerprints: sha256 over a module's tensors (is this the base a bundle was trained
on?) and over canonical JSON (were these results made with the same settings?).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Optional

from .errors import BundleError, MMPeftError, UsageError

# safetensors itself refuses headers above 100 MB; a larger claim is a damaged or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest with a million-answer vocabulary is ~20 MB
SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
                      "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


# --- reading untrusted files ----------------------------------------------


def read_text(path: Path, error: type[MMPeftError] = MMPeftError, max_bytes: Optional[int] = None) -> str:
    """A text file as UTF-8, with or without a byte-order mark (spreadsheets write one), as
    ``str`` with universal newlines. Anything else is refused with the file and the byte
    offset of the first undecodable byte, as ``error``.
    """
    path = Path(path)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{path}: {path.stat().st_size:,} bytes, more than the {max_bytes:,} allowed for this file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 4]!r}...); "
                    "save it as UTF-8 (in a spreadsheet: CSV UTF-8)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")



def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading any tensor.

    Raises:
        BundleError: the file is missing or is not a well-formed safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    size = path.stat().st_size

    def bad(reason: str) -> BundleError:
        return BundleError(f"{path}: not a valid safetensors file ({reason})")

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise bad(f"header claims {length} bytes in a {size}-byte file")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
        except RecursionError:  # e.g. 200,000 nested "[": no header of ours is nested deeper than two levels
            raise bad("header is nested too deeply to be a tensor table") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]))
        if not ok:
            raise bad(f"tensor {name!r} has a malformed entry")
        shapes[name] = tuple(info["shape"])
    return shapes


def check_state(found: Mapping, expected: Mapping, path) -> None:
    """Names and shapes in a file (tensors or shapes) must be exactly those the model expects."""
    got = {n: tuple(getattr(v, "shape", v)) for n, v in found.items()}
    want = {n: tuple(getattr(v, "shape", v)) for n, v in expected.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = [f"{n}: file {got[n]} vs model {want[n]}" for n in got if n in want and got[n] != want[n]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
        if bad:
            parts.append(f"shape mismatch {bad[:5]}")
        raise BundleError(f"{path} does not match the model its recipe builds: " + "; ".join(parts))


def read_safetensors(path: Path, expected: Optional[Mapping] = None, finite: bool = True) -> dict:
    """Read an untrusted tensor file: safetensors only, never pickle.

    Args:
        expected: ``{name: tensor or shape}``; when given, the header must hold exactly these
            names and shapes, checked before any tensor is read.
        finite: refuse NaN and infinite values (a shared model holding them cannot answer;
            a checkpoint is read as it was written).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    shapes = safetensors_shapes(path)
    if expected is not None:
        check_state(shapes, expected, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a valid safetensors file ({exc})") from None
    if finite:
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise BundleError(f"{path}: tensor(s) {', '.join(bad[:5])} hold NaN or infinite values; the model cannot answer "
                              "with them (was its training diverging?)")
    return tensors


def inside(root: Path, rel) -> Optional[Path]:
    """``root / rel`` resolved, or None when ``rel`` is not a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None
    try:
        root = Path(root).resolve()
        full = (root / rel).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symbolic-link loop (Python < 3.13)
        raise BundleError(f"{Path(root) / rel}: cannot be resolved ({exc}): a symbolic-link loop or a broken folder; "
                          "fetch the bundle again (mmpeft pull copies plain files only)") from None
    return full if root in full.parents else None


def verify_sealed(root: Path, listed: dict, names, where: str) -> None:
    """Each of ``names`` lies inside ``root``, exists, and matches its entry in ``listed``
    (``{relative path: {bytes, sha256}}``, the manifest's file table); ``where`` names the manifest."""
    if not isinstance(listed, dict):
        raise BundleError(f"{where}: 'files' must be a table of file hashes; the manifest was altered")
    for rel in sorted(names, key=str):
        full = inside(root, rel)
        if full is None:
            raise BundleError(f"{where} names a path outside the bundle: {rel!r}; refusing to load")
        if not full.is_file():
            raise BundleError(f"bundle file missing: {full}")
        info = listed.get(rel)
        if not isinstance(info, dict):
            raise BundleError(f"{where}: {rel} has no recorded hash; the bundle was altered")
        if full.stat().st_size != info.get("bytes"):  # checked before reading: a swapped-in huge file is not hashed
            raise BundleError(f"{full} does not match the size in {Path(where).name}: the bundle was modified after it was written")
        if file_sha256(full) != info.get("sha256"):
            raise BundleError(f"{full} does not match the hash in {Path(where).name}: the bundle was modified after it was written")


# --- hashes and fingerprints ---------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_module(module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``state_dict``.

    Computed on a base encoder before any method attaches (about 0.2 s for MiniLM).
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def json_fingerprint(data) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# --- writing --------------------------------------------------------------


# Sealed folders mmpeft writes: their manifest file and the format it declares.
SEALED_MANIFESTS = {"manifest.json": ("mmpeft-bundle",), "export.json": ("mmpeft-onnx-export", "mmpeft-llava-export"),
                    "checkpoint.json": ("mmpeft-checkpoint",)}


def written_by_mmpeft(folder: Path) -> bool:
    """True when ``folder`` is a sealed folder mmpeft wrote and holds nothing else (every
    file in it is listed in its manifest): only such a folder may be replaced."""
    for name, forms in SEALED_MANIFESTS.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return False
        if not isinstance(manifest, dict) or manifest.get("format") not in forms or not isinstance(manifest.get("files"), dict):
            return False
        present = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if not p.is_dir()}
        return present - {name} <= set(manifest["files"])
    return False


def remove_leftovers(target: Path) -> list[str]:
    """Remove the temporary siblings (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``) that an
    interrupted write of ``target`` left behind, when the process that made them is gone."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        for path in target.parent.glob(prefix + "*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
    if removed:
        print(f"removed {len(removed)} leftover temporary folder(s) of an interrupted write beside {target}: "
              f"{', '.join(sorted(removed))}", file=sys.stderr)
    return removed


def _only(folder: Path, names: frozenset) -> bool:
    """True when ``folder`` holds plain files named in ``names`` and nothing else."""
    if not names or folder.is_symlink() or not folder.is_dir():
        return False
    return all(p.name in names and p.is_file() and not p.is_symlink() for p in folder.iterdir())


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, ours: frozenset = frozenset()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``target``.

    An interrupted write leaves only a hidden ``.tmp`` directory (removed by the next write
    of the same target), never a half bundle. ``overwrite`` replaces only a folder mmpeft
    wrote (see :func:`written_by_mmpeft`), or one holding nothing but plain files named in
    ``ours`` (a damaged folder of a kind only mmpeft writes, such as a checkpoint whose
    manifest was cut short); a folder holding anything else is refused.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; choose another output name or pass --overwrite / output.overwrite=true")
    if target.exists() and not written_by_mmpeft(target) and not _only(target, ours):
        raise UsageError(f"{target} exists and holds files mmpeft did not write; it is not replaced: move it away "
                         "or choose another output name")
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        share_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def share_permissions(directory: Path) -> None:
    """Ordinary permissions for a folder made to be shared: what the user's umask gives a
    new file or folder (0644 / 0755 under the usual 022), not the 0700 of a private
    temporary folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for path in Path(directory).rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_text_file(target: Path, newline: Optional[str] = None) -> Iterator:
    """Yield a text handle on a hidden sibling of ``target``, renamed onto it once the
    block completes: an interrupted write keeps the old file (or none), never half one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline=newline) as handle:
            yield handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def file_table(directory: Path, exclude: str = "manifest.json") -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of every file but the manifest itself."""
    table = {}
    for path in sorted(Path(directory).rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != exclude:
            table[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return table


def seal(directory: Path, manifest: Optional[dict] = None, name: str = "manifest.json") -> dict:
    """Write ``manifest`` (default: the one already there) with a fresh ``files`` table of
    everything in ``directory`` and its own ``integrity`` hash (both added to ``manifest`` in
    place); returns it."""
    path = Path(directory) / name
    manifest = json.loads(path.read_text()) if manifest is None else manifest
    manifest["files"] = file_table(directory, exclude=name)
    add_integrity(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def add_integrity(manifest: dict) -> dict:
    """Give ``manifest`` (in place) its ``integrity`` hash: the sha256 of the rest of it."""
    manifest.pop("integrity", None)
    manifest["integrity"] = json_fingerprint(manifest)
    return manifest


def check_integrity(manifest: dict, where) -> None:
    """A sealed manifest's ``integrity`` must be the sha256 of the rest of it: an edit of a
    field that no file hash covers (a vocabulary, a task) is caught. Damage and careless
    edits, that is: without a key, a forger can recompute it."""
    rest = {k: v for k, v in manifest.items() if k != "integrity"}
    if manifest.get("integrity") != json_fingerprint(rest):
        raise BundleError(f"{where} was edited after it was written (its integrity hash does not match its content)")


@dataclass
class Sealing:
    """A folder being written: ``path`` is the temporary folder, ``manifest`` what its
    manifest will hold (its file table is added when the folder is sealed)."""

    path: Path
    manifest: dict = field(default_factory=dict)


@contextmanager
def sealed_directory(target: Path, name: str = "manifest.json", overwrite: bool = False,
                     ours: frozenset = frozenset()) -> Iterator[Sealing]:
    """Write a folder atomically and seal it: when the block completes, ``name`` gets the
    manifest with every file's size and sha256, and the folder is renamed into place
    (``ours``: as :func:`atomic_directory`)."""
    with atomic_directory(target, overwrite=overwrite, ours=ours) as tmp:
        sealing = Sealing(tmp)
        yield sealing
        seal(tmp, sealing.manifest, name)


# --- one writer per output ------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(lock_path: Path, what: str) -> Iterator[Optional[str]]:
    """Hold an exclusive lock on ``lock_path`` for the block (one writer per output).

    A second holder is refused at once, naming the process that holds the lock. The lock
    is the kernel's (flock): a process that dies releases it, and a lock file whose
    recorded process is gone is taken over; the block receives a note saying so (else None).
    The file is removed when the block ends (a run leaves no lock behind); a holder that
    locked a file another holder removed meanwhile sees that its path is gone and locks anew.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise MMPeftError(f"{what} is being written by another run ({holder}); wait for it to finish, "
                              "or choose another output.name / --out") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed (and perhaps made again) by the holder before us: lock the file at the path now
    else:
        raise MMPeftError(f"{what}: its lock file {lock_path} kept being replaced; is another program removing it?")
    try:
        previous = _read_holder(fd)
        note = None
        if previous and previous.get("pid") != os.getpid():
            note = (f"took over the lock of an earlier run (pid {previous.get('pid')}, started {previous.get('started')}), "
                    f"which is no longer running: it was interrupted")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                  "started": _now()}).encode(), 0)
        try:
            yield note
        finally:
            os.ftruncate(fd, 0)  # released: an empty lock file is no one's
            lock_path.unlink(missing_ok=True)  # removed while still held, so no one locks a file on its way out
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_holder(fd) -> Optional[dict]:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _holder(fd) -> str:
    info = _read_holder(fd) or {}
    alive = " (running)" if isinstance(info.get("pid"), int) and _alive(info["pid"]) else ""
    return (f"pid {info.get('pid', '?')}{alive} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def check_writable(target: Path) -> None:
    """Fail now, not after hours of training, if ``target`` (a folder to be written
    atomically) cannot be: its parent cannot be made, is a file, is read-only, is under
    /proc, or the name is too long."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        probe.rmdir()
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc} ({exc.filename or target.parent}); "
                         "choose a writable output folder and a shorter name") from None
    if target.exists() and not target.is_dir():
        raise UsageError(f"cannot write {target}: a file of that name is in the way")
