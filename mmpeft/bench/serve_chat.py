"""``mmpeft bench serve --chat BUNDLE``: the generative rows of the serve benchmark, against
servers this command starts on 127.0.0.1 (and stops) itself.

1. Load: streamed chat completions (``stream_options.include_usage``) from N concurrent
   clients (1, 4, 16), with chat batching on and off, in one run: generated tokens per
   second over the wall time, time to the first piece of text (TTFT), whole-reply latency.
2. Soak: requests mixing valid ones (plain and streamed) with client mistakes (a damaged
   image, an http image URL, an unknown model, max_tokens 0, two choices, a bad role, a
   message over the size limit, a body that is not JSON), 8 clients at a time; every valid
   reply compared with ``predict``'s greedy text; 5xx counted; resident memory after the
   first hundred requests and at the end.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from pathlib import Path

from ..inference import Predictor
from .serve import Server, load_inputs, quantile_ms, run_clients


def _messages(image: bytes, prompt: str) -> list:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]


def _stream(client, url: str, body: dict) -> dict:
    """One streamed completion: its status, text, first-piece and total seconds, token count."""
    start, first, text, tokens = time.perf_counter(), None, [], 0
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}},
                       timeout=600) as reply:
        if reply.status_code != 200:
            reply.read()
            return {"status": reply.status_code, "text": "", "ttft": None, "seconds": time.perf_counter() - start, "tokens": 0}
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"status": 500, "text": "", "ttft": None, "seconds": time.perf_counter() - start, "tokens": 0}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - start
                    text.append(piece)
    return {"status": 200, "text": "".join(text), "ttft": first, "seconds": time.perf_counter() - start, "tokens": tokens}


def chat_load(server: Server, bundle: str, inputs: list, clients: int, requests: int) -> dict:
    """``requests`` streamed completions from ``clients`` threads: tokens/s, TTFT, latency."""
    def ask(client, rng):
        image, prompt = inputs[rng.randrange(len(inputs))]
        return _stream(client, server.url, {"model": bundle, "messages": _messages(image, prompt)})

    results, wall = run_clients(clients, requests, ask)
    done = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in done)
    first = [r["ttft"] for r in done if r["ttft"] is not None]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(done), "seconds": round(wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "replies_per_s": round(len(done) / wall, 2),
            "ttft_p50_ms": quantile_ms(first, 50), "ttft_p95_ms": quantile_ms(first, 95),
            "latency_p50_ms": quantile_ms([r["seconds"] for r in done], 50),
            "latency_p95_ms": quantile_ms([r["seconds"] for r in done], 95)}


MISTAKES = {  # a client mistake -> how it changes a valid request body (None: the body is not JSON)
    "damaged image": lambda b: {**b, "messages": _messages(b"plain text, not an image", "x")},
    "http image URL": lambda b: {**b, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]},
    "unknown model": lambda b: {**b, "model": "nope"},
    "max_tokens 0": lambda b: {**b, "max_tokens": 0},
    "two choices": lambda b: {**b, "n": 2},
    "bad role": lambda b: {**b, "messages": [{"role": "wizard", "content": "x"}]},
    "over-long message": lambda b: {**b, "messages": [{"role": "user", "content": "x" * 50_000}]},
    "not JSON": None,
}


def chat_soak(server: Server, bundle: str, path: str, images: list[Path], prompts: list[str], requests: int,
              seed: int = 0) -> dict:
    import httpx

    predictor = Predictor(path)
    expected = {(str(i), p): predictor.predict([str(i)], [p])[0]["text"] for i in images for p in prompts}
    rng = random.Random(seed)
    kinds = ["plain", "streamed", *MISTAKES]
    plan = [(rng.choices(kinds, [40, 35] + [25 / len(MISTAKES)] * len(MISTAKES))[0], rng.choice(images), rng.choice(prompts))
            for _ in range(requests)]
    blobs = {str(i): Path(i).read_bytes() for i in images}
    outcome = {"valid": 0, "valid_equal_to_predict": 0, "invalid": 0, "invalid_4xx": 0, "5xx": 0}
    memory, counter, lock = {}, [0], threading.Lock()
    early = min(100, max(1, requests // 10))

    def worker(part: list):
        with httpx.Client() as client:
            for kind, image, prompt in part:
                body = {"model": bundle, "messages": _messages(blobs[str(image)], prompt)}
                if kind == "streamed":
                    out = _stream(client, server.url, body)
                    status, text = out["status"], out["text"]
                elif kind == "plain" or MISTAKES[kind] is not None:
                    reply = client.post(server.url + "/v1/chat/completions", json=body if kind == "plain" else MISTAKES[kind](body),
                                        timeout=600)
                    status = reply.status_code
                    text = reply.json()["choices"][0]["message"]["content"] if status == 200 else None
                else:
                    reply = client.post(server.url + "/v1/chat/completions", content=b"{not json",
                                        headers={"content-type": "application/json"}, timeout=600)
                    status, text = reply.status_code, None
                with lock:
                    counter[0] += 1
                    if counter[0] == early:
                        memory["early_mib"] = server.rss()
                    outcome["5xx"] += status >= 500
                    if kind in ("plain", "streamed"):
                        outcome["valid"] += 1
                        outcome["valid_equal_to_predict"] += status == 200 and text == expected[(str(image), prompt)]
                    else:
                        outcome["invalid"] += 1
                        outcome["invalid_4xx"] += 400 <= status < 500

    threads = [threading.Thread(target=worker, args=(plan[i::8],)) for i in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    memory["end_mib"] = server.rss()
    memory["growth_pct"] = round(100 * (memory["end_mib"] - memory["early_mib"]) / memory["early_mib"], 2)
    return {"requests": requests, "memory_read_after": early, "seconds": round(time.perf_counter() - start, 1), **outcome,
            **memory}


def run_chat(bundle: str, images: list[str], prompts: list[str], clients, requests: int, soak: int,
             max_wait_ms: float = 10.0) -> dict:
    """The chat rows: load with batching on and off, then the soak (on the batching server)."""
    name = Path(bundle).name
    inputs = load_inputs(images, prompts)
    result = {"bundle": bundle, "images": len(images), "prompts": prompts,
              "settings": {"requests_per_level": requests, "max_batch": 16, "max_wait_ms": max_wait_ms}, "load": []}
    for label, args in (("batching off", ["--max-batch", "1"]),
                        ("batching on", ["--max-batch", "16", "--max-wait-ms", str(max_wait_ms)])):
        server = Server([bundle], *args)
        try:
            for n in clients:
                row = {"mode": label, **chat_load(server, name, inputs, n, requests)}
                print(json.dumps(row), flush=True)
                result["load"].append(row)
            if label == "batching on" and soak:
                result["soak"] = chat_soak(server, name, bundle, [Path(i) for i in images], prompts, soak)
                print(json.dumps({"soak": result["soak"]}), flush=True)
        finally:
            server.stop()
    by = {(r["mode"], r["clients"]): r for r in result["load"]}
    result["batching_gain"] = {n: round(by[("batching on", n)]["tokens_per_s"] / by[("batching off", n)]["tokens_per_s"], 2)
                               for n in clients}
    return result


def chat_markdown(r: dict, machine: dict) -> str:
    m = machine
    lines = [f"`mmpeft bench serve --chat {r['bundle']}` on {m['cuda'] or m['processor']} ({m['cpu_count']} cores, torch "
             f"{m['torch']}, {m['torch_threads']} torch threads in the server); server and clients on the same machine (127.0.0.1); {r['images']} images x "
             f"{len(r['prompts'])} prompts; {r['settings']['requests_per_level']} streamed requests per level; greedy, the "
             f"bundle's max_new_tokens.", "",
             "| batching | clients | requests | errors | tokens | tokens/s | replies/s | TTFT p50 ms | TTFT p95 ms | "
             "latency p50 ms | latency p95 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["load"]:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['errors']} | {row['tokens']} | "
                     f"{row['tokens_per_s']} | {row['replies_per_s']} | {row['ttft_p50_ms']} | {row['ttft_p95_ms']} | "
                     f"{row['latency_p50_ms']} | {row['latency_p95_ms']} |")
    lines += ["", "Batching gain (generated tokens/s with / without, same run): " +
              ", ".join(f"{n} clients {g}x" for n, g in r["batching_gain"].items()), ""]
    s = r.get("soak")
    if s:
        lines.append(f"Soak: {s['requests']} chat requests in {s['seconds']} s, 8 clients; {s['valid']} valid (plain and "
                     f"streamed), {s['valid_equal_to_predict']} of them equal to `predict`'s text; {s['invalid']} client "
                     f"mistakes, {s['invalid_4xx']} answered 4xx; 5xx: {s['5xx']}; memory {s['early_mib']:.1f} MiB after "
                     f"{s['memory_read_after']} requests, {s['end_mib']:.1f} MiB at the end ({s['growth_pct']:+.2f}%).")
    return "\n".join(lines) + "\n"
