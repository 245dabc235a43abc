"""An OpenAI-compatible chat API for generating bundles: ``GET /v1/models`` and ``POST
/v1/chat/completions`` (``messages`` whose content is text or parts of ``text`` and
``image_url``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n``, ``stream`` as
server-sent events with ``stream_options.include_usage``, ``usage`` counts), so that client
code written for the OpenAI API talks to ``mmpeft serve`` unchanged. Errors come in OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, a 4xx for every client mistake. Images come as ``data:`` URLs
(base64); the server never fetches an http URL. Requests that arrive together and ask for
the same decoding settings are generated as one batch (:class:`~mmpeft.serve.batching.ChatBatcher`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MAX_MESSAGES = 64


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str = "", code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number(body: dict, key: str, kind, low, high, default=None):
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not float(value).is_integer() \
            or not low <= value <= high:
        raise OpenAIError(400, f"{key} must be {'an integer' if kind is int else 'a number'} from {low} to {high} "
                               f"(got {value!r})", key)
    return kind(value)


def _image(url, decode, max_pixels: int):
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise OpenAIError(400, "image_url.url must be a data: URL with base64 content (this server fetches no http URL)",
                          "messages")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, "image_url.url is not valid base64", "messages") from None
    return decode(data, max_pixels, "image_url")


def parse_messages(messages, max_chars: int) -> tuple[list[dict], str, list]:
    """``(history, the last user text, its image URLs)`` of a chat request."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise OpenAIError(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{i}] must have role system, user or assistant", "messages")
        content, text, images = m.get("content"), [], []
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise OpenAIError(400, f"messages[{i}].content must be text or a list of parts", "messages")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(part["image_url"].get("url"))
            else:
                raise OpenAIError(400, f"messages[{i}]: a content part is text or image_url", "messages")
        joined = "\n".join(text)
        if len(joined) > max_chars:
            raise OpenAIError(400, f"messages[{i}] has {len(joined):,} characters, more than the {max_chars:,} allowed",
                              "messages")
        turns.append({"role": m["role"], "content": joined, "images": images})
    if turns[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must be the user's", "messages")
    images = [u for t in turns for u in t["images"]]
    if len(images) > 1:
        raise OpenAIError(400, "one image per conversation (the bundle's image encoder reads one)", "messages")
    history = [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
    return history, turns[-1]["content"], images


def add_openai_routes(app: FastAPI, pool, settings, read_body, decode_image, batcher) -> None:
    """The ``/v1`` routes on ``app`` (``read_body(request)``: the bounded JSON body; ``batcher``: a
    :class:`~mmpeft.serve.batching.ChatBatcher`, started with the app)."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param or None,
                                       "code": exc.code}}, status_code=exc.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "mmpeft"}
                                           for n in pool.generating()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        name = body.get("model")
        if not isinstance(name, str) or name not in pool.generating():
            raise OpenAIError(404, f"model {str(name)[:100]!r} is not served here (generating bundles: "
                                   f"{', '.join(pool.generating()) or 'none'})", "model", "model_not_found")
        request.state.bundle = name
        history, text, urls = parse_messages(body.get("messages"), settings.max_question_chars)
        if _number(body, "n", int, 1, 128, 1) != 1:
            raise OpenAIError(400, "n: one choice per request", "n")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop)):
            raise OpenAIError(400, "stop must be a string or a list of up to 4 strings", "stop")
        options = {"max_new_tokens": _number(body, "max_tokens", int, 1, 4096) or _number(body, "max_completion_tokens", int, 1, 4096),
                   "temperature": _number(body, "temperature", float, 0.0, 2.0), "top_p": _number(body, "top_p", float, 1e-6, 1.0),
                   "stop": stop}
        if options["temperature"] == 0.0:  # OpenAI's temperature 0: the likeliest token, greedy
            options.update(temperature=None, do_sample=False)
        image = await asyncio.to_thread(_image, urls[0], decode_image, settings.max_pixels) if urls else None
        served = pool.bundles[name]
        if any(e.modality == "image" for e in served.model.encoders.values()) and image is None:
            raise OpenAIError(400, f"model {name!r} reads an image: add an image_url part to the user message", "messages")
        options = {k: v for k, v in options.items() if v is not None}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def reply(choice: dict, **extra) -> dict:
            return {"id": ident, "object": extra.pop("object", "chat.completion"), "created": created, "model": name,
                    "choices": [choice], **extra}

        async def run(on_text=None) -> dict:
            try:
                return await batcher.submit(name, (image, text, history), options, on_text)
            except ValueError as exc:  # a decoding setting the task refuses (UsageError is one)
                raise OpenAIError(400, str(exc)) from None

        def usage(out: dict) -> dict:
            return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                    "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}

        if not body.get("stream"):
            out = await run()
            return reply({"index": 0, "message": {"role": "assistant", "content": out["text"]},
                          "finish_reason": out["finish_reason"]}, usage=usage(out))
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise OpenAIError(400, "stream_options must be an object", "stream_options")
        include_usage = stream_options.get("include_usage") is True

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        async def events():
            chunk = {"object": "chat.completion.chunk"}
            yield f"data: {json.dumps(reply({'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}, **chunk))}\n\n"
            job = asyncio.ensure_future(run(lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece)))
            job.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece the generation sent
            while (piece := await queue.get()) is not None:
                yield f"data: {json.dumps(reply({'index': 0, 'delta': {'content': piece}, 'finish_reason': None}, **chunk))}\n\n"
            try:
                out = job.result()
                yield f"data: {json.dumps(reply({'index': 0, 'delta': {}, 'finish_reason': out['finish_reason']}, **chunk))}\n\n"
                if include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices, the counts
                    yield f"data: {json.dumps({**reply({}, **chunk), 'choices': [], 'usage': usage(out)})}\n\n"
            except Exception as exc:  # noqa: BLE001 - said in the stream: its 200 header is already sent
                message = exc.message if isinstance(exc, OpenAIError) else f"{type(exc).__name__}: {str(exc)[:300]}"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
