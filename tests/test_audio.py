"""Audio as a third modality: reading clips, the log-mel front end against transformers'
reference implementation, the frame mask, bad files, FSDD, and three-modality runs
through the CLI (finetune, evaluate, predict, merge, export)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import AudioConfig
from mmpeft.data import BadAudio, fsdd_samples, read_audio
from mmpeft.encoders import build_encoder
from mmpeft.encoders.audio import frame_settings, log_mel, mel_filters
from tests import tiny

runner = CliRunner()
FSDD = Path(__file__).resolve().parents[2] / "shared" / "fsdd"


def test_read_audio_mixes_down_resamples_and_truncates(tmp_path):
    stereo = tiny.write_tone(tmp_path / "s.wav", 440.0, 0.5, rate=8000, channels=2)
    wave, cut = read_audio(str(stereo), 8000, 10.0)
    mono, _ = soundfile.read(str(stereo), dtype="float32")
    assert wave.shape == (4000,) and not cut and np.allclose(wave, mono.mean(axis=1), atol=1e-7)
    up, _ = read_audio(str(stereo), 16000, 10.0)
    assert up.shape == (8000,) and up.dtype == np.float32
    short, cut = read_audio(str(stereo), 8000, 0.25)
    assert short.shape == (2000,) and cut and np.array_equal(short, wave[:2000])


def test_bad_audio_files_are_named(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    soundfile.write(str(tmp_path / "zero.wav"), np.zeros(0, dtype=np.float32), 8000)
    (tmp_path / "folder.wav").mkdir()
    expected = {"empty.wav": "empty file", "text.wav": "not an audio file", "zero.wav": "zero length", "folder.wav": "not a regular file"}
    for name, why in expected.items():
        with pytest.raises(BadAudio, match=why):
            read_audio(str(tmp_path / name), 8000, 1.0)
    with pytest.raises(FileNotFoundError):
        read_audio(str(tmp_path / "missing.wav"), 8000, 1.0)


def test_log_mel_agrees_with_transformers(tmp_path):
    from transformers.audio_utils import spectrogram, window_function

    wave, _ = read_audio(str(tiny.write_tone(tmp_path / "t.wav", 700.0, 0.7)), 8000, 2.0)
    settings = AudioConfig(sample_rate=8000, n_mels=40, window_ms=32, hop_ms=8)
    window, hop, n_fft = frame_settings(settings)
    reference = spectrogram(wave.astype(np.float64), window_function(window, "hann", periodic=True), frame_length=window,
                            hop_length=hop, fft_length=n_fft, power=2.0, center=True, pad_mode="reflect",
                            mel_filters=mel_filters(n_fft, 40, 8000, 0.0, 4000.0).numpy().astype(np.float64),
                            mel_floor=1e-10, log_mel="dB")
    ours = log_mel(torch.from_numpy(wave), settings).numpy()
    assert ours.shape == reference.shape and np.abs(ours - reference).max() < 1e-3


def test_frames_past_a_clip_are_masked(assets):
    enc = build_encoder(str(assets["effnet_audio"])).eval()
    assert enc.modality == "audio" and enc.family.cnn_blocks  # the CNN's table row carries over
    rate = enc.audio.sample_rate
    short, full = np.full(rate // 4, 0.1, np.float32), np.full(3 * rate, 0.1, np.float32)
    batch = enc.preprocess([short, full])
    assert batch["frames"].tolist() == [1 + (rate // 4) // frame_settings(enc.audio)[1], enc.frames]  # the long one is cut
    with torch.no_grad():
        out = enc(batch)
    assert out.mask[1].all() and 0 < out.mask[0].sum() < out.mask[0].numel()
    masked = out.tokens[0][out.mask[0]].mean(0)
    assert torch.allclose(out.pooled[0], masked, atol=1e-6)


def three_modality_recipe(assets, tmp_path, audio_method="lora", fusion="gated", **data) -> Path:
    files = assets["audio_data"]
    raw = tiny.recipe_dict(assets["bert"], assets["effnet"], files, tmp_path / "out", fusion=fusion, epochs=2)
    raw["encoders"]["audio"] = {"model": str(assets["effnet_audio"]), "peft": {"method": audio_method},
                                "audio": {"sample_rate": 8000, "max_seconds": 0.5, "n_mels": 32}}
    raw["encoders"]["image"]["image_size"] = 32
    raw["task"] = {"type": "classification"}
    raw["data"].update(data)
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_three_modalities_train_evaluate_predict_merge_export(assets, tmp_path):
    recipe = three_modality_recipe(assets, tmp_path)
    dry = runner.invoke(app, ["finetune", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    for name in ("text", "image", "audio"):
        assert name in dry.output
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "longer than 0.5 s" in result.output  # the tiny set has clips of up to 0.6 s: counted, not silently cut
    bundle = tmp_path / "out" / "tiny"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {e["modality"] for e in manifest["encoders"].values()} == {"text", "image", "audio"}
    evaluated = runner.invoke(app, ["evaluate", str(bundle)])
    assert evaluated.exit_code == 0 and "reproduced" in evaluated.output, evaluated.output
    row = json.loads(assets["audio_data"]["test"].read_text().splitlines()[0])
    folder = assets["audio_data"]["test"].parent
    predicted = runner.invoke(app, ["predict", str(bundle), "--image", str(folder / row["image"]), "--question", row["question"],
                                    "--audio", str(folder / row["audio"])])
    assert predicted.exit_code == 0, predicted.output
    missing = runner.invoke(app, ["predict", str(bundle), "--image", str(folder / row["image"]), "--question", "what ?"])
    assert missing.exit_code == 2 and "--audio" in missing.output
    out = tmp_path / "predictions.jsonl"
    listed = runner.invoke(app, ["predict", str(bundle), "--input", str(assets["audio_data"]["test"]), "-o", str(out)])
    assert listed.exit_code == 0, listed.output
    first = json.loads(out.read_text().splitlines()[0])
    assert first["audio"] == row["audio"] and first["prediction"] == predicted.output.split()[0]
    merged = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-5 and report["folded"]["audio"] == "lora"
    # the merged audio encoder is a plain CNN folder that loads back as an audio encoder, without LoRA
    base = build_encoder(str(tmp_path / "merged" / "encoders" / "audio" / "base"))
    assert base.modality == "audio" and not any("lora" in n for n, _ in base.named_parameters())
    exported = runner.invoke(app, ["export", str(bundle), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert exported.exit_code == 0, exported.output
    export = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert "audio.input_features" in export["inputs"] and export["preprocessing"]["audio"]["audio"]["sample_rate"] == 8000


def test_bad_audio_row_is_named_or_skipped(assets, tmp_path):
    files = {k: Path(v) for k, v in assets["audio_data"].items()}
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    rows[3]["audio"] = "audio/nope.wav"
    broken = files["train"].parent / "broken_train.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = three_modality_recipe(assets, tmp_path, train=str(broken))
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 2 and "broken_train.jsonl, row 4: file not found" in result.output, result.output
    assert "data.on_bad_audio: skip" in result.output and "Traceback" not in result.output
    skipped = runner.invoke(app, ["finetune", str(recipe), "data.on_bad_audio=skip", "train.epochs=1"])
    assert skipped.exit_code == 0 and "skipped 1 row(s) with 1 bad audio file(s)" in skipped.output, skipped.output


def audio_only_recipe(assets, tmp_path) -> Path:
    """A recipe of one audio encoder over clips with their answer (no image, no question column)."""
    files = {k: Path(v) for k, v in assets["audio_data"].items()}
    for split in ("train", "test"):
        rows = [{"audio": r["audio"], "answer": r["answer"]} for r in map(json.loads, files[split].read_text().splitlines())]
        (files[split].parent / f"audio_only_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"name": "audio_only", "encoders": {"audio": {"model": str(assets["effnet_audio"]), "peft": {"method": "bitfit"},
                                                        "audio": {"sample_rate": 8000, "max_seconds": 0.6, "n_mels": 32}}},
           "fusion": {"type": "concat", "hidden_size": 16}, "task": {"type": "classification"},
           "data": {"train": str(files["train"].parent / "audio_only_train.jsonl"),
                    "test": str(files["train"].parent / "audio_only_test.jsonl"), "eval_fraction": 0.2},
           "train": {"epochs": 4, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2}, "output": {"dir": str(tmp_path / "out"), "plots": False}}
    recipe = tmp_path / "audio.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def test_audio_only_recipe_needs_no_image_or_text_column(assets, tmp_path):
    files = {k: Path(v) for k, v in assets["audio_data"].items()}
    recipe = audio_only_recipe(assets, tmp_path)
    assert runner.invoke(app, ["validate", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "audio_only" / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and 0 <= metrics["test"]["accuracy"] <= 100  # learning itself: test_methods' loops
    clip = files["test"].parent / "audio" / "test_0.wav"
    predicted = runner.invoke(app, ["predict", str(tmp_path / "out" / "audio_only"), "--audio", str(clip)])
    assert predicted.exit_code == 0 and predicted.output.split()[0] in tiny.TONES, predicted.output
    # the server takes the clip as an upload (multipart `audio`, or `audio_base64` in JSON) and
    # answers what predict answers; no image or question is asked of an audio-only bundle
    import base64

    from fastapi.testclient import TestClient

    from mmpeft.inference import Predictor
    from mmpeft.serve.app import create_app
    from mmpeft.serve.pool import AdapterPool

    expected = Predictor(tmp_path / "out" / "audio_only").predict([], [], top_k=3, audios=[str(clip)])[0]
    with TestClient(create_app(AdapterPool({"digits": tmp_path / "out" / "audio_only"}, log=lambda m: None))) as client:
        reply = client.post("/predict", files={"audio": ("clip.wav", clip.read_bytes(), "audio/wav")}, data={"top_k": "3"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["answer"] == expected["answer"] and reply.json()["top_k"] == expected["top_k"]
        again = client.post("/predict", json={"audio_base64": base64.b64encode(clip.read_bytes()).decode(), "top_k": 3})
        assert again.status_code == 200 and again.json()["top_k"] == expected["top_k"]
        missing = client.post("/predict", json={"top_k": 3})
        assert missing.status_code == 422 and "audio is required" in missing.json()["error"]
        bad = client.post("/predict", files={"audio": ("clip.wav", b"not audio at all", "audio/wav")})
        assert bad.status_code == 415 and "not an audio file" in bad.json()["error"]
        nan_wav = io.BytesIO()  # a float WAV of NaN samples: its own 415, before it could join (and fail) a batch
        soundfile.write(nan_wav, np.full(800, np.nan, dtype=np.float32), 8000, format="WAV", subtype="FLOAT")
        nan = client.post("/predict", files={"audio": ("nan.wav", nan_wav.getvalue(), "audio/wav")})
        assert nan.status_code == 415 and "not finite" in nan.json()["error"], nan.text
        assert client.get("/bundles").json()["bundles"][0]["inputs"] == ["audio"]  # the page shows only an audio input
    # push to a (local) hub and pull into a fresh folder: the audio bundle answers the same
    hub, fresh = tmp_path / "hub", tmp_path / "pulled"
    assert runner.invoke(app, ["push", str(tmp_path / "out" / "audio_only"), "alice/digits", "--hub-dir", str(hub)]).exit_code == 0
    res = runner.invoke(app, ["pull", "alice/digits", "--hub-dir", str(hub), "--out", str(fresh)])
    assert res.exit_code == 0, res.output
    assert Predictor(fresh).predict([], [], top_k=3, audios=[str(clip)])[0]["top_k"] == expected["top_k"]


@pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason="FSDD is not at ../shared/fsdd")
def test_fsdd_splits():
    train, test = fsdd_samples(str(FSDD))
    assert (len(train), len(test)) == (2700, 300)
    assert all(int(Path(s.audio).stem.split("_")[2]) < 5 for s in test)
    assert sorted({s.answer for s in test}) == [str(d) for d in range(10)]
    train, test = fsdd_samples(str(FSDD), ["theo"])
    assert len(test) == 500 and {s.groups["speaker"] for s in test} == {"theo"}
    assert "theo" not in {s.groups["speaker"] for s in train} and len(train) == 2500
    with pytest.raises(Exception, match="unknown FSDD speaker"):
        fsdd_samples(str(FSDD), ["nobody"])


HF_AUDIO = ["wav2vec2", "whisper", "ast", "clap"]
LORA_NAMES = {"clap": ("query", "value")}  # HTSAT blocks name their projections as BERT does
ARCH = {"ast": "audio-spectrogram-transformer", "clap": "clap_audio_model"}


@pytest.mark.parametrize("kind", HF_AUDIO)
def test_transformers_audio_encoder_trains_evaluates_predicts_merges_exports(assets, tmp_path, kind):
    """A tiny random Wav2Vec2 / Whisper / AST / CLAP (config -> save -> load through the real loader)
    with LoRA, on the audio rows through the CLI; the merged encoder is a plain transformers
    folder (AutoModel loads it, no LoRA left) and equals the unmerged one."""
    files = assets["audio_data"]
    raw = {"name": "hf_audio", "encoders": {"audio": {"model": str(assets[kind]), "audio": {"max_seconds": 0.5},
                                                      "peft": {"method": "lora", "rank": 4, "alpha": 8}}},
           "fusion": {"type": "concat", "hidden_size": 16, "dropout": 0.0}, "task": {"type": "classification"},
           "data": {"source": "manifest", "train": str(files["train"]), "test": str(files["test"]), "eval_fraction": 0.25},
           "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "head_lr": 5e-3, "log_every": 1},
           "output": {"dir": str(tmp_path / "out"), "plots": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    dry = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    q, v = LORA_NAMES.get(kind, ("q_proj", "v_proj"))
    assert dry.exit_code == 0 and f"{q} x2" in dry.output and f"{v} x2" in dry.output, dry.output
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "out" / "hf_audio"
    assert json.loads((bundle / "manifest.json").read_text())["encoders"]["audio"]["arch"] == ARCH.get(kind, kind)
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    clip = files["test"].parent / json.loads(files["test"].read_text().splitlines()[0])["audio"]
    res = runner.invoke(app, ["predict", str(bundle), "--audio", str(clip)])
    answer = [line for line in res.output.splitlines() if not line.startswith(("audio:", " "))]  # AST reads 0.32 s: a note
    assert res.exit_code == 0 and answer[0] in ("red", "green", "blue"), res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["folded"]["audio"] == "lora" and report["max_abs_logit_diff"] <= 1e-5
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(str(tmp_path / "merged" / "encoders" / "audio" / "base"))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    res = runner.invoke(app, ["export", str(bundle), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["onnx_max_abs_diff"] <= 1e-4


def test_waveform_pooling_ignores_padding(assets):
    """Wav2Vec2 pools only the frames a clip fills: the same clip padded to 0.5 s or to 2 s
    gives the same pooled vector (its extractor asks for the attention mask)."""
    from mmpeft.config import AudioConfig
    from mmpeft.encoders.hf_audio import HFAudioEncoder

    enc = build_encoder(str(assets["wav2vec2"])).eval()
    clip = (0.1 * np.random.default_rng(0).standard_normal(2000)).astype(np.float32)
    with torch.no_grad():
        long = enc(enc.preprocess([clip]))
        short_enc = HFAudioEncoder(enc.source, enc.model, enc.extractor, AudioConfig(max_seconds=0.5))
        short = short_enc(short_enc.preprocess([clip]))
    assert long.tokens.shape[1] > short.tokens.shape[1] and long.mask.sum() == short.mask.sum()
    assert torch.allclose(long.pooled, short.pooled, atol=1e-5), (long.pooled - short.pooled).abs().max()


def test_transformers_audio_encoder_quantized_4bit(assets, tmp_path):
    """A Wav2Vec2 (64 wide: bitsandbytes' CPU blocks) loaded in 4 bits trains LoRA and stays finite."""
    pytest.importorskip("bitsandbytes")
    from mmpeft.config import QuantizationConfig
    from mmpeft.methods import build_method
    from mmpeft.quant import quantized_layers

    directory = tiny.make_wav2vec2(tmp_path / "w64", hidden=64)
    enc = build_encoder(str(directory), quantization=QuantizationConfig(bits=4))
    assert quantized_layers(enc).get("Linear4bit", 0) > 0
    build_method({"method": "lora", "rank": 4, "alpha": 8}).apply(enc)
    clip = (0.1 * np.random.default_rng(0).standard_normal(4000)).astype(np.float32)
    out = enc(enc.preprocess([clip, clip[:2000]]))
    out.pooled.sum().backward()
    grads = [p.grad for n, p in enc.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def write_long_clips(directory: Path, seconds: dict[str, list[float]]) -> dict:
    """Tone clips of the given lengths per split, the colour in the pitch, as manifests."""
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    files = {}
    for offset, split in enumerate(seconds):
        rows = []
        for i, length in enumerate(seconds[split]):
            color = list(tiny.TONES)[i % 3]
            tiny.write_tone(directory / f"audio/{split}_{i}.wav", tiny.TONES[color], length, seed=1000 * offset + i)
            rows.append({"audio": f"audio/{split}_{i}.wav", "answer": color})
        files[split] = directory / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_clap_fusion_reads_the_whole_of_a_longer_clip(tmp_path):
    """A CLAP checkpoint with feature fusion gets the extractor's four-channel input for a clip
    longer than its 1-second window (the whole clip shrunk, three crops) with is_longer set,
    and pools exactly as the checkpoint's own audio tower does on that input; a shorter clip is
    one window repeated, is_longer unset. The crops are the same on every call, and numpy's
    global generator is left as it was."""
    from transformers import ClapFeatureExtractor, ClapModel

    from mmpeft.config import AudioConfig

    directory = tiny.make_clap(tmp_path / "fused", fusion=True)
    enc = build_encoder(str(directory), audio=AudioConfig(max_seconds=3.0)).eval()
    assert enc.fused and enc.audio.max_seconds == 3.0
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(20_000)).astype(np.float32)  # 2.5 s at 8 kHz
    short = long[:6000]
    state = np.random.get_state()
    inputs = enc.preprocess([long, short, long[:8100], long[:8200]])
    assert all(a is b or np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))
    assert enc.longer(inputs["frames"]).tolist() == [True, False, False, True]  # 8,100 samples: the window's 51 frames
    features = inputs["input_features"]
    assert features.shape == (4, 4, 51, 64)
    assert (features[0, 1:] - features[0, :1]).abs().amax((1, 2)).min() > 1.0  # the crops are not the global view
    assert torch.equal(features[1, 1:], features[1, :1].expand(3, -1, -1))
    assert torch.equal(enc.preprocess([long])["input_features"][0], features[0])
    extractor = ClapFeatureExtractor.from_pretrained(directory)
    reference = ClapModel.from_pretrained(directory).eval().audio_model
    with torch.no_grad():
        ours = enc(inputs).pooled
        for i, clip in enumerate([long, short]):
            np.random.seed(0)
            feats = extractor(clip, sampling_rate=8000, return_tensors="pt", truncation="fusion", padding="repeatpad")
            theirs = reference(input_features=feats["input_features"], is_longer=torch.tensor([[i == 0]])).pooler_output
            assert torch.allclose(ours[i], theirs[0], atol=1e-5), (ours[i] - theirs[0]).abs().max()
        first_window = enc(enc.preprocess([long[:8000]])).pooled[0]
    assert (ours[0] - first_window).abs().max() > 1e-3  # the fused input sees past the first window


def test_clap_fusion_recipe_trains_evaluates_predicts_merges_exports(tmp_path):
    """Clips of 0.4 to 2.5 s into a fused CLAP (1-second window) through the CLI: nothing is
    counted as cut below audio.max_seconds; evaluate reproduces, merge and export agree. The
    test clips (the export's probe) are all short: the exported graph must still answer long
    clips as PyTorch does (before the export's branch-free fusion it dropped the fusion)."""
    directory = tiny.make_clap(tmp_path / "fused", fusion=True)
    files = write_long_clips(tmp_path / "clips", {"train": [0.4, 2.5, 1.6, 0.8, 2.2, 1.2] * 3, "test": [0.4, 0.7, 0.9] * 2})
    raw = {"name": "fused", "encoders": {"audio": {"model": str(directory), "audio": {"max_seconds": 3.0},
                                                   "peft": {"method": "lora", "rank": 4, "alpha": 8}}},
           "fusion": {"type": "concat", "hidden_size": 16, "dropout": 0.0}, "task": {"type": "classification"},
           "data": {"source": "manifest", "train": str(files["train"]), "test": str(files["test"]), "eval_fraction": 0.25},
           "train": {"epochs": 2, "batch_size": 6, "lr": 5e-3, "head_lr": 5e-3, "log_every": 1},
           "output": {"dir": str(tmp_path / "out"), "plots": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0 and "cut" not in res.output.lower(), res.output
    bundle = tmp_path / "out" / "fused"
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    res = runner.invoke(app, ["predict", str(bundle), "--audio", str(files["train"].parent / "audio" / "train_1.wav")])
    assert res.exit_code == 0 and res.output.split()[0] in tiny.TONES, res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["max_abs_logit_diff"] <= 1e-5
    res = runner.invoke(app, ["export", str(bundle), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["onnx_max_abs_diff"] <= 1e-4


def test_fused_clap_gives_every_trainable_weight_a_gradient_without_a_long_clip(tmp_path):
    """DistributedDataParallel needs a gradient for every trainable weight at every step:
    a batch of short clips skips HTSAT's fusion branch, which still gets its (zero) gradient."""
    from mmpeft.config import AudioConfig

    enc = build_encoder(str(tiny.make_clap(tmp_path / "fused", fusion=True)), audio=AudioConfig(max_seconds=3.0)).train()
    enc.requires_grad_(True)  # full fine-tuning
    short = (0.1 * np.random.default_rng(0).standard_normal(6000)).astype(np.float32)
    inputs = enc.preprocess([short, short[:4000]])
    assert not enc.longer(inputs["frames"]).any()
    out = enc(inputs).pooled
    out.sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    fusion = [p for n, p in enc.named_parameters() if "fusion_model" in n or "mel_conv2d" in n]
    assert fusion and all(float(p.grad.abs().max()) == 0.0 for p in fusion)
    torch.manual_seed(0)
    touched = enc(inputs).pooled.detach()
    with torch.no_grad():  # the zero changes no output
        torch.manual_seed(0)
        assert torch.equal(enc(inputs).pooled, touched)
