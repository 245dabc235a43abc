"""Both towers of one CLIP checkpoint: the contrastive task starts from the checkpoint's own
projections and logit scale, so the adapted model at initialisation scores image-text pairs
exactly as the checkpoint does; then it trains, evaluates, merges like any other."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.errors import RecipeError
from tests import tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def clip_dir(assets, tmp_path_factory):
    """A tiny random CLIP (text + vision towers, projections, logit scale) with a word-piece tokenizer."""
    from transformers import BertTokenizer, CLIPConfig, CLIPModel

    directory = tmp_path_factory.mktemp("clip_full")
    tokenizer = BertTokenizer.from_pretrained(str(assets["bert"]))
    torch.manual_seed(7)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         vocab_size=tokenizer.vocab_size, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
                           patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return directory


def clip_recipe(clip_dir, files, out, **task):
    raw = tiny.recipe_dict(clip_dir, clip_dir, files, out, epochs=1)
    raw["encoders"]["text"]["modality"] = "text"  # a CLIP folder is read as its image tower unless told
    raw["task"] = {"type": "contrastive", "projection_dim": 16, **task}
    return raw


def built(raw):
    from mmpeft.model import build_model
    from mmpeft.tasks import recipe_task_set

    rec = load_recipe(raw)
    tasks = recipe_task_set(rec, [])
    return build_model(rec, tasks), tasks["answer"]


def test_the_model_starts_as_the_checkpoint_scores_pairs(clip_dir, assets, tmp_path):
    from transformers import CLIPModel

    model, task = built(clip_recipe(clip_dir, assets["data"], tmp_path))
    assert task.from_checkpoint == str(clip_dir)
    texts = ["what color is the shape ?", "is there a red shape ?", "a blue circle"]
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (9, 9, 9)]
    images = [Image.new("RGB", (32, 32), c) for c in colors]
    text_enc, image_enc = model.encoders["text"], model.encoders["image"]
    inputs = {"text": text_enc.preprocess(texts)}
    pixels = torch.stack([image_enc.pixels(im) for im in images])
    with torch.no_grad():
        a = model.head.project("text", model.encoders["text"](inputs["text"]).pooled)
        b = model.head.project("image", model.encoders["image"]({"pixel_values": pixels}).pooled)
        ours = model.head.scale() * a @ b.T
        reference = CLIPModel.from_pretrained(clip_dir).eval()(
            input_ids=inputs["text"]["input_ids"], attention_mask=inputs["text"]["attention_mask"], pixel_values=pixels)
    assert ours.shape == (3, 4)
    assert torch.allclose(ours, reference.logits_per_text, atol=1e-5), (ours - reference.logits_per_text).abs().max()
    assert float(model.head.logit_scale) == pytest.approx(3.0)


def test_projection_width_must_match_or_be_declined(clip_dir, assets, tmp_path):
    with pytest.raises(RecipeError, match=r"task.projection_dim: 8, but the clip checkpoint .* projects to 16"):
        built(clip_recipe(clip_dir, assets["data"], tmp_path, projection_dim=8))
    model, task = built(clip_recipe(clip_dir, assets["data"], tmp_path, projection_dim=8, checkpoint_head=False))
    assert task.from_checkpoint is None and model.head.projections["text"].weight.shape == (8, 32)


def test_a_clip_recipe_trains_evaluates_and_merges(clip_dir, assets, tmp_path):
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(clip_recipe(clip_dir, assets["data"], tmp_path / "out")))
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "starts from the projections and logit scale of the clip checkpoint" in res.output
    bundle = tmp_path / "out" / "tiny"
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(tmp_path / "merged" / "encoders" / "text" / "base")).__name__ == "CLIPTextModel"
    from mmpeft.inference import evaluate_bundle

    assert evaluate_bundle(tmp_path / "merged")["max_abs_diff"] < 1e-4  # the merged towers load as plain CLIP towers


def test_a_checkpoint_at_its_clamp_starts_at_the_cap(clip_dir, assets, tmp_path):
    """Trained CLIPs store their logit scale at the clamp, a hair above ln 100 (open_clip's
    4.6052): that starts at the cap; a scale clearly above the cap is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    for stored, accepted in ((4.6052, True), (4.7, False)):
        copy = tmp_path / f"clip_{stored}"
        shutil.copytree(clip_dir, copy)
        weights = load_file(copy / "model.safetensors")
        weights["logit_scale"] = torch.tensor(stored)
        save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
        if accepted:
            model, task = built(clip_recipe(copy, assets["data"], tmp_path))
            assert task.from_checkpoint == str(copy) and float(model.head.scale()) == pytest.approx(100.0, rel=1e-6)
        else:
            with pytest.raises(RecipeError, match=r"task.max_logit_scale: 100, but the clip checkpoint .* logit scale of 109.9"):
                built(clip_recipe(copy, assets["data"], tmp_path))
