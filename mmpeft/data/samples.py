"""Rows of a multimodal dataset, from user manifests or built-in datasets.

Every loader returns :class:`Sample` objects with the answer normalised and a
``where`` string (file and row) used in error messages.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..config.paths import VQA_RAD_ENV, vqa_rad_dir
from ..errors import DataError
from ..files import read_text
from ..tasks.vocab import normalize_answer


@dataclass(slots=True)  # a manifest of a million rows holds a million of these: no per-instance __dict__
class Sample:
    image: str  # absolute path
    text: str
    answer: str  # normalised
    groups: dict[str, str] = field(default_factory=dict)
    where: str = ""  # "file, row N" for error messages


NO_GROUPS: dict = {}  # shared by the rows of a manifest without group fields (never written to)


def load_manifest(
    path: str | Path,
    image_field: str = "image",
    text_field: str = "question",
    label_field: str = "answer",
    group_fields: Sequence[str] = (),
) -> list[Sample]:
    """Read a JSONL, CSV or JSON-list manifest. Image paths are relative to the manifest.

    Raises:
        DataError: naming the file and row of a missing field or malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check data.train / data.eval / data.test in the recipe)")
    base = path.parent
    samples = []
    resolved: dict[str, str] = {}  # one string per distinct image path (many rows share an image)
    answers: dict[str, str] = {}
    for number, row in iter_rows(path):
        where = f"{path}, row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {image_field!r}, {text_field!r}, {label_field!r}")
        missing = [f for f in (image_field, text_field, label_field) if row.get(f) in (None, "")]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(map(repr, missing))} "
                f"(set data.image_field / data.text_field / data.label_field to this file's column names; it has: {', '.join(map(str, row))})"
            )
        wrong = [f for f, v in ((image_field, row[image_field]), (text_field, row[text_field]), (label_field, row[label_field]))
                 if not isinstance(v, (str, int, float)) or f == image_field and not isinstance(v, str)]
        if wrong:
            raise DataError(f"{where}: field(s) {', '.join(map(repr, wrong))} must be text (the image: a file path), "
                            f"not {', '.join(type(row[f]).__name__ for f in wrong)}")
        groups = {g: str(row.get(g, "")).strip() for g in group_fields} if group_fields else NO_GROUPS
        image = resolved.get(row[image_field])
        if image is None:
            raw = Path(row[image_field])
            image = resolved[row[image_field]] = str(raw if raw.is_absolute() else base / raw)
        answer = normalize_answer(row[label_field])
        samples.append(Sample(image, str(row[text_field]), answers.setdefault(answer, answer), groups, where))
    return samples


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
        raise DataError(f"{path}: unsupported manifest type {suffix!r}; use .jsonl, .csv or .json")
    text = read_text(path, DataError)
    if suffix == ".jsonl":
        for number, line in enumerate(io.StringIO(text), start=1):
            if line.strip():
                yield number, _json(line, f"{path}, line {number}", "a row")
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            for number, row in enumerate(reader, start=2):  # row 1 is the header
                if number == 2:
                    names = reader.fieldnames or []
                    if len(set(names)) != len(names):
                        raise DataError(f"{path}: the header names a column twice "
                                        f"({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
                if None in row:
                    raise DataError(f"{path}, row {number}: more values than the header has columns "
                                    f"({len(reader.fieldnames or [])}); quote values that hold commas")
                yield number, row
        except csv.Error as exc:
            raise DataError(f"{path}, row {reader.line_num}: not readable as CSV ({exc})") from None
        return
    data = _json(text, str(path), "a manifest")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    yield from enumerate(data, start=1)


# --- easy-VQA -------------------------------------------------------------

EASY_VQA_COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


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


# --- VQA-RAD --------------------------------------------------------------

VQA_RAD_FILES = {"train": "trainset.json", "test": "testset.json"}


def vqa_rad_root(root: Optional[str]) -> Path:
    """Resolve the VQA-RAD directory: data.root, else $MMPEFT_VQA_RAD_ROOT, else ../shared/vqa_rad."""
    path = vqa_rad_dir(root)
    if not (path / "trainset.json").is_file():
        raise DataError(
            f"VQA-RAD not found at {path.resolve()} (no trainset.json). VQA-RAD (Lau et al. 2018, CC0) comes from "
            "OSF project 89kps (https://osf.io/89kps/); put images/, trainset.json and testset.json in one directory "
            f"and set data.root=<that directory> in the recipe or on the command line, or ${VQA_RAD_ENV}."
        )
    return path


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
