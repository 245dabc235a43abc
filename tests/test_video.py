"""Video as a fourth modality: decoding (sampling, short clips, bad files named), the frame
cache, every method on a video encoder (the image encoder's trainable set, identity at
init), the temporal components' order sensitivity and padding, the generated moving-shapes
data, and a tiny video bundle through finetune / evaluate / predict / inspect / merge /
export / serve."""

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.config.schema import VideoConfig
from mmpeft.data.batching import ImageStore
from mmpeft.data.video import BadVideo, read_video, sample_positions, video_info, write_clip
from mmpeft.encoders import build_encoder
from mmpeft.encoders.base import EncoderOutput
from mmpeft.encoders.video import build_temporal
from mmpeft.errors import RecipeError
from mmpeft.methods import METHODS, build_method
from tests.helpers import refuses
from tests.test_methods import expected_trainable

runner = CliRunner()


def grey_clip(path, count=12, fps=8, codec="ffv1", size=(40, 32)):
    """A clip whose frame i is grey level 20 * i (so a frame's index can be read back)."""
    write_clip(str(path), [np.full((size[1], size[0], 3), 20 * i, np.uint8) for i in range(count)], fps, codec)
    return path


def test_read_video_samples_uniformly_and_at_a_rate(tmp_path):
    for codec, name in (("ffv1", "c.mkv"), ("mpeg4", "c.mp4")):
        clip = grey_clip(tmp_path / name, codec=codec)
        info = video_info(str(clip))
        assert (info.width, info.height, info.fps) == (40, 32, 8.0) and info.seconds == pytest.approx(1.5)
        frames, times = read_video(str(clip), 4, 10.0)
        assert sample_positions(12, 4) == [1, 4, 7, 10]
        assert times == pytest.approx([0.125, 0.5, 0.875, 1.25])
        levels = [int(np.asarray(f)[..., 0].mean().round()) for f in frames]
        assert levels == pytest.approx([20, 80, 140, 200], abs=2)  # MPEG-4 is lossy by a level or so
        _, times = read_video(str(clip), 4, 10.0, fps=2)
        assert times == pytest.approx([0.0, 0.5, 1.0])  # one frame every half second; the clip ends at 1.5 s
        frames, _ = read_video(str(clip), 20, 10.0)
        assert len(frames) == 12  # a clip shorter than `frames` keeps every frame
        _, times = read_video(str(clip), 8, 0.5)
        assert times == pytest.approx([0.0, 0.125, 0.25, 0.375])  # only max_seconds is decoded
        frames, _ = read_video(str(clip), 2, 10.0, max_side=20)
        assert frames[0].size == (20, 16)


def test_bad_videos_are_named(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    clip = grey_clip(tmp_path / "good.mp4", codec="mpeg4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(clip[: len(clip) // 3])
    for name, why in (("empty.mp4", "empty file"), ("junk.mp4", "not a video file"), ("cut.mp4", "not a video file|could not be "
                                                                                                 "decoded|no frames")):
        with pytest.raises(BadVideo, match=why):
            read_video(str(tmp_path / name), 4, 10.0)
    with pytest.raises(BadVideo, match="not a regular file"):
        read_video(str(tmp_path), 4, 10.0)
    with pytest.raises(FileNotFoundError):
        video_info(str(tmp_path / "missing.mp4"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight clips of moving shapes written as files, and a manifest of them (video + question)."""
    from mmpeft.data.moving_shapes import make_clip
    import random

    folder = tmp_path_factory.mktemp("clips")
    rng, rows = random.Random(0), []
    for i, (color, direction) in enumerate([("red", "left"), ("blue", "right"), ("red", "up"), ("blue", "down")] * 2):
        write_clip(str(folder / f"{i}.mkv"), make_clip(rng, color, "circle", direction)[: 8 - (i % 3)], 8)
        rows.append({"video": f"{i}.mkv", "question": "what color is the shape?", "answer": color})
    manifest = folder / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"folder": folder, "manifest": manifest, "rows": rows}


def video_encoder(assets, kind="effnet", **video):
    return build_encoder(str(assets[kind]), modality="video", image_size=32, video=VideoConfig(frames=8, **video))


def test_frame_cache_equals_fresh_decoding_and_short_clips_are_masked(assets, clips):
    enc = video_encoder(assets)
    store = ImageStore.for_encoders([enc])
    paths = [str(clips["folder"] / r["video"]) for r in clips["rows"][:3]]
    tensors, keys = enc.batch("video", paths + paths[:1], store)
    assert keys == paths and tensors["row_index"].tolist() == [0, 1, 2, 0]
    assert tensors["frames"].tolist() == [8, 7, 6]  # clips of 8, 7 and 6 frames
    fresh = enc.preprocess([read_video(p, 8, 10.0, max_side=store.max_side)[0] for p in paths])
    assert torch.equal(fresh["pixel_values"], tensors["pixel_values"]) and torch.equal(fresh["frames"], tensors["frames"])
    again, _ = enc.batch("video", paths, store)
    assert torch.equal(again["pixel_values"], tensors["pixel_values"])
    out = enc({"pixel_values": tensors["pixel_values"], "frames": tensors["frames"]})
    assert out.tokens.shape[:2] == (3, 8) and out.mask.sum(1).tolist() == [8, 7, 6]
    # what lies past a clip's real frames changes nothing
    noisy = tensors["pixel_values"].clone()
    noisy[2, 6:] = torch.randn_like(noisy[2, 6:])
    assert torch.equal(enc({"pixel_values": noisy, "frames": tensors["frames"]}).pooled, out.pooled)
    # each frame's token is what the image encoder makes of that frame
    image = build_encoder(str(assets["effnet"]), image_size=32)
    with torch.no_grad():
        alone = image({"pixel_values": tensors["pixel_values"][1, :7]}).pooled
    assert torch.allclose(out.tokens[1, :7], alone, atol=1e-5)


@pytest.mark.parametrize("kind", ["effnet", "vit"])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_on_a_video_encoder(assets, clips, kind, method):
    """The same trainable set as on the image encoder, and the video encoder's output unchanged at init."""
    enc = video_encoder(assets, kind)
    m = build_method({"method": method})
    if refuses(build_encoder(str(assets[kind])), method):
        with pytest.raises(RecipeError, match="not available for"):
            m.attach(enc)
        return
    store = ImageStore.for_encoders([enc])
    tensors, _ = enc.batch("video", [str(clips["folder"] / r["video"]) for r in clips["rows"][:2]], store)
    with torch.no_grad():
        before = enc(tensors)
    torch.manual_seed(0)
    m.attach(enc)
    image = build_encoder(str(assets[kind]))
    build_method({"method": method}).attach(image)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in image.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(method, [n for n, _ in enc.named_parameters()], kind)
    if m.identity_at_init:
        enc.eval()
        with torch.no_grad():
            after = enc(tensors)
        assert torch.allclose(after.pooled, before.pooled, atol=1e-5)


def test_temporal_components_see_order_and_ignore_padding():
    torch.manual_seed(0)
    tokens, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    for kind, ordered in (("mean", False), ("transformer", True), ("tdconv", True)):
        stage = build_temporal(VideoConfig(frames=6, temporal=kind, heads=2), 16).eval()
        with torch.no_grad():
            out = stage(EncoderOutput(tokens, mask, tokens.mean(1)))
            reversed_ = stage(EncoderOutput(tokens.flip(1), mask.flip(1), tokens.mean(1)))
            padded = tokens.clone()
            padded[1, 4:] = 100.0
            same = stage(EncoderOutput(padded, mask, tokens.mean(1)))
        changed = (out.pooled[0] - reversed_.pooled[0]).abs().max().item()
        assert (changed > 1e-3) == ordered, (kind, changed)
        assert torch.allclose(same.pooled, out.pooled, atol=1e-5), kind
    with pytest.raises(RecipeError, match="projects"):
        build_temporal(VideoConfig(temporal="mean", width=8), 16)
    with pytest.raises(RecipeError, match="must divide"):
        build_temporal(VideoConfig(temporal="transformer", width=10, heads=4), 16)


def test_a_video_encoder_reads_an_image_model(assets):
    with pytest.raises(RecipeError, match="reads text"):
        build_encoder(str(assets["bert"]), modality="video")


def test_moving_shapes_are_deterministic_and_balanced(tmp_path, monkeypatch):
    from mmpeft.data.moving_shapes import moving_shapes_caption_samples, moving_shapes_samples

    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path))
    rows = moving_shapes_samples("train", 48)
    assert len(rows) == 144 and {r.groups["question_type"] for r in rows} == {"direction", "color", "shape"}
    directions = [r.answer for r in rows if r.groups["question_type"] == "direction"]
    assert {d: directions.count(d) for d in set(directions)} == {"left": 12, "right": 12, "up": 12, "down": 12}
    first = [np.asarray(f) for f in read_video(rows[0].video, 8, 10.0)[0]]
    for path in (tmp_path / "moving_shapes").rglob("*.mkv"):
        path.unlink()
    (tmp_path / "moving_shapes" / "v1-48" / "train" / "done").unlink()
    again = moving_shapes_samples("train", 48)  # written again, the same
    assert [r.video for r in again] == [r.video for r in rows]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, read_video(again[0].video, 8, 10.0)[0]))
    captions = moving_shapes_caption_samples("test", 48)
    assert len(captions) == 24 and captions[0].text.startswith("a ") and " moves " in captions[0].text


def video_recipe(assets, clips, tmp_path, temporal="transformer", method="lora"):
    raw = {"name": "tiny_video",
           "encoders": {"text": {"model": str(assets["bert"]), "max_length": 16, "peft": {"method": "none"}},
                        "video": {"model": str(assets["effnet"]), "modality": "video", "image_size": 32,
                                  "video": {"frames": 8, "temporal": temporal, "width": 16, "heads": 2, "layers": 1},
                                  "peft": {"method": method, "rank": 4, "alpha": 8} if method == "lora" else {"method": method}}},
           "fusion": {"type": "concat", "hidden_size": 16, "dropout": 0.0}, "task": {"type": "vqa"},
           "data": {"source": "manifest", "train": str(clips["manifest"]), "test": str(clips["manifest"]), "eval_fraction": 0.25},
           "train": {"epochs": 2, "batch_size": 4, "lr": 5e-3, "head_lr": 5e-3, "log_every": 1},
           "output": {"dir": str(tmp_path / "out"), "plots": False}}
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_video_bundle_trains_evaluates_predicts_merges_exports_serves(assets, clips, tmp_path):
    recipe = video_recipe(assets, clips, tmp_path)
    res = runner.invoke(app, ["finetune", str(recipe)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "out" / "tiny_video"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["encoders"]["video"]["modality"] == "video"
    from safetensors import safe_open

    with safe_open(str(bundle / "head.safetensors"), "pt") as f:  # the temporal transformer trains with the heads
        assert any(k.startswith("temporal.video.") for k in f.keys())
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    clip = clips["folder"] / "0.mkv"
    res = runner.invoke(app, ["predict", str(bundle), "--video", str(clip), "--question", "what color is the shape?"])
    assert res.exit_code == 0 and res.output.split()[0] in ("red", "blue"), res.output
    missing = runner.invoke(app, ["predict", str(bundle), "--question", "what color is the shape?"])
    assert missing.exit_code == 2 and "--video" in missing.output
    out = tmp_path / "predictions.jsonl"
    res = runner.invoke(app, ["predict", str(bundle), "--input", str(clips["manifest"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    first = json.loads(out.read_text().splitlines()[0])
    assert first["video"] == "0.mkv" and first["prediction"] in ("red", "blue")
    assert runner.invoke(app, ["inspect", str(bundle)]).exit_code == 0
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["folded"]["video"] == "lora" and report["max_abs_logit_diff"] <= 1e-5
    res = runner.invoke(app, ["export", str(bundle), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    export = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert "video.pixel_values" in export["inputs"] and export["onnx_max_abs_diff"] <= 1e-4
    serve_video(bundle, clip, tmp_path)


def serve_video(bundle, clip, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmpeft.serve.app import ServeSettings, create_app
    from mmpeft.serve.pool import AdapterPool

    pool = AdapterPool({"v": bundle}, log=lambda m: None)
    expected = runner.invoke(app, ["predict", str(bundle), "--video", str(clip), "--question", "what color is the shape?"])
    with TestClient(create_app(pool, ServeSettings())) as client:
        assert client.get("/bundles").json()["bundles"][0]["inputs"] == ["text", "video"]
        res = client.post("/predict", files={"video": ("c.mkv", clip.read_bytes(), "video/x-matroska")},
                          data={"question": "what color is the shape?", "top_k": "1"})
        assert res.status_code == 200, res.text
        assert res.json()["answer"] == expected.output.split()[0]
        bad = client.post("/predict", files={"video": ("c.mp4", b"junk" * 100, "video/mp4")},
                          data={"question": "what color is the shape?", "top_k": "1"})
        assert bad.status_code == 415 and bad.json()["field"] == "video"
        none = client.post("/predict", data={"question": "what color is the shape?", "top_k": "1"})
        assert none.status_code == 422 and "video is required" in none.json()["error"]


def test_bad_video_row_is_named_or_skipped(assets, clips, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [dict(r, video=str(clips["folder"] / r["video"])) for r in clips["rows"]]
    (folder / "broken.mp4").write_bytes(b"junk" * 100)
    rows[3]["video"] = "broken.mp4"
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load(video_recipe(assets, clips, tmp_path, method="none").read_text())
    raw["data"].update(train=str(folder / "m.jsonl"), test=str(clips["manifest"]))
    raw["train"]["epochs"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 2 and "m.jsonl, row 4: not a video file" in res.output and "on_bad_video" in res.output, res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["finetune", str(path), "data.on_bad_video=skip"])
    assert res.exit_code == 0 and "data.on_bad_video=skip: skipped" in res.output, res.output
    assert load_recipe(path).encoders["video"].video.temporal == "transformer"


def test_bench_video_records_each_configuration_once(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    overrides = [f"encoders.video.model={assets['effnet']}", "encoders.video.image_size=32", f"encoders.text.model={assets['bert']}",
                 "encoders.video.video.width=16", "encoders.video.video.heads=2", "fusion.hidden_size=16", "data.clips=24",
                 "train.epochs=1", "train.batch_size=8"]
    out = tmp_path / "bench"
    args = ["bench", "video", "--out", str(out), "--seeds", "0", "--configs", "middle frame,temporal transformer", *overrides]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "video.json").read_text())
    assert [(r["config"], r["seed"]) for r in result["runs"]] == [("middle frame", 0), ("temporal transformer", 0)]
    assert all(0 <= r["direction"] <= 1 and r["epochs"] == 1 for r in result["runs"])
    assert result["decoding"]["frames_per_s"] > 0 and "| temporal transformer | 0 |" in (out / "video.md").read_text()
    again = runner.invoke(app, args)  # nothing is trained, or scored, twice
    assert again.exit_code == 0 and json.loads((out / "video.json").read_text())["runs"] == result["runs"]
    bad = runner.invoke(app, ["bench", "video", "--out", str(tmp_path / "b2"), "--configs", "middle", *overrides])
    assert bad.exit_code == 2 and "unknown" in bad.output
