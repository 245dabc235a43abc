"""The HTTP API and the web page (FastAPI, served by uvicorn).

Endpoints: ``GET /health``, ``GET /bundles``, ``POST /predict`` (multipart form fields
``image``, ``question``, ``bundle``, ``top_k``; or a JSON body with ``image_base64``), the
OpenAPI schema at ``/openapi.json`` (docs at ``/docs``), and the page at ``/``.

Every client mistake is a 4xx with ``{"error": ..., "field": ...}``, never a 500: a missing
field, an unknown bundle, a file that is not an image or is truncated, an image above the
pixel limit, an upload above the size limit, an empty question, a ``top_k`` out of range.
Requests are read into memory with a hard size limit (nothing is spooled to disk) and
name no path: the server reads and writes no file on a request's behalf.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..data.audio import BadAudio, audio_info
from ..data.checks import MAX_IMAGE_PIXELS
from ..version import __version__
from .batching import Batcher
from .openai_api import OpenAIError, add_openai_routes

PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeSettings:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    max_question_chars: int = 2000
    max_top_k: int = 50
    log: Optional[Callable[[str], None]] = None  # one line per request (method, path, status, ms, bundle); None: quiet


class ClientError(Exception):
    """A request the client can fix: a status code and a message naming the field."""

    def __init__(self, status: int, message: str, field: str = ""):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Form fields of a multipart body, in memory (python-multipart's parser, no temp files)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError(400, "multipart body without a boundary")
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

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_part_data": on_part_data,
                                        "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        raise ClientError(400, f"malformed multipart body ({type(exc).__name__})") from None
    return fields


def _decode_image(data: bytes, max_pixels: int, field: str = "image"):
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


def _audio_file(data: bytes, field: str = "audio") -> str:
    """An uploaded clip, written to a private temporary file (removed once answered) and
    checked the way training data is (header first, regular file, bounded decoding)."""
    if not data:
        raise ClientError(422, f"{field} is empty", field)
    handle, path = tempfile.mkstemp(prefix="mmpeft-upload-", suffix=".audio")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    try:
        audio_info(path)
    except BadAudio as exc:
        Path(path).unlink(missing_ok=True)
        raise ClientError(415, f"{field} is {exc}", field) from None
    return path


def _from_base64(value, what: str, field: str) -> bytes:
    """The bytes of a JSON body's base64 text ``value`` (``what`` names it in the error)."""
    if not isinstance(value, str):
        raise ClientError(422, f"{what} must be base64 text", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{what} is not valid base64", field) from None


def _own_input(fields: dict, name: str, modality: str, settings: ServeSettings):
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
        if len(text) > settings.max_question_chars:
            raise ClientError(422, f"{key} has {len(text):,} characters, more than the {settings.max_question_chars:,} "
                                   "allowed", key)
        return text
    if not isinstance(raw, bytes):  # JSON: base64 text
        raw = _from_base64(raw, f"inputs.{name}", key)
    if modality == "image":
        return _decode_image(raw, settings.max_pixels, key)
    return _audio_file(raw, key)


def create_app(pool, settings: ServeSettings | None = None) -> FastAPI:
    """The app answering with ``pool`` (an :class:`~mmpeft.serve.pool.AdapterPool`)."""
    settings = settings or ServeSettings()
    batcher = Batcher(pool, settings.max_batch, settings.max_wait_ms)

    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # requests in flight are answered before the workers stop

    app = FastAPI(title="mmpeft serve", version=__version__, lifespan=lifespan,
                  description="Answers questions about images with mmpeft bundles.")
    app.state.batcher, app.state.pool, app.state.settings = batcher, pool, settings
    weights = pool.weight_bytes()

    @app.middleware("http")
    async def request_log(request: Request, call_next):  # as uvicorn's access log, with the time and the bundle
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if settings.log is not None:
                bundle = getattr(request.state, "bundle", None)
                settings.log(f"{request.method} {request.url.path} {status} {1000 * (time.perf_counter() - start):.0f} ms"
                             + (f" bundle {bundle}" if bundle else ""))

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug or a failed forward: said, not a stack trace
        return JSONResponse({"error": f"the server failed to answer: {type(exc).__name__}: {str(exc)[:300]}", "field": ""},
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "bundles": len(pool.bundles), "requests": batcher.requests, "batches": batcher.batches,
                "weights": weights}

    @app.get("/bundles")
    async def bundles():
        return {"bundles": [b.summary for b in pool.bundles.values()]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    openapi = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "question"], "properties": {
            "image": {"type": "string", "format": "binary"}, "question": {"type": "string"},
            "audio": {"type": "string", "format": "binary", "description": "bundles with an audio encoder"},
            "bundle": {"type": "string", "description": "a name from /bundles; optional when one bundle is served"},
            "top_k": {"type": "integer", "minimum": 1, "default": 3}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64", "question"], "properties": {
            "image_base64": {"type": "string", "format": "byte"}, "question": {"type": "string"},
            "audio_base64": {"type": "string", "format": "byte", "description": "bundles with an audio encoder"},
            "bundle": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "default": 3}}}}}}}

    @app.post("/predict", openapi_extra=openapi)
    async def predict(request: Request):
        start = time.perf_counter()
        fields = await _read_request(request, settings)
        name = fields.get("bundle") or ""
        if not name:
            if len(pool.bundles) != 1:
                raise ClientError(422, f"bundle is required when several are served (one of: {', '.join(pool.bundles)})", "bundle")
            name = next(iter(pool.bundles))
        if name not in pool.bundles:
            raise ClientError(404, f"no bundle named {name!r} (served: {', '.join(pool.bundles)})", "bundle")
        served = pool.bundles[name]
        request.state.bundle = name
        reads = {enc.modality for n, enc in served.model.encoders.items() if n not in served.own}
        reads |= {m for task in served.tasks.values() for m in task.reads()}  # a prompt filled from the question
        question = fields.get("question")
        if "text" in reads and (not isinstance(question, str) or not question.strip()):
            raise ClientError(422, "question is required and must not be empty", "question")
        if isinstance(question, str) and len(question) > settings.max_question_chars:
            raise ClientError(422, f"question has {len(question):,} characters, more than the {settings.max_question_chars:,} allowed", "question")
        limit = min(settings.max_top_k, len(served.vocab)) if served.top_k_answers else settings.max_top_k
        top_k = fields.get("top_k", 3)
        try:
            top_k = int(top_k) if not isinstance(top_k, bool) else None
        except (TypeError, ValueError):
            top_k = None
        if top_k is None or not 1 <= top_k <= limit:
            raise ClientError(422, f"top_k must be an integer from 1 to {limit} (got {fields.get('top_k')!r})", "top_k")
        decoded, clip = None, None
        if "image" in reads:
            if fields.get("image") is None:
                raise ClientError(422, "image is required (a file field, or image_base64 in a JSON body)", "image")
            decoded = await asyncio.to_thread(_decode_image, fields["image"], settings.max_pixels)  # the loop keeps serving
        if "audio" in reads:
            if fields.get("audio") is None:
                raise ClientError(422, "audio is required for this bundle (a file field, or audio_base64 in a JSON body)", "audio")
            clip = await asyncio.to_thread(_audio_file, fields["audio"])
        own = {}
        try:
            unknown = sorted(k for k in fields if k.startswith("input.") and k[len("input."):] not in served.own)
            if unknown:
                raise ClientError(422, f"{unknown[0]}: no encoder of {name!r} reads an input of its own by that name "
                                       f"({'those are: ' + ', '.join(served.own) if served.own else 'it has none'})", unknown[0])
            for enc_name, (modality, _) in served.own.items():
                own[enc_name] = await asyncio.to_thread(_own_input, fields, enc_name, modality, settings)
            answer = await batcher.submit(name, decoded, question if "text" in reads else "", top_k, clip, own)
        finally:
            for path in [clip] + [v for n, v in own.items() if served.own[n][0] == "audio"]:
                if path is not None:
                    Path(path).unlink(missing_ok=True)
        reply = {"answer": answer["answer"], "top_k": answer["top_k"]} if served.top_k_answers else \
            {"result": {k: v for k, v in answer.items() if k != "batch_size"}}  # each kind's own answer, as predict prints it
        return {"bundle": name, "version": served.version, "question": question, **reply, "batch_size": answer["batch_size"],
                "seconds": round(time.perf_counter() - start, 4)}

    async def read_json(request: Request) -> dict:
        try:
            body = await _read_bytes(request, settings)
        except ClientError as exc:
            raise OpenAIError(exc.status, exc.message) from None
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise OpenAIError(415, "send application/json")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise OpenAIError(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "body must be a JSON object")
        return data

    def decode(data: bytes, max_pixels: int, field: str):
        try:
            return _decode_image(data, max_pixels, field)
        except ClientError as exc:
            raise OpenAIError(exc.status, exc.message, "messages") from None

    add_openai_routes(app, pool, settings, read_json, decode)
    return app


async def _read_bytes(request: Request, settings: ServeSettings) -> bytes:
    """The request's body, read into memory with a hard size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise ClientError(413, f"request of {int(declared):,} bytes, more than the {settings.max_upload_bytes:,} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_upload_bytes:
            raise ClientError(413, f"request of more than {settings.max_upload_bytes:,} bytes, the most allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_request(request: Request, settings: ServeSettings) -> dict:
    """The request's fields, the body read into memory with a hard size limit."""
    body = await _read_bytes(request, settings)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        raw = _parse_multipart(body, content_type)
        files = [k for k in raw if k in ("image", "audio") or k.startswith("input.")]  # kept as bytes
        fields = {k: v.decode("utf-8", "replace") for k, v in raw.items() if k not in files}
        fields.update({k: raw[k] for k in files})
        return fields
    if content_type.startswith("application/x-www-form-urlencoded"):  # a form without a file
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20)
        return {k: v for k, v in pairs if k in ("bundle", "question", "top_k")}
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ClientError(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ClientError(400, "body must be a JSON object with image_base64 and question")
        fields = {k: data[k] for k in ("bundle", "question", "top_k") if k in data}
        inputs = data.get("inputs", {})  # encoders reading an input of their own: {name: base64 or text}
        if not isinstance(inputs, dict) or len(inputs) > 64:
            raise ClientError(422, "inputs must be an object {encoder: base64 or text}", "inputs")
        fields.update({f"input.{k}": v for k, v in inputs.items()})
        if "bundle" in fields and not isinstance(fields["bundle"], str):
            raise ClientError(422, "bundle must be a name (text)", "bundle")
        for kind in ("image", "audio"):
            key = f"{kind}_base64"
            if key in data:
                fields[kind] = _from_base64(data[key], key, kind)
        return fields
    raise ClientError(415, f"send multipart/form-data or application/json (got {content_type or 'no content type'!r})")
