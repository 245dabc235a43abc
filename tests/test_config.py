"""Recipe validation: strict keys, typed values, all problems at once, overrides."""

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.errors import RecipeError

BASE = {
    "name": "t",
    "encoders": {"text": {"model": "minilm", "peft": {"method": "lora", "rank": 4}},
                 "image": {"model": "efficientnet-lite0", "peft": {"method": "bitfit"}}},
    "data": {"source": "easy_vqa"},
}


def problems(raw, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(raw, overrides)
    return info.value.problems


def test_valid_recipe_fills_method_defaults():
    r = load_recipe(BASE)
    assert r.encoders["text"].peft == {"method": "lora", "rank": 4, "alpha": 16.0, "dropout": 0.0,
                                       "target_modules": None, "use_dora": False, "use_rslora": False, "init": "default"}
    assert r.encoders["image"].peft == {"method": "bitfit"}
    assert r.fusion == {"type": "gated", "hidden_size": 256, "dropout": 0.1, "gate_input": "inputs"}


def test_all_problems_reported_with_paths_and_suggestions():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["encoders"]["image"]["peft"] = {"method": "lora", "rank": 0}
    raw["encoders"]["text"]["peft"]["rnak"] = 3
    raw["train"] = {"epochs": "two", "bach_size": 3}
    raw["fusion"] = {"type": "gatd"}
    got = problems(raw)
    assert "encoders.image.peft.rank: must be a positive integer (got 0)" in got
    assert "encoders.text.peft.rnak: unknown key; did you mean 'rank'?" in got
    assert "train.epochs: must be an integer (got 'two')" in got
    assert "train.bach_size: unknown key; did you mean 'batch_size'?" in got
    assert any(p.startswith("fusion.type: unknown fusion head 'gatd'; did you mean 'gated'?") for p in got)
    assert len(got) == 5


def test_unknown_method_lists_available():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["encoders"]["text"]["peft"] = {"method": "lorra"}
    (p,) = problems(raw)
    assert p.startswith("encoders.text.peft.method: unknown PEFT method 'lorra'; did you mean 'lora'? (available: ")
    assert "bitfit" in p and "full" in p


def test_overrides_apply_and_are_validated():
    r = load_recipe(BASE, ["train.epochs=1", "encoders.text.peft.rank=2", "fusion.type=concat"])
    assert r.train.epochs == 1 and r.encoders["text"].peft["rank"] == 2 and r.fusion["type"] == "concat"
    assert problems(BASE, ["encoders.text.peft.rank=-1"]) == ["encoders.text.peft.rank: must be a positive integer (got -1)"]
    assert problems(BASE, ["train.epochs"]) == ["override 'train.epochs': expected key.path=value"]


def test_mixed_precision_no_survives_yaml():
    # YAML 1.1 reads a bare `no` as false; accelerate's spelling must still mean "off"
    assert load_recipe(BASE, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    raw = yaml.safe_load(yaml.safe_dump(BASE) + "train:\n  mixed_precision: no\n")
    assert raw["train"]["mixed_precision"] is False and load_recipe(raw).train.mixed_precision == "no"
    assert problems(BASE, ["train.mixed_precision=yes"]) == [
        "train.mixed_precision: must be one of 'auto', 'no', 'fp16' or 'bf16' (got True)"]


def test_manifest_source_needs_files_and_quantized_full_is_refused():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["data"] = {"source": "manifest"}
    raw["encoders"]["image"]["peft"] = {"method": "full"}
    raw["encoders"]["image"]["quantization"] = {"bits": 4}
    got = problems(raw)
    assert any(p.startswith("data.train: required") for p in got)
    assert any(p.startswith("data.test: required") for p in got)
    assert any(p.startswith("encoders.image.quantization: method 'full' trains the base weights") for p in got)


def test_lora_inits_that_rewrite_the_base_are_refused_on_a_quantized_one():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["encoders"]["image"]["peft"] = {"method": "lora", "init": "olora"}
    raw["encoders"]["image"]["quantization"] = {"bits": 8}
    assert "encoders.image.quantization: init: olora rewrites the base weights, which a 4/8-bit base cannot hold " \
           "exactly; remove the quantization or use init: default" in problems(raw)
    raw["encoders"]["image"]["peft"] = {"method": "lora", "init": "pissa", "use_dora": True}
    assert any("init: pissa and use_dora cannot be combined" in p for p in problems(raw))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_methods_that_cannot_run_on_a_quantized_base_are_refused(method):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["encoders"]["image"]["peft"] = {"method": method}
    raw["encoders"]["image"]["quantization"] = {"bits": 4}
    got = problems(raw)
    assert any(p.startswith(f"encoders.image.quantization: method {method!r} does not run on a 4/8-bit quantized base; "
                            "remove the quantization or choose") and "vera" in p for p in got), got


def test_cli_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["encoders"]["image"]["peft"] = {"method": "lora", "rank": 0}
    bad.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "encoders.image.peft.rank: must be a positive integer" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "recipe file not found" in res.output


def test_shipped_recipes_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml")):
        load_recipe(path)


def test_fusion_modalities_must_be_encoders_of_the_recipe():
    """Heads that name a modality (cross_attention.query, hadamard.attend) are checked
    when the recipe loads, with the other problems, not when the head is built."""
    assert problems(BASE, ["fusion={type: hadamard, attend: [audio]}", "train.epochs=0"]) == [
        "train.epochs: must be a positive integer (got 0)",
        "fusion.attend: 'audio' is not an encoder of this recipe (have: text, image)",
    ]
    assert problems(BASE, ["fusion={type: hadamard, attend: [image, text]}"]) == [
        "fusion.attend: at least one modality must stay pooled to guide the attention; list fewer modalities"]
    assert problems(BASE, ["fusion={type: cross_attention, query: txt}"]) == [
        "fusion.query: 'txt' is not an encoder of this recipe (have: text, image)"]
    assert load_recipe(BASE, ["fusion={type: hadamard, attend: [image], glimpses: 2}"]).fusion == {
        "type": "hadamard", "hidden_size": 256, "dropout": 0.1, "attend": ["image"], "glimpses": 2}
