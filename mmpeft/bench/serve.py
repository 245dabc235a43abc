"""``mmpeft bench serve``: load, memory and soak figures for ``mmpeft serve``, against servers
this command starts on 127.0.0.1 (and stops) itself.

1. Memory: the server's resident memory with one bundle and with several bundles over the
   same base (they share it; each adds only what it trained and its head).
2. Load: a bounded number of requests from N concurrent clients (1, 4, 16, 64), with
   dynamic batching on and off, in one run: throughput, p50 / p95 / p99 latency, errors.
3. Soak: thousands of requests mixing valid and invalid ones across two bundles; memory
   after the first hundred and at the end; every valid answer compared with ``predict``'s.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import MMPeftError, UsageError
from ..inference import Predictor
from .common import machine_info, output_folder, write_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``mmpeft serve`` in its own process on a free port of 127.0.0.1."""

    def __init__(self, bundles: list[str], *args: str):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # its log (a line per request) goes to a file: a pipe nobody reads fills after ~64 KB and stops the server
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "serve", *bundles, "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT, text=True)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.25)
        self.stop()
        self.log.seek(0)
        raise MMPeftError("the server did not start:\n" + self.log.read()[-20_000:])

    def rss(self) -> float:
        return _rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _ask(client, url: str, image: bytes, question: str, bundle: str, top_k: int = 3):
    return client.post(url + "/predict", files={"image": ("x.jpg", image)},
                       data={"question": question, "bundle": bundle, "top_k": str(top_k)}, timeout=120)


def run_clients(clients: int, requests: int, ask) -> tuple[list, float]:
    """``requests`` calls of ``ask(http_client, rng)`` shared out over ``clients`` threads, each
    with its own connection and a random draw seeded by its index: their results, wall seconds."""
    import httpx

    results, lock = [], threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def client_loop(index: int, count: int):
        rng = random.Random(index)
        with httpx.Client() as client:
            for _ in range(count):
                out = ask(client, rng)
                with lock:
                    results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i, n)) for i, n in enumerate(per_client) if n]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def quantile_ms(seconds: list, q: int) -> float:
    """The ``q``-th percentile of ``seconds``, in milliseconds (NaN of none)."""
    if not seconds:
        return float("nan")
    cuts = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else [seconds[0]] * 99
    return round(1000 * cuts[q - 1], 1)


def _load(server: Server, bundle: str, inputs: list, clients: int, requests: int) -> dict:
    """``requests`` requests from ``clients`` threads; latencies and errors."""
    def ask(client, rng):
        image, question = inputs[rng.randrange(len(inputs))]
        start = time.perf_counter()
        reply = _ask(client, server.url, image, question, bundle)
        return time.perf_counter() - start, reply.status_code != 200

    results, wall = run_clients(clients, requests, ask)
    latencies = [seconds for seconds, _ in results]
    return {"clients": clients, "requests": len(latencies), "errors": sum(failed for _, failed in results),
            "seconds": round(wall, 2), "throughput": round(len(latencies) / wall, 2), "p50_ms": quantile_ms(latencies, 50),
            "p95_ms": quantile_ms(latencies, 95), "p99_ms": quantile_ms(latencies, 99)}


def load_inputs(images: list[Path], questions: list[str]) -> list:
    return [(Path(i).read_bytes(), q) for i in images for q in questions]


def _soak(server: Server, bundles: dict[str, str], images: list[Path], questions: list[str], requests: int, seed: int = 0) -> dict:
    """Valid and invalid requests, 8 at a time, across every bundle; answers checked against predict."""
    import httpx

    expected = {}
    for name, path in bundles.items():
        predictor = Predictor(path)
        for image in images:
            for question, answer in zip(questions, predictor.predict([str(image)] * len(questions), questions, top_k=3)):
                expected[(name, str(image), question)] = answer
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        kind = rng.choices(["valid", "not an image", "empty question", "unknown bundle", "bad top_k"], [75, 7, 6, 6, 6])[0]
        plan.append((kind, rng.choice(list(bundles)), rng.choice(images), rng.choice(questions)))
    blobs = {str(i): Path(i).read_bytes() for i in images}
    outcome = {"valid": 0, "valid_equal_to_predict": 0, "invalid": 0, "invalid_4xx": 0, "5xx": 0}
    memory = {}
    counter, lock = [0], threading.Lock()
    early = min(100, max(1, requests // 10))  # memory is read after this many requests and at the end

    def worker(part: list):
        with httpx.Client() as client:
            for kind, name, image, question in part:
                data = blobs[str(image)] if kind != "not an image" else b"plain text, not an image"
                reply = _ask(client, server.url, data, "" if kind == "empty question" else question,
                             "nope" if kind == "unknown bundle" else name, 999 if kind == "bad top_k" else 3)
                with lock:
                    counter[0] += 1
                    if counter[0] == early:
                        memory["early_mib"] = server.rss()
                    if reply.status_code >= 500:
                        outcome["5xx"] += 1
                    if kind == "valid":
                        outcome["valid"] += 1
                        want = expected[(name, str(image), question)]
                        got = reply.json() if reply.status_code == 200 else {}
                        same = (got.get("answer") == want["answer"] and
                                [t["answer"] for t in got.get("top_k", [])] == [t["answer"] for t in want["top_k"]] and
                                all(abs(a["probability"] - b["probability"]) <= 1e-5 for a, b in zip(got["top_k"], want["top_k"])))
                        outcome["valid_equal_to_predict"] += same
                    else:
                        outcome["invalid"] += 1
                        outcome["invalid_4xx"] += 400 <= reply.status_code < 500

    parts = [plan[i::8] for i in range(8)]
    threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    memory["end_mib"] = server.rss()
    memory["growth_pct"] = round(100 * (memory["end_mib"] - memory["early_mib"]) / memory["early_mib"], 2)
    return {"requests": requests, "memory_read_after": early, "seconds": round(time.perf_counter() - start, 1), **outcome, **memory}


def run(bundles: list[str], out: str, images: list[str], questions: list[str], clients=(1, 4, 16, 64), requests: int = 256,
        soak: int = 2000) -> dict:
    if not bundles or not images:
        raise UsageError("--bundles and --images: give at least one each")
    out_path = output_folder(out)
    first = bundles[0]
    names = [Path(b).name for b in bundles]
    inputs = load_inputs([Path(i) for i in images], questions)
    result = {"machine": machine_info(), "bundles": bundles, "images": len(images), "questions": questions,
              "settings": {"requests_per_level": requests, "max_batch": 16, "max_wait_ms": 5}}

    # memory: one bundle, then every bundle over the same base
    server = Server([first])
    try:
        one = server.rss()
    finally:
        server.stop()
    server = Server(bundles)
    try:
        import httpx

        sizes = httpx.get(server.url + "/health").json()["weights"]
        result["memory"] = {"one_bundle_mib": round(one, 1), f"{len(bundles)}_bundles_mib": round(server.rss(), 1),
                            "shared_encoder_weights_mib": round(sizes["encoders"] / 2**20, 1),
                            "own_weights_mib": {n: round(v / 2**20, 2) for n, v in sizes["bundles"].items()}}
        # soak across two bundles (the server with every bundle is already up)
        soak_bundles = dict(list(zip(names, bundles))[:2])
        result["soak"] = _soak(server, soak_bundles, [Path(i) for i in images], questions, soak)
    finally:
        server.stop()

    # load, batching on and off, on the first bundle
    result["load"] = []
    for label, args in (("batching on", ["--max-batch", "16", "--max-wait-ms", "5"]), ("batching off", ["--max-batch", "1"])):
        server = Server([first], *args)
        try:
            for n in clients:
                row = {"mode": label, **_load(server, names[0], inputs, n, requests)}
                print(json.dumps(row), flush=True)
                result["load"].append(row)
        finally:
            server.stop()
    by = {(r["mode"], r["clients"]): r for r in result["load"]}
    result["batching_gain"] = {n: round(by[("batching on", n)]["throughput"] / by[("batching off", n)]["throughput"], 2)
                               for n in clients}
    write_atomic(out_path / "serve.json", json.dumps(result, indent=2))
    write_atomic(out_path / "serve.md", markdown(result))
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    mem = r["memory"]
    many = [k for k in mem if k.endswith("_bundles_mib")][0]
    lines = [f"`mmpeft bench serve` on {m['cuda'] or m['processor']} ({m['cpu_count']} cores, torch {m['torch']}); server and "
             f"clients on the same machine (127.0.0.1); {r['images']} images x {len(r['questions'])} questions; "
             f"{r['settings']['requests_per_level']} requests per level.", "",
             "| batching | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["load"]:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['errors']} | {row['throughput']} | "
                     f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} |")
    lines += ["", "Batching gain (throughput with / without, same run): " +
              ", ".join(f"{n} clients {g}x" for n, g in r["batching_gain"].items()), "",
              f"Memory (resident, MiB): one bundle {mem['one_bundle_mib']}, {many.split('_')[0]} bundles {mem[many]}; "
              f"shared encoder weights {mem['shared_encoder_weights_mib']} MiB, each bundle's own weights "
              + ", ".join(f"{n} {v} MiB" for n, v in mem["own_weights_mib"].items()) + ".", ""]
    s = r["soak"]
    lines.append(f"Soak: {s['requests']} requests in {s['seconds']} s across two bundles; {s['valid']} valid, "
                 f"{s['valid_equal_to_predict']} of them equal to `predict`'s answer; {s['invalid']} invalid, "
                 f"{s['invalid_4xx']} answered 4xx; 5xx: {s['5xx']}; memory {s['early_mib']:.1f} MiB after {s['memory_read_after']} requests, "
                 f"{s['end_mib']:.1f} MiB at the end ({s['growth_pct']:+.2f}%).")
    return "\n".join(lines) + "\n"
