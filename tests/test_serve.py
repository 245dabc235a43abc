"""`mmpeft serve` through FastAPI's test client: every endpoint, every bad input with its
status and message, batching that changes no answer, two bundles on one base, shutdown."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

fastapi = pytest.importorskip("fastapi", reason="pip install 'mmpeft[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from mmpeft.cli import app as cli  # noqa: E402
from mmpeft.inference import Predictor  # noqa: E402
from mmpeft.serve.app import ServeSettings, create_app  # noqa: E402
from mmpeft.serve.pool import AdapterPool  # noqa: E402
from tests import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(assets, tmp_path_factory):
    """Two tiny bundles of one recipe (LoRA text, BitFit image) trained with other seeds."""
    work = tmp_path_factory.mktemp("serve")
    out = {}
    for seed in (0, 1):
        raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], work, text_method="lora", image_method="bitfit",
                               epochs=2, seed=seed)
        raw["output"]["name"] = f"seed{seed}"
        (work / f"r{seed}.yaml").write_text(yaml.safe_dump(raw))
        res = CliRunner().invoke(cli, ["finetune", str(work / f"r{seed}.yaml")])
        assert res.exit_code == 0, res.output
        out[f"seed{seed}"] = work / f"seed{seed}"
    images = sorted((Path(assets["data"]["test"]).parent / "images").glob("test_*.png"))[:8]
    return {"paths": out, "images": images, "work": work}


@pytest.fixture(scope="module")
def pool(bundles):
    return AdapterPool(bundles["paths"], log=lambda m: None)


def client_for(pool, **settings):
    return TestClient(create_app(pool, ServeSettings(**settings)))


def post(client, image: bytes, question="what color is the shape ?", **fields):
    return client.post("/predict", files={"image": ("x.png", image, "image/png")}, data={"question": question, **fields})


def png(path) -> bytes:
    return Path(path).read_bytes()


def test_endpoints(pool):
    with client_for(pool) as client:
        assert client.get("/health").json()["status"] == "ok"
        listed = client.get("/bundles").json()["bundles"]
        assert [b["name"] for b in listed] == ["seed0", "seed1"]
        assert listed[0]["methods"] == {"text": "lora", "image": "bitfit"} and listed[0]["vocabulary_size"] == 5
        assert "accuracy" in listed[0]["metrics"] and "not for diagnosis" in listed[0]["intended_use"]
        schema = client.get("/openapi.json").json()
        assert set(schema["paths"]["/predict"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
        # the schema says what the server answers a client's mistakes with, so a schema-driven fuzzer can hold it to it
        assert {"400", "404", "413", "415", "422", "503"} <= set(schema["paths"]["/predict"]["post"]["responses"])
        docs = client.get("/docs")  # served offline: no script from a CDN
        assert docs.status_code == 200 and "/predict" in docs.text and "<script" not in docs.text
        page = client.get("/")
        assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[1].split("</script>")[0].replace("http://", "")


def test_answers_equal_predict_in_both_body_forms(pool, bundles):
    image = bundles["images"][0]
    expected = {name: Predictor(path).predict([str(image)], ["what color is the shape ?"], top_k=3)[0]
                for name, path in bundles["paths"].items()}
    with client_for(pool) as client:
        for name in ("seed0", "seed1", "seed0"):  # switching back and forth swaps each bundle's tensors in
            reply = post(client, png(image), bundle=name, top_k="3")
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["answer"] == expected[name]["answer"] and body["top_k"] == expected[name]["top_k"]
            assert body["bundle"] == name and len(body["version"]) == 12 and body["seconds"] >= 0
        body = client.post("/predict", json={"bundle": "seed1", "question": "what color is the shape ?", "top_k": 3,
                                             "image_base64": base64.b64encode(png(image)).decode()}).json()
        assert body["top_k"] == expected["seed1"]["top_k"]
    assert expected["seed0"]["top_k"] != expected["seed1"]["top_k"]  # the two bundles really answer differently


def test_two_bundles_share_one_base(pool):
    shared = {id(s.encoder) for s in pool._encoders.values()}
    assert len(shared) == 2  # one text and one image encoder for both bundles
    sizes = pool.weight_bytes()
    assert all(own < sizes["encoders"] / 3 for own in sizes["bundles"].values())


def truncated_png(path) -> bytes:
    data = png(path)
    return data[: len(data) // 2]


@pytest.mark.parametrize("case,status,needle", [
    ("no question", 422, "question is required"),
    ("empty question", 422, "question is required"),
    ("unknown bundle", 404, "no bundle named 'nope'"),
    ("no bundle, two served", 422, "bundle is required when several are served"),
    ("not an image", 415, "not an image file"),
    ("truncated image", 400, "truncated or damaged"),
    ("too many pixels", 413, "24x24 = 576 pixels, more than the 100 allowed"),
    ("upload too large", 413, "more than the 2,048 allowed"),
    ("top_k 0", 422, "top_k must be an integer from 1 to 5"),
    ("top_k 999", 422, "top_k must be an integer from 1 to 5"),
    ("top_k text", 422, "top_k must be an integer"),
    ("no image", 422, "image is required"),
    ("bad json", 400, "not valid JSON"),
    ("bad base64", 400, "not valid base64"),
    ("wrong content type", 415, "send multipart/form-data or application/json"),
    # found by an attacker (issue 35): each was a 500, or an echo of the whole name
    ("lone surrogate", 422, "lone surrogate"),
    ("top_k Infinity", 422, "top_k must be an integer"),
    ("top_k 1e400", 422, "top_k must be an integer"),
    ("UTF-16 JSON", 400, "not UTF-8"),
    ("form of 30 fields", 413, "more than 20 fields"),
    ("boundary of 8000 characters", 400, "boundary of 1 to 70 characters"),
    ("multipart of 100 parts", 413, "more than 64 parts"),
    ("a name of 1 MB", 404, "no bundle named"),
    ("decodes beyond the budget", 413, "decodes to 3,456 bytes"),
])
def test_bad_input_is_a_4xx_with_a_clear_message(pool, bundles, case, status, needle):
    image = bundles["images"][0]
    settings = {"too many pixels": {"max_pixels": 100}, "upload too large": {"max_upload_bytes": 2048},
                "decodes beyond the budget": {"max_decoded_bytes": 3000}}.get(case, {})
    b64 = base64.b64encode(png(image)).decode()
    json_type = {"content-type": "application/json"}
    parts = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(100)) + "--b--\r\n"
    with client_for(pool, **settings) as client:
        q = {"bundle": "seed0"}
        reply = {
            "lone surrogate": lambda: client.post("/predict", headers=json_type, content=json.dumps(
                {"question": "\ud800 what", "image_base64": b64, **q}).encode()),  # escaped as \\ud800 in the JSON text
            "top_k Infinity": lambda: client.post("/predict", headers=json_type, content=(
                '{"question": "q", "bundle": "seed0", "top_k": Infinity, "image_base64": "%s"}' % b64).encode()),
            "top_k 1e400": lambda: client.post("/predict", headers=json_type, content=(
                '{"question": "q", "bundle": "seed0", "top_k": 1e400, "image_base64": "%s"}' % b64).encode()),
            "UTF-16 JSON": lambda: client.post("/predict", headers=json_type, content=(
                '{"question": "q", "bundle": "seed0", "image_base64": "%s"}' % b64).encode("utf-16")),
            "form of 30 fields": lambda: client.post("/predict", content="&".join(f"k{i}=v" for i in range(30)).encode(),
                                                     headers={"content-type": "application/x-www-form-urlencoded"}),
            "boundary of 8000 characters": lambda: client.post(
                "/predict", content=b"--x", headers={"content-type": "multipart/form-data; boundary=" + "a" * 8000}),
            "multipart of 100 parts": lambda: client.post("/predict", content=parts.encode(),
                                                          headers={"content-type": "multipart/form-data; boundary=b"}),
            "a name of 1 MB": lambda: post(client, png(image), bundle="n" * 1_000_000),
            "decodes beyond the budget": lambda: post(client, png(image), **q),
            "no question": lambda: client.post("/predict", files={"image": ("x.png", png(image))}, data=q),
            "empty question": lambda: post(client, png(image), "   ", **q),
            "unknown bundle": lambda: post(client, png(image), bundle="nope"),
            "no bundle, two served": lambda: post(client, png(image)),
            "not an image": lambda: post(client, b"%PDF-1.4 not an image", **q),
            "truncated image": lambda: post(client, truncated_png(image), **q),
            "too many pixels": lambda: post(client, png(image), **q),
            "upload too large": lambda: post(client, png(image) + b"\0" * 4096, **q),
            "top_k 0": lambda: post(client, png(image), top_k="0", **q),
            "top_k 999": lambda: post(client, png(image), top_k="999", **q),
            "top_k text": lambda: post(client, png(image), top_k="three", **q),
            "no image": lambda: client.post("/predict", data={"question": "q", **q}),
            "bad json": lambda: client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}),
            "bad base64": lambda: client.post("/predict", json={"question": "q", "image_base64": "%%%", **q}),
            "wrong content type": lambda: client.post("/predict", content=b"x", headers={"content-type": "text/plain"}),
        }[case]()
        assert reply.status_code == status, (case, reply.status_code, reply.text)
        body = reply.json()
        assert needle in body["error"] and len(body["error"]) < 400, body
        assert client.get("/health").json()["status"] == "ok"  # the server is still fine


def test_images_beyond_the_decode_budget_are_shed_with_503_and_retry_after(pool, bundles):
    with client_for(pool, max_decoded_bytes=10_000) as client:
        budget = client.app.state.budget
        assert post(client, png(bundles["images"][0]), bundle="seed0").status_code == 200 and budget.used == 0
        budget.used = 8_000  # other requests' images being decoded
        reply = post(client, png(bundles["images"][0]), bundle="seed0")
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1" and "retry" in reply.json()["error"]
        budget.used = 0
        assert post(client, png(bundles["images"][0]), bundle="seed0").status_code == 200


def test_a_request_that_breaks_its_batch_fails_alone(pool, bundles, monkeypatch):
    """A request that passes every check and still breaks the forward pass (as a NaN clip or a
    lone surrogate did before they were checked) is answered with its own 500; the requests
    that shared its batch are answered again, one at a time, and get their answers."""
    answer = pool.answer

    def breaks_on_boom(bundle, images, questions, *rest):
        if "boom" in " ".join(questions):
            raise TypeError("TextEncodeInput must be Union[...]")
        return answer(bundle, images, questions, *rest)

    monkeypatch.setattr(pool, "answer", breaks_on_boom)
    app = create_app(pool, ServeSettings(max_batch=8, max_wait_ms=300))
    with TestClient(app, raise_server_exceptions=False) as client:  # the 500 as a client sees it
        replies = {}

        def ask(i):
            question = "boom" if i == 3 else "what color is the shape ?"
            replies[i] = post(client, png(bundles["images"][i % 4]), question, bundle="seed0")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert replies[3].status_code == 500 and "TextEncodeInput" in replies[3].json()["error"]
    assert all(replies[i].status_code == 200 for i in range(8) if i != 3), {i: r.text for i, r in replies.items()}
    assert max(r.json()["batch_size"] for i, r in replies.items() if i != 3) == 1  # answered again one at a time


def test_batching_changes_no_answer(pool, bundles):
    images = bundles["images"]
    questions = ["what color is the shape ?", "is there a red shape ?"]
    expected = Predictor(bundles["paths"]["seed0"]).predict([str(i) for i in images for _ in questions],
                                                            [q for _ in images for q in questions], top_k=3)
    with client_for(pool, max_batch=8, max_wait_ms=200) as client:
        replies = [None] * len(expected)

        def ask(i):
            replies[i] = post(client, png(images[i // 2]), questions[i % 2], bundle="seed0", top_k="3").json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(expected))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.get("/health").json()
    assert max(r["batch_size"] for r in replies) > 1 and stats["batches"] < stats["requests"]  # requests were batched
    for got, want in zip(replies, expected):
        assert got["answer"] == want["answer"]
        assert [t["answer"] for t in got["top_k"]] == [t["answer"] for t in want["top_k"]]
        # a row's logits may differ in the last bits with the batch it is computed in
        assert all(abs(a["probability"] - b["probability"]) <= 1e-5 for a, b in zip(got["top_k"], want["top_k"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(bundles):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "serve", str(bundles["paths"]["seed0"]), "--port", str(port),
                               "--max-wait-ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not start: " + server.stdout.read())
        result = {}

        def slow_request():  # waits 1.5 s in the batcher: in flight when SIGTERM arrives
            result["reply"] = httpx.post(url + "/predict", files={"image": ("x.png", png(bundles["images"][0]))},
                                         data={"question": "what color is the shape ?"}, timeout=30)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        thread.join()
        assert result["reply"].status_code == 200 and result["reply"].json()["answer"]
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()


def test_a_line_per_request_names_method_path_status_time_and_bundle(pool, bundles):
    lines = []
    with client_for(pool, log=lines.append) as client:
        assert post(client, png(bundles["images"][0]), bundle="seed0").status_code == 200
        assert post(client, png(bundles["images"][0]), bundle="nope").status_code == 404
        assert client.get("/bundles").status_code == 200
    assert len(lines) == 3, lines
    assert re.fullmatch(r"POST /predict 200 \d+ ms bundle seed0", lines[0]), lines
    assert re.fullmatch(r"POST /predict 404 \d+ ms", lines[1]) and re.fullmatch(r"GET /bundles 200 \d+ ms", lines[2]), lines
    with client_for(pool) as client:  # quiet by default in the library (the CLI logs unless --quiet)
        assert client.get("/bundles").status_code == 200


def test_a_batch_takes_every_request_that_waited_while_the_last_one_ran():
    """Requests queued longer ago than max_wait (they arrived while a batch was being answered)
    join the next batch at once, up to max_batch, instead of going one at a time."""
    import asyncio
    from types import SimpleNamespace

    from mmpeft.serve.batching import take_batch

    async def scenario():
        queue = asyncio.Queue()
        for i in range(5):
            queue.put_nowait(SimpleNamespace(i=i, queued=time.perf_counter() - 10.0))
        first = await take_batch(queue, 3, 0.005)
        second = await take_batch(queue, 16, 0.005)
        return [j.i for j in first], [j.i for j in second], queue.empty()

    assert asyncio.run(scenario()) == ([0, 1, 2], [3, 4], True)
