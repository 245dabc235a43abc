"""Rows of a multimodal dataset, from user manifests or built-in datasets.

Every loader returns :class:`Sample` objects with the answer normalised and a
``where`` string (file and row) used in error messages.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..config.paths import dataset_dir, dataset_missing, vqa_rad_dir
from ..errors import DataError
from ..files import read_text
from ..config.answers import normalize_answer


@dataclass(slots=True)  # a manifest of a million rows holds a million of these: no per-instance __dict__
class Sample:
    image: str  # absolute path ("" for a row without an image)
    text: str
    answer: str  # normalised
    groups: dict[str, str] = field(default_factory=dict)
    where: str = ""  # "file, row N" for error messages
    audio: str = ""  # absolute path of the row's audio clip ("" for none)
    extra: dict = field(default_factory=dict)  # manifest columns the tasks read, as they were (multilabel lists, numbers)
    dataset: str = ""  # the task whose own data: the row came from ("": the recipe's data:, shared)
    # encoders reading a column of their own (data.encoder_fields): {encoder: (modality, column, value)},
    # image and audio values absolute paths
    inputs: dict = field(default_factory=dict)
    video: str = ""  # absolute path of the row's video clip ("" for none)


def input_of(sample: Sample, encoder: str, modality: str) -> str:
    """What ``encoder`` (of ``modality``) reads from a row: its own column's value, else its modality's."""
    own = sample.inputs.get(encoder)
    return getattr(sample, modality) if own is None else own[2]


def files_of(sample: Sample, kind: str) -> list[str]:
    """A row's ``kind`` ("image" / "audio" / "video") file paths: its modality's, then its encoders' own columns'."""
    paths = [getattr(sample, kind)] if getattr(sample, kind) else []
    return paths + [value for modality, _, value in sample.inputs.values() if modality == kind and value]


NO_GROUPS: dict = {}  # shared by the rows of a manifest without group fields (never written to)


def load_manifest(
    path: str | Path,
    image_field: str = "image",
    text_field: str = "question",
    label_field: str = "answer",
    group_fields: Sequence[str] = (),
    audio_field: str = "audio",
    inputs: Sequence[str] = ("image", "text"),
    targets: Sequence[str] = (),
    label_required: bool = True,
    own: Optional[dict[str, tuple[str, str]]] = None,
    video_field: str = "video",
) -> list[Sample]:
    """Read a JSONL, CSV or JSON-list manifest. Image and audio paths are relative to the
    manifest. ``inputs`` are the modalities the recipe's encoders read: their columns must
    be in every row; a column no encoder reads may be absent. ``targets`` are columns the
    tasks read, kept as they are in ``Sample.extra`` (lists, numbers; the tasks parse them);
    the label column is required in every row only with ``label_required`` (one task).
    ``own``: ``{encoder: (modality, column)}`` of encoders reading a column of their own
    (:func:`~mmpeft.config.inputs.own_columns`), required in every row too, kept in ``Sample.inputs``.

    Raises:
        DataError: naming the file and row of a missing field or malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check data.train / data.eval / data.test in the recipe)")
    return samples_from_rows(iter_rows(path), path.parent, str(path), image_field, text_field, label_field, group_fields,
                             audio_field, inputs, targets, label_required, own, video_field=video_field)


def samples_from_rows(rows, base: Path, name: str, image_field: str = "image", text_field: str = "question",
                      label_field: str = "answer", group_fields: Sequence[str] = (), audio_field: str = "audio",
                      inputs: Sequence[str] = ("image", "text"), targets: Sequence[str] = (), label_required: bool = True,
                      own: Optional[dict[str, tuple[str, str]]] = None, row_word: str = "row",
                      video_field: str = "video") -> list[Sample]:
    """:func:`load_manifest`'s rows from ``(number, row)`` pairs of any source with named
    columns; file paths relative to ``base``; errors name ``"{name}, {row_word} {number}"``."""
    columns = {"image": image_field, "text": text_field, "audio": audio_field, "video": video_field}
    own = own or {}
    required = [columns[m] for m in ("image", "text", "audio", "video") if m in inputs] + ([label_field] if label_required else [])
    required += [c for _, c in own.values() if c not in required]
    raw_label = label_field in targets
    paths = [f for f in (image_field, audio_field, video_field) if f in required] + [c for m, c in own.values() if m != "text"]
    samples = []
    resolved: dict[str, str] = {}  # one string per distinct file path (many rows share an image)
    answers: dict[str, str] = {}
    for number, row in rows:
        where = f"{name}, {row_word} {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {', '.join(map(repr, required))}")
        missing = [f for f in required if row.get(f) in (None, "")]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(map(repr, missing))} (set data.image_field / data.text_field / "
                f"data.audio_field / data.video_field / data.label_field / data.encoder_fields to this file's column names; it has: "
                f"{', '.join(map(str, row))})"
            )
        wrong = [f for f in required if not (raw_label and f == label_field) and
                 (not isinstance(row[f], (str, int, float)) or f in paths and not isinstance(row[f], str))]
        if wrong:
            raise DataError(f"{where}: field(s) {', '.join(map(repr, wrong))} must be text (images, audio and video: a file path), "
                            f"not {', '.join(type(row[f]).__name__ for f in wrong)}")
        groups = {g: str(row.get(g, "")).strip() for g in group_fields} if group_fields else NO_GROUPS
        files = [_absolute(row.get(f), base, resolved) if f in paths else "" for f in (image_field, audio_field, video_field)]
        extras = {name: (m, c, _absolute(row[c], base, resolved) if m != "text" else str(row[c]))
                  for name, (m, c) in own.items()} if own else NO_GROUPS
        text = str(row[text_field]) if row.get(text_field) not in (None, "") else ""
        label = row.get(label_field)
        answer = normalize_answer(label) if isinstance(label, (str, int, float)) and label != "" else ""
        extra = {f: row[f] for f in targets if row.get(f) not in (None, "")} if targets else NO_GROUPS
        samples.append(Sample(files[0], text, answers.setdefault(answer, answer), groups, where, files[1], extra,
                              inputs=extras, video=files[2]))
    return samples


def _absolute(value, base: Path, resolved: dict[str, str]) -> str:
    """A manifest's file path, absolute (relative ones are read from the manifest's folder); one
    string per distinct path (``resolved``: many rows share an image)."""
    if not value:
        return ""
    absolute = resolved.get(value)
    if absolute is None:
        raw = Path(value)
        absolute = resolved[value] = str(raw if raw.is_absolute() else base / raw)
    return absolute


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"key(s) {', '.join(map(repr, duplicated))} appear twice in one row")
    return dict(pairs)


def _json(text: str, where: str, what: str):
    """JSON that refuses a key given twice in one object (the second would silently win);
    any problem is a DataError naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValueError as exc:  # a key twice, an integer of thousands of digits
        raise DataError(f"{where}: {exc}") from None
    except RecursionError:
        raise DataError(f"{where}: nested too deeply to be {what}") from None


def read_rows(path: Path) -> list[tuple[int, object]]:
    """``(row number, row)`` of a JSONL, CSV (header row first) or JSON-list file, read as
    UTF-8 with or without a byte-order mark."""
    return list(iter_rows(path))


def iter_rows(path: Path):
    """:func:`read_rows` one row at a time (a large manifest is never held as rows twice)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".json"):
        raise DataError(f"{path}: unsupported manifest type {suffix!r}; use .jsonl, .csv or .json"
                        + (" (a Hugging Face dataset file: data.source: huggingface, data.path)"
                           if suffix in (".arrow", ".parquet") else ""))
    text = read_text(path, DataError)
    if suffix == ".jsonl":
        for number, line in enumerate(io.StringIO(text), start=1):
            if line.strip():
                yield number, _json(line, f"{path}, line {number}", "a row")
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            for number, row in enumerate(reader, start=1):  # data rows from 1, as in JSONL (the header not counted)
                if number == 1:
                    names = reader.fieldnames or []
                    if len(set(names)) != len(names):
                        raise DataError(f"{path}: the header names a column twice "
                                        f"({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
                if None in row:
                    raise DataError(f"{path}, row {number}: more values than the header has columns "
                                    f"({len(reader.fieldnames or [])}); quote values that hold commas")
                yield number, row
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: not readable as CSV ({exc})") from None
        return
    data = _json(text, str(path), "a manifest")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    yield from enumerate(data, start=1)


# --- easy-VQA -------------------------------------------------------------

EASY_VQA_COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
EASY_VQA_SHAPES = {"rectangle", "circle", "triangle"}


def easy_vqa_samples(split: str) -> list[Sample]:
    """easy-VQA (pip package ``easy-vqa``): 38,575 train / 9,673 test questions, 13 answers.

    Each row gets a ``question_type`` group: ``yes/no``, ``shape`` or ``color``.
    """
    try:
        import easy_vqa
    except ImportError:
        raise DataError("data.source 'easy_vqa' needs the package easy-vqa: pip install 'mmpeft[zoo]'") from None
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    samples = []
    for i, (t, a, image_id) in enumerate(zip(texts, answers, ids)):
        ans = normalize_answer(a)
        qtype = "yes/no" if ans in ("yes", "no") else ("color" if ans in EASY_VQA_COLORS else "shape")
        samples.append(Sample(paths[image_id], t, ans, {"question_type": qtype}, f"easy_vqa {split}, question {i}"))
    return samples


def easy_vqa_caption_samples(split: str) -> list[Sample]:
    """easy-VQA's images with a caption each, for contrastive alignment and zero-shot
    classification: every image shows one shape of one colour, both read from the answers of
    its own questions (``what color is the shape?``, ``what is the <colour> shape?``, and the
    yes/no questions that affirm a colour or shape, negations read as such), so the caption is ``"a {colour} {shape}"`` and the answer (the class) ``"{colour} {shape}"``
    (8 colours x 3 shapes = 24 classes). Of easy-VQA's 4,000 train / 1,000 test images,
    3,132 / 772 have questions that give both (where a direct question and a yes/no one
    both tell an attribute, they agree on every train and test image); the rest are left
    out. Groups: ``color``, ``shape``."""
    color: dict[str, str] = {}
    shape: dict[str, str] = {}
    for row in easy_vqa_samples(split):
        kind = row.groups["question_type"]
        if kind == "color":
            color[row.image] = row.answer
        elif kind == "shape":
            shape[row.image] = row.answer
        else:  # "is there a red shape?" yes, "does the image not contain a circle?" no: the image has it
            words = row.text.lower().rstrip("?").split()
            if (row.answer == "yes") != ("not" in words or "no" in words):
                for word in words:
                    if word in EASY_VQA_COLORS:
                        color.setdefault(row.image, word)
                    elif word in EASY_VQA_SHAPES:
                        shape.setdefault(row.image, word)
    samples = []
    for i, image in enumerate(sorted(set(color) & set(shape))):
        c, s = color[image], shape[image]
        samples.append(Sample(image, f"a {c} {s}", f"{c} {s}", {"color": c, "shape": s}, f"easy_vqa captions {split}, image {i}"))
    return samples


# --- VQA-RAD --------------------------------------------------------------

VQA_RAD_FILES = {"train": "trainset.json", "test": "testset.json"}


def vqa_rad_root(root: Optional[str]) -> Path:
    """Resolve the VQA-RAD directory: data.root, else $MMPEFT_VQA_RAD_ROOT, else ../shared/vqa_rad."""
    missing = dataset_missing("vqa_rad", root)
    if missing:
        raise DataError(missing)
    return vqa_rad_dir(root)


def vqa_rad_samples(root: Optional[str], split: str) -> list[Sample]:
    """VQA-RAD's community split (3,064 train / 451 test), handling the dataset's quirks:
    integer answers become strings, ``"CLOSED "`` loses its trailing space, answers are
    normalised (case, spacing), and open answers unseen in training are kept (scored wrong).

    Groups: ``answer_type`` (OPEN/CLOSED), ``question_type`` (PRES, POS, ABN, ...), ``image_organ``.
    """
    base = vqa_rad_root(root)
    path = base / VQA_RAD_FILES[split]
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read VQA-RAD records ({exc})") from None
    samples = []
    for i, rec in enumerate(records, start=1):
        where = f"{path}, record {i} (qid {rec.get('qid')})"
        try:
            groups = {
                "answer_type": str(rec["answer_type"]).strip().upper(),
                "question_type": str(rec.get("question_type", "")).strip().upper(),
                "image_organ": str(rec.get("image_organ", "")).strip().upper(),
            }
            samples.append(
                Sample(str(base / "images" / rec["image_name"]), str(rec["question"]), normalize_answer(rec["answer"]), groups, where)
            )
        except KeyError as exc:
            raise DataError(f"{where}: missing field {exc}") from None
    return samples


# --- Free Spoken Digit Dataset ----------------------------------------------

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_NAME = re.compile(r"^([0-9])_([a-z]+)_([0-9]+)\.wav$")


def fsdd_samples(root: Optional[str], holdout_speakers: Sequence[str] = (), pair_images: bool = False, seed: int = 0,
                 text: str = "") -> tuple[list[Sample], list[Sample]]:
    """FSDD (Jackson et al., CC BY-SA 4.0): 3,000 recordings ``{digit}_{speaker}_{index}.wav``
    of the digits 0-9 by six speakers. Returns ``(train, test)``: the official split (indices
    0-4 of every digit and speaker are the test set) or, with ``holdout_speakers``, those
    speakers' recordings as the test set (speaker-independent). The answer is the digit;
    groups: ``speaker``. ``pair_images``: each recording also gets a handwritten image of
    its digit (:func:`pair_with_digit_images`); ``text``: every row's text."""
    missing = dataset_missing("fsdd", root)
    if missing:
        raise DataError(missing)
    folder = dataset_dir("fsdd", root) / "recordings"
    unknown = sorted(set(holdout_speakers) - set(FSDD_SPEAKERS))
    if unknown:
        raise DataError(f"data.holdout_speakers: unknown FSDD speaker(s) {', '.join(unknown)} (FSDD has: {', '.join(FSDD_SPEAKERS)})")
    if set(holdout_speakers) == set(FSDD_SPEAKERS):
        raise DataError("data.holdout_speakers: holding out every speaker leaves nothing to train on")
    train, test = [], []
    for path in sorted(folder.iterdir()):
        match = FSDD_NAME.match(path.name)
        if not match:
            continue
        digit, speaker, index = match.group(1), match.group(2), int(match.group(3))
        sample = Sample("", text, digit, {"speaker": speaker}, f"fsdd {path.name}", str(path))
        held_out = speaker in holdout_speakers if holdout_speakers else index < 5
        (test if held_out else train).append(sample)
    if not train or not test:
        raise DataError(f"{folder}: no FSDD recordings named <digit>_<speaker>_<index>.wav for one of the splits")
    if pair_images:
        pair_with_digit_images(train, test, seed)
    return train, test


def digit_images() -> list[tuple[str, str]]:
    """scikit-learn's 1,797 handwritten digits (``load_digits``, UCI "Optical Recognition of
    Handwritten Digits", shipped inside scikit-learn) as ``(png path, digit)``: 8x8 grey
    levels 0-16 scaled to 0-255, written once to ``$MMPEFT_CACHE`` (default
    ~/.cache/mmpeft)/sklearn_digits, whole files only (temp name, then rename)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.pair_images needs scikit-learn: pip install 'mmpeft[zoo]'") from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    folder = Path(os.environ.get("MMPEFT_CACHE") or Path.home() / ".cache" / "mmpeft").expanduser() / "sklearn_digits"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = folder / f"{i:04d}_{label}.png"
        if not path.is_file():
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), mode="L").save(tmp, format="PNG")
            os.replace(tmp, path)
        out.append((str(path), str(label)))
    return out


def pair_with_digit_images(train: list[Sample], test: list[Sample], seed: int) -> None:
    """Give every recording an image of the same digit (in place): the images are split in
    two disjoint halves by a seeded shuffle, training rows draw from one, test rows from the
    other, each with its own seeded generator, so the pairing is the same on every run."""
    images = digit_images()
    random.Random(f"digits/{seed}").shuffle(images)
    half = len(images) // 2
    for rows, pool, tag in ((train, images[:half], "train"), (test, images[half:], "test")):
        by_digit: dict[str, list[str]] = {}
        for path, label in pool:
            by_digit.setdefault(label, []).append(path)
        rng = random.Random(f"pairs/{seed}/{tag}")
        for row in rows:
            row.image = rng.choice(by_digit[row.answer])
