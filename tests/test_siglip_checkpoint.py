"""Both towers of one SigLIP checkpoint: the contrastive task with the sigmoid loss starts
from the checkpoint's logit scale and bias (its towers' pooled outputs are the embeddings,
so the projections start as the identity), its text tower reads fixed-length texts as it
was trained, and the adapted model at initialisation scores pairs exactly as the
checkpoint does; then it trains, evaluates and merges like any other."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.errors import RecipeError
from tests.test_clip_checkpoint import built, clip_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def siglip_dir(assets, tmp_path_factory):
    """A tiny random SigLIP (text tower with its head, vision tower with attention pooling,
    logit scale 15 and bias -3) with a word-piece tokenizer, texts of 16 positions."""
    from transformers import BertTokenizer, SiglipConfig, SiglipModel

    directory = tmp_path_factory.mktemp("siglip_full")
    tokenizer = BertTokenizer.from_pretrained(str(assets["bert"]))
    torch.manual_seed(11)
    config = SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         vocab_size=tokenizer.vocab_size, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
                           patch_size=8))
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(15.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return directory


def siglip_recipe(siglip_dir, files, out, **task):
    return clip_recipe(siglip_dir, files, out, **{"projection_dim": 32, "loss": "sigmoid", **task})


def test_the_model_starts_as_the_siglip_checkpoint_scores_pairs(siglip_dir, assets, tmp_path):
    from transformers import SiglipModel

    model, task = built(siglip_recipe(siglip_dir, assets["data"], tmp_path))
    assert task.from_checkpoint == str(siglip_dir)
    assert float(model.head.scale()) == pytest.approx(15.0) and float(model.head.logit_bias) == -3.0
    texts = ["what color is the shape ?", "is there a red shape ?", "a blue circle"]
    images = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0), (9, 9, 9))]
    text_enc, image_enc = model.encoders["text"], model.encoders["image"]
    tokens = text_enc.preprocess(texts)
    assert tokens["input_ids"].shape == (3, 16)  # padded to the tower's positions, not to the longest text
    pixels = torch.stack([image_enc.pixels(im) for im in images])
    with torch.no_grad():
        a = model.head.project("text", text_enc(tokens).pooled)
        b = model.head.project("image", image_enc({"pixel_values": pixels}).pooled)
        ours = model.head.logits(a, b)
        # SigLIP's processor gives no attention mask: the tower attends to its padding, as trained
        reference = SiglipModel.from_pretrained(siglip_dir).eval()(input_ids=tokens["input_ids"], pixel_values=pixels)
    assert torch.allclose(ours, reference.logits_per_text, atol=1e-5), (ours - reference.logits_per_text).abs().max()


def test_siglip_head_needs_the_sigmoid_loss_and_its_width(siglip_dir, assets, tmp_path):
    with pytest.raises(RecipeError, match=r"task.loss: softmax, but the siglip checkpoint .* set task.loss: sigmoid"):
        built(siglip_recipe(siglip_dir, assets["data"], tmp_path, loss="softmax"))
    with pytest.raises(RecipeError, match=r"task.projection_dim: 8, but the siglip checkpoint .* projects to 32"):
        built(siglip_recipe(siglip_dir, assets["data"], tmp_path, projection_dim=8))
    with pytest.raises(RecipeError, match=r"task.max_logit_scale: 10, but the siglip checkpoint .* logit scale of 15"):
        built(siglip_recipe(siglip_dir, assets["data"], tmp_path, max_logit_scale=10))
    model, task = built(siglip_recipe(siglip_dir, assets["data"], tmp_path, projection_dim=8, checkpoint_head=False))
    assert task.from_checkpoint is None and float(model.head.logit_bias) == -10.0


def test_a_siglip_recipe_trains_evaluates_and_merges(siglip_dir, assets, tmp_path):
    path = tmp_path / "siglip.yaml"
    path.write_text(yaml.safe_dump(siglip_recipe(siglip_dir, assets["data"], tmp_path / "out")))
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "starts from the identity projections, logit scale and bias of the siglip checkpoint" in res.output
    bundle = tmp_path / "out" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    from transformers import AutoModel, SiglipTextModel

    # a SigLIP text tower alone has no AutoModel entry: it loads with its own class
    assert not any("lora" in n for n, _ in SiglipTextModel.from_pretrained(tmp_path / "merged" / "encoders" / "text" / "base").named_parameters())
    assert type(AutoModel.from_pretrained(tmp_path / "merged" / "encoders" / "image" / "base")).__name__ == "SiglipVisionModel"
    from mmpeft.inference import evaluate_bundle

    assert evaluate_bundle(tmp_path / "merged")["max_abs_diff"] < 1e-4
    assert json.dumps(metrics).count("logit_bias") >= 1


def test_dry_run_memory_counts_the_positions_siglip_pads_to(siglip_dir, assets, tmp_path):
    """Every SigLIP text is 16 positions here whatever max_length says: the estimate too."""
    from mmpeft.memory import estimate_training_memory

    estimates = []
    for length in (4, 12):
        raw = siglip_recipe(siglip_dir, assets["data"], tmp_path)
        raw["encoders"]["text"]["max_length"] = length
        model, _ = built(raw)
        assert model.encoders["text"].fixed_length == 16
        estimates.append(estimate_training_memory(model.encoders["text"], load_recipe(raw)))
    assert estimates[0] == estimates[1]
