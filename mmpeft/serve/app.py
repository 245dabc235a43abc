"""The HTTP API and the web page (FastAPI, served by uvicorn).

Endpoints: ``GET /health``, ``GET /bundles``, ``POST /predict`` (multipart form fields
``image``, ``question``, ``bundle``, ``top_k``; or a JSON body with ``image_base64``), the
OpenAPI schema at ``/openapi.json`` (a plain list of endpoints at ``/docs``, with no script
from a CDN), and the page at ``/``.

Every client mistake is a 4xx with ``{"error": ..., "field": ...}``, never a 500: a missing
field, an unknown bundle, a file that is not an image or is truncated, an image above the
pixel limit, an upload above the size limit, an empty question, a ``top_k`` out of range
(or infinite), text that is no text (a lone surrogate), a clip of NaN samples, a body not in
UTF-8, a form of too many fields or parts. Images decoded at once are bounded in bytes
(503 with Retry-After beyond), and a batch that fails is answered again one request at a
time, so one request's failure stays its own.
Requests are read into memory with a hard size limit (nothing is spooled to disk) and
name no path: the server reads and writes no file on a request's behalf.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..data.checks import MAX_IMAGE_PIXELS
from ..version import __version__
from .batching import Batcher, ChatBatcher
from .inputs import (ClientError, DecodeBudget, audio_file, video_file, decode_image, from_base64, own_input, parse_multipart,
                     decoded_cost, valid_text)
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
    max_decoded_bytes: int = 1024**3  # images decoded at once, all requests together; beyond it: 503 + Retry-After
    log: Optional[Callable[[str], None]] = None  # one line per request (method, path, status, ms, bundle); None: quiet


def create_app(pool, settings: ServeSettings | None = None) -> FastAPI:
    """The app answering with ``pool`` (an :class:`~mmpeft.serve.pool.AdapterPool`)."""
    settings = settings or ServeSettings()
    batcher = Batcher(pool, settings.max_batch, settings.max_wait_ms)
    chat_batcher = ChatBatcher(pool, settings.max_batch, settings.max_wait_ms)
    budget = DecodeBudget(settings.max_decoded_bytes)

    async def lifespan(app):
        batcher.start()
        chat_batcher.start(pool.generating())
        yield
        await batcher.stop()  # requests in flight are answered before the workers stop
        await chat_batcher.stop()

    app = FastAPI(title="mmpeft serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Answers questions about images with mmpeft bundles.")
    app.state.batcher, app.state.pool, app.state.settings, app.state.budget = batcher, pool, settings, budget
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
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug or a failed forward: said, not a stack trace
        return JSONResponse({"error": f"the server failed to answer: {type(exc).__name__}: {str(exc)[:300]}", "field": ""},
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "bundles": len(pool.bundles), "requests": batcher.requests, "batches": batcher.batches,
                "chat_requests": chat_batcher.requests, "chat_batches": chat_batcher.batches, "weights": weights}

    @app.get("/bundles")
    async def bundles():
        return {"bundles": [b.summary for b in pool.bundles.values()]}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():  # FastAPI's own /docs loads its script from a CDN: offline it breaks, online it tells the CDN
        rows = "".join(f"<tr><td>{m.upper()}</td><td><code>{html.escape(path)}</code></td>"
                       f"<td>{html.escape(op.get('summary') or op.get('description') or '')}</td></tr>"
                       for path, ops in app.openapi()["paths"].items() for m, op in ops.items())
        return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>mmpeft serve API</title>"
                            f"<h1>mmpeft serve {html.escape(__version__)}</h1><p>The schema: "
                            f"<a href=/openapi.json>/openapi.json</a></p><table>{rows}</table>")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    openapi = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "question"], "properties": {
            "image": {"type": "string", "format": "binary"}, "question": {"type": "string", "minLength": 1, "maxLength": 2000},
            "audio": {"type": "string", "format": "binary", "description": "bundles with an audio encoder"},
            "video": {"type": "string", "format": "binary", "description": "bundles with a video encoder"},
            "bundle": {"type": "string", "description": "a name from /bundles; optional when one bundle is served"},
            "top_k": {"type": "integer", "minimum": 1, "default": 3}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64", "question"], "properties": {
            "image_base64": {"type": "string", "format": "byte"},
            "question": {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": "\\S"},
            "audio_base64": {"type": "string", "format": "byte", "description": "bundles with an audio encoder"},
            "video_base64": {"type": "string", "format": "byte", "description": "bundles with a video encoder"},
            "bundle": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "default": 3}}}}}}}
    error = {"content": {"application/json": {"schema": {"type": "object", "required": ["error", "field"], "properties": {
        "error": {"type": "string"}, "field": {"type": "string"}}}}}}
    openapi["responses"] = {str(code): {"description": why, **error} for code, why in (
        (400, "a body that cannot be read: not JSON, not UTF-8, bad base64, a damaged image"),
        (404, "no bundle of that name"), (413, "too large: the body, an image's pixels, its decoded bytes, fields or parts"),
        (415, "another content type, or a file that is not an image / audio / video"),
        (422, "a field missing, empty or out of range"), (503, "images in flight fill the decode budget: retry (Retry-After)"))}

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
            raise ClientError(404, f"no bundle named {name[:100]!r} (served: {', '.join(pool.bundles)})", "bundle")
        served = pool.bundles[name]
        request.state.bundle = name
        reads = {enc.modality for n, enc in served.model.encoders.items() if n not in served.own}
        reads |= {m for task in served.tasks.values() for m in task.reads()}  # a prompt filled from the question
        question = fields.get("question")
        if "text" in reads and (not isinstance(question, str) or not question.strip()):
            raise ClientError(422, "question is required and must not be empty", "question")
        if isinstance(question, str):
            valid_text(question, "question")
        if isinstance(question, str) and len(question) > settings.max_question_chars:
            raise ClientError(422, f"question has {len(question):,} characters, more than the {settings.max_question_chars:,} allowed", "question")
        limit = min(settings.max_top_k, len(served.vocab)) if served.top_k_answers else settings.max_top_k
        top_k = fields.get("top_k", 3)
        try:
            top_k = int(top_k) if not isinstance(top_k, bool) else None
        except (TypeError, ValueError, OverflowError):  # Infinity, 1e400
            top_k = None
        if top_k is None or not 1 <= top_k <= limit:
            raise ClientError(422, f"top_k must be an integer from 1 to {limit} (got {str(fields.get('top_k'))[:40]!r})", "top_k")
        cost = decoded_cost(fields.get("image")) if "image" in reads else 0
        cost += sum(decoded_cost(fields.get(f"input.{n}")) for n, (m, _) in served.own.items() if m == "image")
        with budget.hold(cost, "image"):
            decoded, clip = None, None
            if "image" in reads:
                if fields.get("image") is None:
                    raise ClientError(422, "image is required (a file field, or image_base64 in a JSON body)", "image")
                decoded = await asyncio.to_thread(decode_image, fields["image"], settings.max_pixels)  # the loop keeps serving
            if "audio" in reads:
                if fields.get("audio") is None:
                    raise ClientError(422, "audio is required for this bundle (a file field, or audio_base64 in a JSON body)", "audio")
                clip = await asyncio.to_thread(audio_file, fields["audio"])
            footage = None
            if "video" in reads:
                if fields.get("video") is None:
                    raise ClientError(422, "video is required for this bundle (a file field, or video_base64 in a JSON body)", "video")
                footage = await asyncio.to_thread(video_file, fields["video"], served.video_readers)
            own = {}
            try:
                unknown = sorted(k for k in fields if k.startswith("input.") and k[len("input."):] not in served.own)
                if unknown:
                    raise ClientError(422, f"{unknown[0]}: no encoder of {name!r} reads an input of its own by that name "
                                           f"({'those are: ' + ', '.join(served.own) if served.own else 'it has none'})", unknown[0])
                for enc_name, (modality, _) in served.own.items():
                    own[enc_name] = await asyncio.to_thread(own_input, fields, enc_name, modality, settings)
                answer = await batcher.submit(name, decoded, question if "text" in reads else "", top_k, clip, own, footage)
            finally:
                for path in [clip, footage] + [v for n, v in own.items() if served.own[n][0] == "audio"]:
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
            data = json.loads(body.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise OpenAIError(400, "body is not valid JSON in UTF-8") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "body must be a JSON object")
        return data

    def decode(data: bytes, max_pixels: int, field: str):
        try:
            return decode_image(data, max_pixels, field)
        except ClientError as exc:
            raise OpenAIError(exc.status, exc.message, "messages") from None

    add_openai_routes(app, pool, settings, read_json, decode, chat_batcher)
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
        raw = await asyncio.to_thread(parse_multipart, body, content_type)  # the loop keeps serving meanwhile
        files = [k for k in raw if k in ("image", "audio", "video") or k.startswith("input.")]  # kept as bytes
        fields = {k: v.decode("utf-8", "replace") for k, v in raw.items() if k not in files}
        fields.update({k: raw[k] for k in files})
        return fields
    if content_type.startswith("application/x-www-form-urlencoded"):  # a form without a file
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20)
        except ValueError:
            raise ClientError(413, "a form of more than 20 fields; a request has a few") from None
        return {k: v for k, v in pairs if k in ("bundle", "question", "top_k")}
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body.decode("utf-8"))  # JSON is UTF-8 (RFC 8259); json.loads of bytes would guess UTF-16
        except UnicodeDecodeError:
            raise ClientError(400, "body is not UTF-8; send JSON encoded as UTF-8") from None
        except (json.JSONDecodeError, RecursionError):
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
        for kind in ("image", "audio", "video"):
            key = f"{kind}_base64"
            if key in data:
                fields[kind] = from_base64(data[key], key, kind)
        return fields
    raise ClientError(415, f"send multipart/form-data or application/json (got {content_type or 'no content type'!r})")
