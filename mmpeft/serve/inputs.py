"""A request's inputs, read as untrusted: multipart and JSON fields, images and clips decoded
under bounds (pixels, parts, decoded bytes in flight), text that a tokenizer can take. Each
problem is a :class:`ClientError` naming the field, answered before the request joins a batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..data.audio import BadAudio, audio_info, read_audio
from ..data.video import BadVideo, read_video


class ClientError(Exception):
    """A request the client can fix: a status code and a message naming the field."""

    def __init__(self, status: int, message: str, field: str = "", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


class DecodeBudget:
    """Bytes of decoded images in flight, all requests together: a small file can decode to
    gigabytes (a 9400x9400 PNG of 343 KB is 350 MB of RGBA), so the pixel cap of one image
    does not bound eight at once. A request that does not fit now is shed with 503 and
    Retry-After instead of growing the process; one that could never fit gets 413."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextmanager
    def hold(self, cost: int, field: str):
        if cost > self.limit:
            raise ClientError(413, f"{field} decodes to {cost:,} bytes, more than the {self.limit:,} this server "
                                   "decodes at once", field)
        if self.used + cost > self.limit:
            raise ClientError(503, "the server is decoding as many images as it holds at once; retry in a second",
                              field, headers={"Retry-After": "1"})
        self.used += cost  # the event loop is one thread: no lock needed
        try:
            yield
        finally:
            self.used -= cost


def decoded_cost(data) -> int:
    """Bytes an image will take decoded, and once more as RGB, from its header alone (0 when
    it is no image, which decoding then refuses with its own message)."""
    if not isinstance(data, bytes) or not data:
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height * (len(image.getbands()) + 3)
    except Exception:  # noqa: BLE001 - decode_image names the problem
        return 0


MAX_PARTS = 64
MAX_CLIP_SECONDS = 600.0


def valid_text(text: str, field: str) -> str:
    """``text`` if it can be encoded as UTF-8 (a JSON string may hold a lone surrogate, which
    no tokenizer takes): a client's mistake, answered before its request joins a batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(422, f"{field} is not valid text (it holds a lone surrogate, \\ud800-\\udfff)", field) from None
    return text


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Form fields of a multipart body, in memory (python-multipart's parser, no temp files)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise ClientError(400, "multipart body without a boundary of 1 to 70 characters")
    fields: dict[str, bytes] = {}
    state = {"name": None, "data": [], "header": b"", "value": b""}

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        if state["header"].lower() == b"content-disposition":
            _, options = parse_options_header(state["value"])
            state["name"] = options.get(b"name", b"").decode("utf-8", "replace")
        state["header"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        if state["name"]:
            fields[state["name"]] = b"".join(state["data"])
        state["name"], state["data"] = None, []
        state["parts"] = state.get("parts", 0) + 1
        if state["parts"] > MAX_PARTS:
            raise ClientError(413, f"multipart body of more than {MAX_PARTS} parts; a request has a few fields")

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_part_data": on_part_data,
                                        "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        raise ClientError(400, f"malformed multipart body ({type(exc).__name__})") from None
    return fields


def decode_image(data: bytes, max_pixels: int, field: str = "image"):
    if not data:
        raise ClientError(422, f"{field} is empty", field)
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ClientError(413, f"{field} has {image.width}x{image.height} = {image.width * image.height:,} pixels, more "
                                   f"than the {max_pixels:,} allowed", field)
        image.load()  # decodes now: a truncated file fails here, not in the model
        return image
    except ClientError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ClientError(413, f"{field} has more than {max_pixels:,} pixels (a decompression bomb?)", field) from None
    except UnidentifiedImageError:
        raise ClientError(415, f"{field} is not an image file PIL can read (PNG, JPEG, ...)", field) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ClientError(400, f"{field} is truncated or damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          field) from None


def _checked_upload(data: bytes, field: str, suffix: str, check, bad: type[Exception]) -> str:
    """``data`` written to a private temporary file (the caller removes it once answered) and
    decoded by ``check(path)`` the way training data is, so that a damaged file is this
    request's error (415, its ``bad`` message), not its batch's."""
    if not data:
        raise ClientError(422, f"{field} is empty", field)
    handle, path = tempfile.mkstemp(prefix="mmpeft-upload-", suffix=suffix)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    try:
        check(path)
    except bad as exc:
        Path(path).unlink(missing_ok=True)
        raise ClientError(415, f"{field} is {exc}", field) from None
    return path


def audio_file(data: bytes, field: str = "audio") -> str:
    """An uploaded clip, checked as training data is (header first, regular file, bounded
    decoding; a clip of NaN fails here)."""
    def check(path: str) -> None:
        rate, _, _ = audio_info(path)
        read_audio(path, rate, MAX_CLIP_SECONDS)

    return _checked_upload(data, field, ".audio", check, BadAudio)


def video_file(data: bytes, readers, field: str = "video") -> str:
    """An uploaded video, decoded as each of the bundle's video encoders reads it
    (``readers``: their ``(frames, fps, max_seconds)``; bounded as training data is)."""
    def check(path: str) -> None:
        for frames, fps, seconds in readers:
            read_video(path, frames, seconds, fps)

    return _checked_upload(data, field, ".video", check, BadVideo)


def from_base64(value, what: str, field: str) -> bytes:
    """The bytes of a JSON body's base64 text ``value`` (``what`` names it in the error)."""
    if not isinstance(value, str):
        raise ClientError(422, f"{what} must be base64 text", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{what} is not valid base64", field) from None


def own_input(fields: dict, name: str, modality: str, settings):
    """The input of encoder ``name``, which reads a column of its own: a form field
    ``input.<name>`` (a file, or the text) or ``inputs.<name>`` of a JSON body (base64, or the
    text); an image decoded, a clip written to a private temp file (the caller removes it)."""
    key, raw = f"input.{name}", fields.get(f"input.{name}")
    if raw is None:
        raise ClientError(422, f"{key} is required: encoder {name!r} reads {modality} of its own (a form field {key}, or "
                               f"inputs.{name} in a JSON body)", key)
    if modality == "text":
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not isinstance(text, str) or not text.strip():
            raise ClientError(422, f"{key} must be text, not empty", key)
        valid_text(text, key)
        if len(text) > settings.max_question_chars:
            raise ClientError(422, f"{key} has {len(text):,} characters, more than the {settings.max_question_chars:,} "
                                   "allowed", key)
        return text
    if not isinstance(raw, bytes):  # JSON: base64 text
        raw = from_base64(raw, f"inputs.{name}", key)
    if modality == "image":
        return decode_image(raw, settings.max_pixels, key)
    return audio_file(raw, key)
