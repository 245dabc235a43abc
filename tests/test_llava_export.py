"""``mmpeft export --format llava``: a generate bundle over a tiny random CLIP vision tower and a
tiny random Llama becomes a ``LlavaForConditionalGeneration`` folder that plain transformers
loads (in a process that never imports mmpeft) and whose greedy tokens on the same image and
prompt equal ``mmpeft predict``'s; parts that do not fit the format are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.bundle.writer import write_bundle
from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data import recipe_splits
from mmpeft.model import build_model
from mmpeft.tasks import recipe_task_set
from tests.test_generate import generate_recipe
from tests.test_tasks import write_rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("llava_rows"))


def clip_recipe(assets, rows, out, decoder="llama", image=None, **task):
    raw = generate_recipe({**assets, "vit": assets[image or "clip"]}, rows, out, decoder, 1, **task)
    raw["encoders"]["image"]["peft"] = {"method": "lora"}
    return raw


def untrained_bundle(raw, path):
    recipe = load_recipe(raw)
    tasks = recipe_task_set(recipe, recipe_splits(recipe).train)
    write_bundle(path, build_model(recipe, tasks), recipe, tasks, {})
    return path


PLAIN = """
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, prompt, images = sys.argv[1], sys.argv[2], sys.argv[3:]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
out = []
for image in images:
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
    out.append({"ids": new.tolist(), "text": processor.decode(new, skip_special_tokens=True)})
assert "mmpeft" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("decoder", ["llama", "gpt2"])  # a chat template; plain role: content lines
def test_plain_transformers_generates_the_bundles_tokens(decoder, assets, rows, tmp_path):
    raw = clip_recipe(assets, rows, tmp_path / "out", decoder)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0, res.output
    bundle, out = tmp_path / "out" / "tiny", tmp_path / "llava"
    res = runner.invoke(app, ["export", str(bundle), "--format", "llava", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "4 of 4 probe rows (bundle test data) generated the same greedy tokens" in res.output
    sealed = json.loads((out / "export.json").read_text())
    assert sealed["format"] == "mmpeft-llava-export" and sealed["check"]["tokens_equal"] == 4
    assert sealed["merge"]["folded"] == {"image": "lora", "answer.decoder": "lora"}
    assert {"config.json", "model.safetensors", "processor_config.json", "generation_config.json"} <= set(sealed["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["image_seq_length"] == (32 // 8) ** 2 + 1  # patches and the class token, as our encoder reads them

    test_rows = [json.loads(line) for line in rows["test"].read_text().splitlines()][:3]
    from mmpeft.inference import Predictor

    predictor = Predictor(bundle)
    ours = predictor.predict([str(rows["test"].parent / r["image"]) for r in test_rows], [""] * len(test_rows))
    assert len({a["text"] for a in ours}) > 1 or ours[0]["text"]  # something was generated
    images = [str(rows["test"].parent / r["image"]) for r in test_rows]
    plain = subprocess.run([sys.executable, "-c", PLAIN, str(out), "describe the image", *images],
                           capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    theirs = json.loads(plain.stdout.strip().splitlines()[-1])
    assert [t["text"].strip() for t in theirs] == [a["text"] for a in ours]
    assert all(t["ids"] for t in theirs)
    res = runner.invoke(app, ["export", str(bundle), "--format", "llava", "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output  # our own sealed export may be replaced


def test_parts_that_do_not_fit_llava_are_refused_by_name(assets, rows, tmp_path):
    runner = CliRunner()
    cases = [
        (clip_recipe(assets, rows, tmp_path / "a", image="vit"), "encoder 'image' is a vit model"),
        (clip_recipe(assets, rows, tmp_path / "b", connector="resampler"), "the 'resampler' connector"),
    ]
    adapter = clip_recipe(assets, rows, tmp_path / "c")
    adapter["encoders"]["image"]["peft"] = {"method": "adapter"}
    cases.append((adapter, "keeps its adapter method beside the base"))
    for i, (raw, message) in enumerate(cases):
        bundle = untrained_bundle(raw, tmp_path / f"bundle{i}")
        res = runner.invoke(app, ["export", str(bundle), "--format", "llava", "--out", str(tmp_path / f"x{i}")])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split()), res.output
        assert not (tmp_path / f"x{i}").exists()
    res = runner.invoke(app, ["export", str(bundle), "--format", "gguf", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "available: onnx, llava" in res.output
