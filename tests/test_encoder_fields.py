"""Two encoders of one modality reading different manifest columns (``data.encoder_fields``):
the current and the prior scan, the question and a note. Each encoder is fed its own column in
training, evaluation, predict (``--encoder-input``, manifests) and merge; missing columns and bad
files are named by file, row and column; recipe mistakes are named by key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data import recipe_splits
from mmpeft.data.batching import Collator, ImageStore
from mmpeft.errors import DataError, RecipeError
from mmpeft.model import build_model
from tests import tiny

runner = CliRunner()
NOTES = ["follow-up study", "new patient", "after treatment"]


def make_pairs(directory, n_train: int = 32, n_test: int = 16, seed: int = 0) -> dict:
    """Rows with a current and a prior shape image and a note; the answer is whether the colour changed."""
    def row(rng, i, name):
        now, before = rng.choice(list(tiny.COLORS)), rng.choice(list(tiny.COLORS))
        prior = name.replace(".png", "_prior.png")
        tiny.shape_image(directory / prior, before, "circle")
        return now, "square", {"image": name, "prior_image": prior, "question": "did the colour change ?",
                               "note": rng.choice(NOTES), "answer": "changed" if now != before else "same"}

    return tiny.write_shape_manifests(directory, row, n_train, n_test, seed)


@pytest.fixture(scope="module")
def pairs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    files = make_pairs(root / "data")
    recipe = tiny.recipe_dict(assets["bert"], assets["vit"], files, root / "out", epochs=2)
    recipe["encoders"]["prior"] = {"model": str(assets["vit"]), "peft": {"method": "lora"}}
    recipe["encoders"]["note"] = {"model": str(assets["bert"]), "max_length": 8, "peft": {"method": "bitfit"}}
    recipe["data"]["encoder_fields"] = {"prior": "prior_image", "note": "note"}
    recipe["task"] = {"type": "classification"}
    path = root / "pairs.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return {"root": root, "recipe": path, "files": files, "bundle": root / "out" / "tiny"}


def test_each_encoder_is_fed_its_own_column(pairs):
    recipe = load_recipe(pairs["recipe"])
    splits = recipe_splits(recipe)
    row = splits.train[0]
    assert row.inputs["prior"][2] == row.image.replace(".png", "_prior.png") and "/images/train_" in row.image
    assert row.inputs["note"][2] in NOTES and row.text == "did the colour change ?"
    model = build_model(recipe, 2)
    store = ImageStore.for_encoders(model.encoders.values())
    rows = splits.train[:6]
    batch = Collator(rows, dict(model.encoders.items()), {}, store)(list(range(6)))["inputs"]
    for k, r in enumerate(rows):
        now = model.encoders["image"].pixels(store.get(r.image))
        before = model.encoders["prior"].pixels(store.get(r.inputs["prior"][2]))
        assert torch.equal(batch["image"]["pixel_values"][k], now)
        assert torch.equal(batch["prior"]["pixel_values"][k], before)
        assert not torch.equal(now, before)  # a square and a circle: the two columns really differ
    expected = model.encoders["note"].preprocess([r.inputs["note"][2] for r in rows])
    assert torch.equal(batch["note"]["input_ids"], expected["input_ids"])
    assert not torch.equal(batch["note"]["input_ids"], batch["text"]["input_ids"])


def test_train_evaluate_predict_merge_with_own_columns(pairs):
    dry = runner.invoke(app, ["finetune", str(pairs["recipe"]), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "image reads 'image', note reads 'note', prior reads 'prior_image', text reads 'question'" in " ".join(dry.output.split())
    res = runner.invoke(app, ["finetune", str(pairs["recipe"])])
    assert res.exit_code == 0, res.output
    bundle = pairs["bundle"]
    ev = runner.invoke(app, ["evaluate", str(bundle)])
    assert ev.exit_code == 0 and "reproduced" in ev.output, ev.output

    data = pairs["files"]["test"].parent
    first = json.loads(pairs["files"]["test"].read_text().splitlines()[0])
    out = pairs["root"] / "predictions.jsonl"
    many = runner.invoke(app, ["predict", str(bundle), "--input", str(pairs["files"]["test"]), "-o", str(out)])
    assert many.exit_code == 0, many.output
    from_manifest = json.loads(out.read_text().splitlines()[0])

    def one(prior: str) -> dict:
        from mmpeft.inference import Predictor
        return Predictor(bundle).predict([str(data / first["image"])], [first["question"]], top_k=2,
                                         inputs={"prior": [str(data / prior)], "note": [first["note"]]})[0]

    single = runner.invoke(app, ["predict", str(bundle), "--image", str(data / first["image"]), "--question",
                                 first["question"], "--encoder-input", f"prior={data / first['prior_image']}",
                                 "--encoder-input", f"note={first['note']}"])
    assert single.exit_code == 0, single.output
    answer = one(first["prior_image"])
    assert answer["top_k"] == from_manifest["top_k"] and answer["answer"] in single.output
    assert answer["prior_image"] == str(data / first["prior_image"]) and answer["note"] == first["note"]
    swapped = one(first["image"])  # the current scan as its own prior: the prior encoder's input changes the answer
    assert swapped["top_k"][0]["probability"] != answer["top_k"][0]["probability"]

    merged = runner.invoke(app, ["merge", str(bundle), "--out", str(pairs["root"] / "merged")])
    assert merged.exit_code == 0, merged.output
    assert "probe examples (bundle test data)" in merged.output


def test_predict_names_the_missing_and_the_unknown_encoder_input(pairs):
    bundle, data = pairs["bundle"], pairs["files"]["test"].parent
    if not (bundle / "manifest.json").is_file():
        pytest.skip("needs the bundle of the previous test")
    args = ["predict", str(bundle), "--image", str(data / "images/test_0.png"), "--question", "q"]
    res = runner.invoke(app, args + ["--encoder-input", "note=x"])
    assert res.exit_code == 2 and "'prior' read column(s) of their own: give --encoder-input prior=<image>" in res.output
    res = runner.invoke(app, args + ["--encoder-input", "note=x", "--encoder-input", "prior=x", "--encoder-input", "scan=y"])
    assert res.exit_code == 2 and "'scan' is not an encoder with a column of its own (those are: note, prior)" in res.output
    res = runner.invoke(app, args + ["--encoder-input", "prior"])
    assert res.exit_code == 2 and "expected ENCODER=VALUE" in res.output
    res = runner.invoke(app, args + ["--encoder-input", "note=x", "--encoder-input", f"prior={data / 'nope.png'}"])
    assert res.exit_code == 2 and "input 1: file not found" in res.output and "nope.png" in res.output
    bad = pairs["root"] / "no_prior.jsonl"
    bad.write_text(json.dumps({"image": "data/images/test_0.png", "question": "q", "note": "n"}) + "\n")
    res = runner.invoke(app, ["predict", str(bundle), "--input", str(bad)])
    assert res.exit_code == 2 and f"{bad}, row 1: needs field(s)" in res.output and "'prior_image'" in res.output


def test_a_missing_column_or_bad_file_is_named_by_row(pairs, tmp_path):
    data = pairs["files"]["train"].parent
    rows = [json.loads(line) for line in pairs["files"]["train"].read_text().splitlines()]
    rows = [{**r, "image": str(data / r["image"]), "prior_image": str(data / r["prior_image"])} for r in rows]
    train = tmp_path / "train.jsonl"
    del rows[2]["prior_image"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(pairs["recipe"], [f"data.train={train}"])
    with pytest.raises(DataError, match=r"train.jsonl, row 3: missing field\(s\) 'prior_image'.*data.encoder_fields"):
        recipe_splits(recipe)
    rows[2]["prior_image"] = str(tmp_path / "gone.png")
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["finetune", str(pairs["recipe"]), f"data.train={train}", "--dry-run"])
    assert res.exit_code == 2 and "train.jsonl, row 3: file not found" in res.output and "gone.png" in res.output
    res = runner.invoke(app, ["finetune", str(pairs["recipe"]), f"data.train={train}", "data.on_bad_image=skip",
                              f"output.dir={tmp_path / 'out'}", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "skipped 1 row(s) with 1 bad image(s)" in res.output


@pytest.mark.parametrize("override, message", [
    ("data.encoder_fields={priors: prior_image}", "data.encoder_fields.priors: 'priors' is not an encoder of this recipe; "
                                                  "did you mean 'prior'?"),
    ("data.encoder_fields={prior: ''}", "data.encoder_fields: the column of 'prior' must be a column name"),
    ("data.source=easy_vqa", "data.encoder_fields.prior: easy_vqa has fixed columns"),
])
def test_recipe_mistakes_in_encoder_fields_are_named(pairs, override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(pairs["recipe"], [override])
    assert message in str(err.value)


def test_an_encoder_of_unknown_modality_must_say_it_to_read_its_own_column(pairs):
    with pytest.raises(RecipeError, match="the modality of encoder 'hub' is not known before it loads; set "
                                          "encoders.hub.modality"):
        load_recipe(pairs["recipe"], ["encoders.hub={model: someone/model}", "data.encoder_fields.hub=prior_image"])


def test_serve_takes_each_encoders_own_input_and_answers_as_predict(pairs):
    """``POST /predict`` with ``input.<encoder>`` form fields or ``inputs`` in JSON gives
    predict's answer; a missing, unknown or bad own input is a 4xx naming its field."""
    import base64

    from fastapi.testclient import TestClient

    from mmpeft.inference import Predictor
    from mmpeft.serve.app import ServeSettings, create_app
    from mmpeft.serve.pool import AdapterPool

    bundle, data = pairs["bundle"], pairs["files"]["test"].parent
    if not (bundle / "manifest.json").is_file():
        pytest.skip("needs the bundle of the earlier test")
    first = json.loads(pairs["files"]["test"].read_text().splitlines()[1])
    now, prior = (data / first["image"]).read_bytes(), (data / first["prior_image"]).read_bytes()
    expected = Predictor(bundle).predict([str(data / first["image"])], [first["question"]], top_k=2,
                                         inputs={"prior": [str(data / first["prior_image"])], "note": [first["note"]]})[0]
    with TestClient(create_app(AdapterPool({"pairs": bundle}, log=lambda m: None), ServeSettings())) as client:
        listed = client.get("/bundles").json()["bundles"][0]
        assert listed["inputs"] == ["image", "text"] and listed["encoder_inputs"] == {"note": "text", "prior": "image"}
        form = client.post("/predict", files={"image": ("a.png", now), "input.prior": ("b.png", prior)},
                           data={"question": first["question"], "input.note": first["note"], "top_k": "2"})
        assert form.status_code == 200, form.text
        body = client.post("/predict", json={"image_base64": base64.b64encode(now).decode(), "question": first["question"],
                                             "inputs": {"prior": base64.b64encode(prior).decode(), "note": first["note"]},
                                             "top_k": 2})
        assert body.status_code == 200, body.text
        for reply in (form.json(), body.json()):
            assert reply["answer"] == expected["answer"]
            assert [t["answer"] for t in reply["top_k"]] == [t["answer"] for t in expected["top_k"]]
            assert [t["probability"] for t in reply["top_k"]] == pytest.approx([t["probability"] for t in expected["top_k"]],
                                                                                 abs=1e-4)
        swapped = client.post("/predict", files={"image": ("a.png", now), "input.prior": ("b.png", now)},
                              data={"question": first["question"], "input.note": first["note"], "top_k": "2"}).json()
        assert swapped["top_k"] != form.json()["top_k"]  # the prior scan is what the prior encoder reads
        missing = client.post("/predict", files={"image": ("a.png", now)}, data={"question": "q", "input.note": "n", "top_k": "2"})
        assert missing.status_code == 422 and missing.json()["field"] == "input.prior"
        unknown = client.post("/predict", json={"image_base64": base64.b64encode(now).decode(), "question": "q",
                                                "inputs": {"scan": "x", "note": "n", "prior": base64.b64encode(prior).decode()},
                                                "top_k": 2})
        assert unknown.status_code == 422 and "input.scan: no encoder" in unknown.json()["error"]
        bad = client.post("/predict", files={"image": ("a.png", now), "input.prior": ("b.png", b"not an image")},
                          data={"question": "q", "input.note": "n", "top_k": "2"})
        assert bad.status_code == 415 and bad.json() == {"error": "input.prior is not an image file PIL can read (PNG, "
                                                         "JPEG, ...)", "field": "input.prior"}
        not_base64 = client.post("/predict", json={"image_base64": base64.b64encode(now).decode(), "question": "q",
                                                   "inputs": {"note": "n", "prior": "***"}, "top_k": 2})
        assert not_base64.status_code == 400 and not_base64.json()["field"] == "input.prior"
