"""Conversation manifests in the two formats the field's instruction-tuning tools read:

- LLaVA's (Liu et al. 2023): ``{"image": "x.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is shown?"}, {"from": "gpt", "value": "A chest X-ray."}, ...]}``;
- LLaMA-Factory's ShareGPT / OpenAI style: ``{"images": ["x.jpg"], "messages": [{"role": "user",
  "content": "<image>What is shown?"}, {"role": "assistant", "content": "..."}]}``.

A JSON list or JSONL file. Each assistant turn becomes one row: its image (relative to the
file), the user turn before it as the row's text (the prompt, ``<image>`` removed: the image
reaches the decoder as the prefix), the earlier turns as ``messages`` (the chat history a
``generate`` task puts before the prompt), the reply as the answer (normalised) and, as it
was written, as the column ``reply``. Sizes are bounded: the file, the records, the turns.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.answers import normalize_answer
from ..errors import DataError
from ..files import MAX_MANIFEST_BYTES, read_text
from .samples import Sample

MAX_TURNS = 512  # turns a record may hold
MAX_CHARS = 100_000  # characters of one turn
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _records(path: Path) -> list:
    text = read_text(path, DataError, max_bytes=MAX_MANIFEST_BYTES)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of conversation records (or a .jsonl file, one record a line)")
    return data


def _turns(record: dict, where: str) -> list[dict]:
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: no 'conversations' (LLaVA) or 'messages' (ShareGPT / OpenAI) list")
    if len(raw) > MAX_TURNS:
        raise DataError(f"{where}: {len(raw)} turns, more than {MAX_TURNS}")
    turns = []
    for k, turn in enumerate(raw, 1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}, turn {k}: expected an object with from/value or role/content")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise DataError(f"{where}, turn {k}: expected from: human / gpt (or role: user / assistant / system) and a "
                            "text value / content")
        if len(content) > MAX_CHARS:
            raise DataError(f"{where}, turn {k}: {len(content):,} characters, more than {MAX_CHARS:,}")
        turns.append({"role": role, "content": content.replace("<image>", "").strip()})
    return turns


def conversation_samples(path) -> list[Sample]:
    """One row per assistant turn of every record (errors name the file, record and turn)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check data.train / data.eval / data.test in the recipe)")
    samples = []
    for i, record in enumerate(_records(path), 1):
        where = f"{path}, record {i}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with an image and its conversation")
        images = record.get("images") or ([record["image"]] if record.get("image") else [])
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images) or len(images) > 1:
            raise DataError(f"{where}: 'image' must be one file path ('images': a list of one)")
        image = str((path.parent / images[0]).resolve()) if images else ""
        turns = _turns(record, where)
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            if k == 0 or turns[k - 1]["role"] != "user":
                raise DataError(f"{where}, turn {k + 1}: an assistant turn follows a user turn")
            if not turn["content"]:
                raise DataError(f"{where}, turn {k + 1}: the reply is empty")
            samples.append(Sample(image, turns[k - 1]["content"], normalize_answer(turn["content"]), {},
                                  f"{where}, turn {k + 1}", extra={"reply": turn["content"], "messages": turns[: k - 1]}))
    if not samples:
        raise DataError(f"{path}: no assistant turn to learn from")
    return samples
