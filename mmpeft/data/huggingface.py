"""Rows of a Hugging Face ``datasets`` dataset on local disk (``data.source: huggingface``).

Reads a ``save_to_disk`` folder, a ``.parquet`` / ``.arrow`` file, a folder of parquet
files (splits named by their file names, as the hub lays them out), or an ``imagefolder``
/ ``audiofolder`` layout. Images and audio are never decoded by ``datasets``: their
columns are read undecoded (``decode=False``), embedded bytes are written once to files
named by their SHA-256 under ``$MMPEFT_CACHE`` (at most :data:`MAX_BLOB_BYTES` each), and
from there every row goes through the same bounded, checked readers and the same row
checks as a manifest's (:func:`~.samples.samples_from_rows`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .samples import Sample, samples_from_rows

MAX_BLOB_BYTES = 256 * 2**20  # one embedded image or clip
INSTALL = "pip install 'mmpeft[datasets]'"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source 'huggingface' needs the package datasets: {INSTALL}") from None
    datasets.disable_progress_bars()
    return datasets


def open_dataset(path: Path, key: str):
    """A ``Dataset`` or ``DatasetDict`` from ``path`` (``key``: the recipe key that named it)."""
    ds = _datasets()
    path = Path(path)
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                return ds.Dataset.from_parquet(str(path))
            if suffix == ".arrow":
                return ds.Dataset.from_file(str(path))
            raise DataError(f"{key}: {path}: a huggingface file is .parquet or .arrow, not {suffix or 'without a suffix'!r}")
        if not path.is_dir():
            raise DataError(f"{key}: {path} not found")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return ds.load_from_disk(str(path))
        if any(path.rglob("*.parquet")):
            return ds.load_dataset("parquet", data_dir=str(path))
        if any(path.rglob("*.arrow")):
            return ds.load_dataset("arrow", data_dir=str(path))
        builder = _folder_builder(path)
        if builder is None:
            raise DataError(f"{key}: {path} holds no save_to_disk dataset (dataset_dict.json / state.json), no .parquet or "
                            ".arrow files, and no images or audio for an imagefolder / audiofolder layout")
        return ds.load_dataset(builder, data_dir=str(path))
    except DataError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many kinds for a damaged folder or file
        raise DataError(f"{key}: {path}: not readable as a huggingface dataset ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None


def _folder_builder(path: Path) -> Optional[str]:
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    if suffixes & {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}:
        return "imagefolder"
    if suffixes & {".wav", ".flac", ".mp3", ".ogg"}:
        return "audiofolder"
    return None


def pick_split(dataset, split: str, key: str, path: Path):
    """One split of a ``DatasetDict``; a lone ``Dataset`` is its own split."""
    if not hasattr(dataset, "keys"):
        return dataset
    if split not in dataset:
        raise DataError(f"{key}: {path} has no split {split!r} (it has: {', '.join(dataset.keys())}); set data.split / "
                        "data.eval_split / data.test_split to one of these")
    return dataset[split]


def _cache_folder() -> Path:
    return Path(os.environ.get("MMPEFT_CACHE") or Path.home() / ".cache" / "mmpeft").expanduser() / "hf_files"


def blob_file(data: bytes, name_hint: str, where: str) -> str:
    """Embedded bytes as a file of their own (written once, whole files only)."""
    if len(data) > MAX_BLOB_BYTES:
        raise DataError(f"{where}: an embedded file of {len(data) / 2**20:.0f} MiB; at most {MAX_BLOB_BYTES // 2**20} MiB")
    digest = hashlib.sha256(data).hexdigest()
    suffix = Path(name_hint).suffix.lower() if name_hint and len(Path(name_hint).suffix) <= 6 else ""
    folder = _cache_folder() / digest[:2]
    path = folder / f"{digest}{suffix or '.bin'}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _media_value(value, base: Path, where: str, column: str):
    """An image / audio / video cell as a file path: embedded bytes become a cached file, a path stays."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return blob_file(bytes(value["bytes"]), value.get("path") or "", f"{where}, column {column!r}")
        value = value.get("path")
    if value is None or value == "":
        return value
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}; an image, audio or video column holds an "
                        "Image / Audio / Video feature, {bytes, path}, or a file path")
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def undecoded(split, media: list[str]):
    """``split`` with its Image / Audio columns among ``media`` left undecoded."""
    ds = _datasets()
    for column in media:
        feature = split.features.get(column)
        if isinstance(feature, ds.Image):
            split = split.cast_column(column, ds.Image(decode=False))
        elif isinstance(feature, ds.Audio):
            split = split.cast_column(column, ds.Audio(decode=False))
        elif isinstance(feature, getattr(ds, "Video", ())):
            split = split.cast_column(column, ds.Video(decode=False))
    return split


def _label_names(split) -> dict:
    """ClassLabel columns (and lists of them) -> their names, so rows carry the class names."""
    ds = _datasets()
    names = {}
    for column, feature in split.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, ds.ClassLabel):
            names[column] = (feature, False)
        elif isinstance(inner, ds.ClassLabel) or isinstance(feature, list) and feature and isinstance(feature[0], ds.ClassLabel):
            names[column] = (inner if inner is not None else feature[0], True)
    return names


def split_samples(data, path: Path, split_name: str, key: str, request) -> list[Sample]:
    """The rows of one split as samples (``request``: what the recipe reads, as for a manifest)."""
    split = pick_split(open_dataset(path, key), split_name, key, path)
    columns = {"image": data.image_field, "audio": data.audio_field, "video": data.video_field}
    media = [columns[m] for m in ("image", "audio", "video") if m in request.inputs]
    media += [c for m, c in (request.own or {}).values() if m != "text"]
    split = undecoded(split, [c for c in media if c in split.column_names])
    labels = _label_names(split)
    base = path if path.is_dir() else path.parent
    name = f"{path} [split {split_name}]"

    def rows():
        for number, row in enumerate(split, start=1):
            where = f"{name}, row {number}"
            for column in media:
                if column in row:
                    row[column] = _media_value(row[column], base, where, column)
            for column, (feature, many) in labels.items():
                value = row.get(column)
                if value is not None and value != -1:
                    row[column] = [feature.int2str(v) for v in value] if many else feature.int2str(value)
            yield number, row

    return samples_from_rows(rows(), base, name, data.image_field, data.text_field, data.label_field, request.group_fields,
                             data.audio_field, request.inputs, request.targets, request.label_required, request.own,
                             video_field=data.video_field)


def huggingface_splits(data, request) -> tuple[list[Sample], Optional[list[Sample]], list[Sample]]:
    """(train, validation or None, test) of a huggingface data block."""
    path = Path(data.path).expanduser()
    train = split_samples(data, path, data.split, "data.path", request)
    eval_rows = split_samples(data, path, data.eval_split, "data.path", request) if data.eval_split else None
    if data.test:  # a second dataset: its test_split, or all of it when it has no splits
        test = split_samples(data, Path(data.test).expanduser(), data.test_split, "data.test", request)
    else:
        test = split_samples(data, path, data.test_split, "data.path", request)
    return train, eval_rows, test
