"""`mmpeft serve`'s OpenAI-compatible chat API, driven by the official `openai` client: a plain
and a streamed completion with an image equal `mmpeft predict`'s greedy text; a bad image, an
unknown model, an http image URL and bad settings come back as 4xx in OpenAI's error shape."""

from __future__ import annotations

import base64
import json

import openai
import pytest
from fastapi.testclient import TestClient
from mmpeft.inference import Predictor
from mmpeft.serve.app import ServeSettings, create_app
from mmpeft.serve.pool import AdapterPool
from tests.test_generate import trained
from tests.test_tasks import write_rows


@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    rows = write_rows(root / "rows")
    bundle = trained(assets, rows, root, epochs=2, prompt="describe: {}", group_fields=["kind"])
    image = rows["test"].parent / "images/test_0.png"
    with TestClient(create_app(AdapterPool({"captioner": bundle}, log=lambda m: None), ServeSettings())) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        yield {"client": client, "http": http, "bundle": bundle, "image": image}


def user(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


def test_models_and_completions_equal_predict(served):
    client, image = served["client"], served["image"]
    assert [m.id for m in client.models.list().data] == ["captioner"]
    want = Predictor(served["bundle"]).predict([str(image)], ["what color is the shape ?"])[0]["text"]
    done = client.chat.completions.create(model="captioner", messages=user("what color is the shape ?", image))
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens >= 1 and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="captioner", messages=user("what color is the shape ?", image), stream=True)]
    assert "".join(pieces) == want
    chunks = list(client.chat.completions.create(model="captioner", messages=user("what color is the shape ?", image),
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want
    short = client.chat.completions.create(model="captioner", messages=user("what color is the shape ?", image), max_tokens=1)
    assert short.usage.completion_tokens == 1 and want.startswith(short.choices[0].message.content)
    sampled = client.chat.completions.create(model="captioner", messages=user("x", image), temperature=0.8, top_p=0.9)
    assert isinstance(sampled.choices[0].message.content, str)
    again = client.chat.completions.create(model="captioner", messages=user("what color is the shape ?", image))
    assert again.choices[0].message.content == want  # a request's sampling settings do not stay behind


def test_bundles_lists_a_captioners_own_metrics(served):
    """GET /bundles reads the task's headline (exact match, not a classifier's accuracy) per group."""
    listed = served["http"].get("/bundles").json()
    metrics = next(b for b in listed["bundles"] if b["name"] == "captioner")["metrics"]
    stored = json.loads((served["bundle"] / "metrics.json").read_text())["test"]
    assert metrics["exact_match"] == stored["exact_match"] and metrics["cider"] == stored["cider"]
    assert {k: v for k, v in metrics.items() if k.startswith("kind=")} == \
        {f"kind={k}": g["exact_match"] for k, g in stored["groups"]["kind"].items()} and len(stored["groups"]["kind"]) == 2


def test_client_mistakes_are_4xx_in_openais_shape(served):
    client, image, http = served["client"], served["image"], served["http"]
    cases = [(dict(model="nope", messages=user("x", image)), openai.NotFoundError, "not served"),
             (dict(model="captioner", messages=user("x")), openai.BadRequestError, "reads an image"),
             (dict(model="captioner", messages=[{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]), openai.BadRequestError, "data: URL"),
             (dict(model="captioner", messages=[{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]), openai.APIStatusError,
              "not an image"),
             (dict(model="captioner", messages=user("x", image), max_tokens=0), openai.BadRequestError, "max_tokens"),
             (dict(model="captioner", messages=user("x", image), n=2), openai.BadRequestError, "one choice"),
             (dict(model="captioner", messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, "role")]
    for kwargs, error, message in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**kwargs)
        assert 400 <= caught.value.status_code < 500 and message in caught.value.message, (kwargs, caught.value.message)
    reply = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


def test_requests_arriving_together_are_generated_as_one_batch_with_their_own_replies(served, tmp_path):
    """Eight clients at once (half streamed, two images, two prompts): one batch of generation
    where they share settings, each reply equal to the request's own greedy reply alone."""
    from concurrent.futures import ThreadPoolExecutor

    images = [served["image"], served["image"].with_name("test_1.png")]
    prompts = ["what color is the shape ?", "a red circle"]
    predictor = Predictor(served["bundle"])
    want = {(i, p): predictor.predict([str(images[i])], [p])[0]["text"] for i in range(2) for p in prompts}
    settings = ServeSettings(max_batch=16, max_wait_ms=400)
    with TestClient(create_app(AdapterPool({"captioner": served["bundle"]}, log=lambda m: None), settings)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)

        def ask(k):
            key = (k % 2, prompts[(k // 2) % 2])
            messages = user(key[1], images[key[0]])
            if k < 4:
                return key, client.chat.completions.create(model="captioner", messages=messages).choices[0].message.content
            chunks = client.chat.completions.create(model="captioner", messages=messages, stream=True)
            return key, "".join(c.choices[0].delta.content or "" for c in chunks)

        with ThreadPoolExecutor(8) as threads:
            replies = list(threads.map(ask, range(8)))
        health = http.get("/health").json()
    assert [text for _, text in replies] == [want[key] for key, _ in replies]
    assert health["chat_requests"] == 8 and health["chat_batches"] < 8  # some requests shared a batch


def test_bench_serve_chat_rows_and_soak(served, tmp_path):
    """`mmpeft bench serve --chat`: streamed load with batching on and off, then a soak of valid
    and invalid chat requests against a real server process: no 5xx, every client mistake a
    4xx, every valid reply equal to predict's."""
    from typer.testing import CliRunner

    from mmpeft.cli import app

    res = CliRunner().invoke(app, ["bench", "serve", "--chat", str(served["bundle"]), "--images",
                                   str(served["image"].parent), "--image-count", "2", "--chat-prompts", "a|b",
                                   "--chat-clients", "1,3", "--chat-requests", "6", "--chat-soak", "40",
                                   "--out", str(tmp_path / "bench")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "bench" / "serve_chat.json").read_text())
    assert [(r["mode"], r["clients"]) for r in result["load"]] == [
        ("batching off", 1), ("batching off", 3), ("batching on", 1), ("batching on", 3)]
    assert all(r["errors"] == 0 and r["requests"] == 6 and r["tokens"] >= 6 for r in result["load"])
    soak = result["soak"]
    assert soak["5xx"] == 0 and soak["valid"] + soak["invalid"] == 40
    assert soak["valid_equal_to_predict"] == soak["valid"] > 0 and soak["invalid_4xx"] == soak["invalid"] > 0
    assert set(result["batching_gain"]) == {"1", "3"}
    assert "tokens/s" in (tmp_path / "bench" / "serve_chat.md").read_text()


def test_bundles_over_one_decoder_share_it(served, assets, tmp_path):
    """Two captioners over the same base decoder (LoRA of the same shape): the pool holds one
    decoder module, each bundle's LoRA tensors swapped in for its requests, so each reply equals
    that bundle's own `predict` whichever bundle ran before; each bundle keeps its LoRA and
    connector only (less than the decoder's size)."""
    import torch

    from tests.test_generate import trained
    from tests.test_tasks import write_rows

    other = trained(assets, write_rows(tmp_path / "rows", seed=1), tmp_path, epochs=1, prompt="describe: {}")
    pool = AdapterPool({"a": served["bundle"], "b": other}, log=lambda m: None)
    decoders = {id(t.decoder) for b in pool.bundles.values() for t in b.tasks.values()}
    assert len(decoders) == 1
    shared = next(s for key, s in pool._encoders.items() if key.startswith("decoder "))
    assert shared.users == ["a", "b"] and shared.active == "a"
    assert any(not torch.equal(shared.states["a"][k], shared.states["b"][k]) for k in shared.states["a"])
    from PIL import Image

    image = Image.open(served["image"]).convert("RGB")
    want = {n: Predictor(p).predict([str(served["image"])], ["what color is the shape ?"])[0]["text"]
            for n, p in (("a", served["bundle"]), ("b", other))}
    for name in ("b", "a", "b"):
        got = pool.chat(name, [(image, "what color is the shape ?", [])], {})[0]["text"]
        assert got == want[name] and shared.active == name
        live = shared.method.trainable_state(shared.encoder)
        assert all(torch.equal(live[k], shared.states[name][k]) for k in live)
    sizes = pool.weight_bytes()
    decoder = sum(t.numel() * t.element_size() for t in shared.encoder.state_dict().values())
    assert all(own < decoder for own in sizes["bundles"].values()), (sizes, decoder)  # not counted per bundle
