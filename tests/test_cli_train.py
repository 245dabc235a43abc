"""End to end through the CLI on tiny local models: finetune, evaluate, predict, inspect,
reproducibility, tampered and mismatched bundles, 2-process runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from tests import tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One tiny LoRA-text + BitFit-image run through `mmpeft finetune`."""
    work = tmp_path_factory.mktemp("run")
    raw = tiny.recipe_dict(assets["bert"], assets["effnet"], assets["data"], work / "adapters",
                           text_method="lora", image_method="bitfit", epochs=3)
    raw["encoders"]["image"]["image_size"] = 32
    raw["output"]["plots"] = True
    recipe = work / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(recipe), "train.epochs=3"])
    assert res.exit_code == 0, res.output
    return {"recipe": recipe, "bundle": work / "adapters" / "tiny", "work": work}


def test_bundle_contents(trained):
    b = trained["bundle"]
    names = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    assert {"manifest.json", "recipe.yaml", "head.safetensors", "metrics.json", "train_log.jsonl", "README.md",
            "encoders/text/adapter_config.json", "encoders/text/adapter_model.safetensors",
            "encoders/image/weights.safetensors", "training_curves.png", "group_accuracy.png"} <= names
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["encoders"]["text"]["method"] == "lora" and manifest["encoders"]["image"]["method"] == "bitfit"
    # the card's usage lines name the final folder, not the temporary one it was written in
    card = (b / "README.md").read_text()
    assert "mmpeft predict tiny --image" in card and 'load_bundle("tiny")' in card and ".tmp" not in card
    assert set(manifest["versions"]) == {"mmpeft", "torch", "transformers", "peft"}
    assert manifest["vocabulary"] == sorted(manifest["vocabulary"], key=lambda a: manifest["vocabulary"].index(a))
    assert {"red", "green", "blue", "yes", "no"} == set(manifest["vocabulary"])
    log = [json.loads(line) for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # only trained parameters are stored: the bitfit file holds exactly the image biases
    from safetensors.torch import load_file

    biases = load_file(str(b / "encoders/image/weights.safetensors"))
    assert biases and all(k.endswith(".bias") for k in biases)


def test_evaluate_reproduces_exactly(trained):
    res = runner.invoke(app, ["evaluate", str(trained["bundle"])])
    assert res.exit_code == 0, res.output
    assert "reproduced" in res.output


def test_same_seed_same_metrics(trained, assets):
    again = trained["work"] / "again"
    res = runner.invoke(app, ["finetune", str(trained["recipe"]), "train.epochs=3", f"output.dir={again}"])
    assert res.exit_code == 0, res.output
    a = json.loads((trained["bundle"] / "metrics.json").read_text())
    b = json.loads((again / "tiny" / "metrics.json").read_text())
    assert a["test"] == b["test"]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_existing_bundle_is_not_overwritten(trained):
    res = runner.invoke(app, ["finetune", str(trained["recipe"])])
    assert res.exit_code == 2 and "already exists" in res.output  # invalid input: exit 2


def test_predict_preprocesses_like_evaluate(trained, tmp_path):
    """A large image is downsized the way training and `evaluate` downsize it, so predict's
    probabilities are the ones evaluate scored (not a second, differently resized copy)."""
    import numpy as np
    import torch
    from PIL import Image

    from mmpeft.data.batching import Collator, ImageStore
    from mmpeft.data.samples import Sample
    from mmpeft.inference import Predictor

    path = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)).save(path)
    predictor = Predictor(trained["bundle"])
    got = predictor.predict([str(path)], ["what color is the shape ?"], top_k=3)[0]["top_k"]
    model = predictor.model
    training_store = ImageStore.for_encoders(model.encoders.values())
    image_encoder = model.encoders["image"]
    assert torch.equal(image_encoder.pixels(predictor.store.get(str(path))), image_encoder.pixels(training_store.get(str(path))))
    rows = [Sample(str(path), "what color is the shape ?", "", {}, "row 1")]
    batch = Collator(rows, dict(model.encoders.items()), predictor.tasks, training_store)([0])
    with torch.no_grad():
        probs = model.logits(batch["inputs"]).float().softmax(-1)[0]
    top = probs.topk(3)
    assert [r["answer"] for r in got] == [predictor.vocab.answers[i] for i in top.indices.tolist()]
    assert [r["probability"] for r in got] == [round(p, 6) for p in top.values.tolist()]


def test_predict_single_and_manifest(trained, assets):
    data = Path(assets["data"]["test"]).parent
    res = runner.invoke(app, ["predict", str(trained["bundle"]), "--image", str(data / "images/test_1.png"),
                              "--question", "what color is the shape ?", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    out = trained["work"] / "preds.jsonl"
    res = runner.invoke(app, ["predict", str(trained["bundle"]), "--input", str(assets["data"]["test"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24
    assert all(abs(sum(t["probability"] for t in r["top_k"])) <= 1.0 + 1e-6 for r in rows)
    assert all(r["prediction"] == r["top_k"][0]["answer"] for r in rows)
    assert all(r["probability"] == r["top_k"][0]["probability"] for r in rows)
    # every input column is kept as it was: the gold answer, the image path as written
    inputs = [json.loads(line) for line in Path(assets["data"]["test"]).read_text().splitlines()]
    assert [{k: r[k] for k in i} for r, i in zip(rows, inputs)] == inputs
    csv_out = trained["work"] / "preds.csv"
    res = runner.invoke(app, ["predict", str(trained["bundle"]), "--input", str(assets["data"]["test"]), "-o", str(csv_out)])
    assert res.exit_code == 0, res.output
    import csv

    table = list(csv.DictReader(csv_out.read_text().splitlines()))
    assert [r["answer"] for r in table] == [r["answer"] for r in rows]
    assert list(table[0]) == ["image", "question", "answer", "kind", "prediction", "probability", "top_k"]
    assert [r["prediction"] for r in table] == [r["prediction"] for r in rows]
    assert [json.loads(r["top_k"]) for r in table] == [r["top_k"] for r in rows]
    res = runner.invoke(app, ["predict", str(trained["bundle"]), "--image", "nope.png", "--question", "q"])
    assert res.exit_code == 2 and "file not found" in res.output and "Traceback" not in res.output


def test_inspect(trained):
    res = runner.invoke(app, ["inspect", str(trained["bundle"])])
    assert res.exit_code == 0, res.output
    assert "lora" in res.output and "bitfit" in res.output and "head.safetensors" in res.output
    # piped into a narrow terminal: numbers and hashes whole (they were cut to `22,786,9…`, `sha256:9…`)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmpeft.cli", "inspect", str(trained["bundle"])], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "60"})
    manifest = json.loads((trained["bundle"] / "manifest.json").read_text())
    assert proc.returncode == 0, proc.stderr
    for e in manifest["encoders"].values():
        assert f"{e['total_parameters']:,}" in proc.stdout and e["fingerprint"] in proc.stdout


def test_tampered_bundle_is_refused(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained["bundle"], copy)
    head = copy / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    res = runner.invoke(app, ["evaluate", str(copy)])
    assert res.exit_code == 2 and "does not match the hash in manifest.json" in res.output
    shutil.rmtree(copy)
    shutil.copytree(trained["bundle"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["head"]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["inspect", str(copy)])
    assert res.exit_code == 2 and "was edited after it was written" in res.output  # its own integrity hash
    from mmpeft.files import json_fingerprint

    manifest.pop("integrity")
    manifest["integrity"] = json_fingerprint(manifest)  # a forger recomputes it: the path is still refused
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["inspect", str(copy)])
    assert res.exit_code == 2 and "outside the bundle" in res.output


def test_pickle_is_never_read(trained, tmp_path):
    """A bundle whose weights were swapped for a pickle is rejected before torch.load could run."""
    import pickle

    copy = tmp_path / "pickled"
    shutil.copytree(trained["bundle"], copy)
    target = copy / "encoders/image/weights.safetensors"
    target.write_bytes(pickle.dumps({"x": 1}))
    from mmpeft.files import seal

    seal(copy)  # even with hashes fixed up, the file is not valid safetensors
    res = runner.invoke(app, ["evaluate", str(copy)])
    assert res.exit_code == 2 and "not a valid safetensors file" in res.output


def test_base_mismatch_refused_unless_allowed(trained, assets, tmp_path):
    other = tmp_path / "bert2"
    shutil.copytree(assets["bert"], other)
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(other))
    with __import__("torch").no_grad():
        m.embeddings.word_embeddings.weight.add_(0.01)
    m.save_pretrained(str(other))
    res = runner.invoke(app, ["evaluate", str(trained["bundle"]), f"encoders.text.model={other}"])
    assert res.exit_code == 2 and "fingerprint" in res.output and "--allow-base-mismatch" in res.output
    from mmpeft import load_bundle

    loaded = load_bundle(trained["bundle"], overrides=[f"encoders.text.model={other}"], allow_base_mismatch=True)
    assert loaded.model is not None


def test_dry_run_prints_methods(trained):
    res = runner.invoke(app, ["finetune", str(trained["recipe"]), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "query x2, value x2" in res.output and "bitfit" in res.output and "trainable" in res.output


# Two CPU processes through torch's own launcher (accelerate's `launch --cpu` starts one
# process unless MPI is set up); accelerate reads the launcher's RANK / WORLD_SIZE and uses gloo.
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "mmpeft.cli", "finetune"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
def test_two_process_run_scores_every_test_row_once(assets, tmp_path):
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "adapters", epochs=2)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = TWO_PROCESSES + [str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bundle = tmp_path / "adapters" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["test"]["count"] == 24  # every test row scored once across the two processes
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0, res.output


def test_share_round_trip(trained, tmp_path):
    """train tiny -> push to a local hub -> pull into a fresh directory -> identical predictions."""
    import tarfile

    hub = tmp_path / "hub"
    res = runner.invoke(app, ["push", str(trained["bundle"]), "alice/tiny-vqa", "--hub-dir", str(hub)])
    assert res.exit_code == 0, res.output
    fresh = tmp_path / "fresh"
    res = runner.invoke(app, ["pull", "alice/tiny-vqa", "--hub-dir", str(hub), "--out", str(fresh)])
    assert res.exit_code == 0, res.output
    from mmpeft.inference import Predictor

    images = [str(p) for p in sorted((Path(tiny_data_dir(trained)) / "images").glob("test_*.png"))[:6]]
    questions = ["what color is the shape ?"] * len(images)
    a = Predictor(trained["bundle"]).predict(images, questions, top_k=3)
    b = Predictor(fresh).predict(images, questions, top_k=3)
    assert [r["top_k"] for r in a] == [r["top_k"] for r in b]
    # a .tar.gz of a bundle pulls too; an archive escaping its directory is refused
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(trained["bundle"], arcname="tiny")
    res = runner.invoke(app, ["pull", str(archive), "--out", str(tmp_path / "from_tar")])
    assert res.exit_code == 0, res.output
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(trained["bundle"] / "manifest.json", arcname="../escape.json")
    res = runner.invoke(app, ["pull", str(evil), "--out", str(tmp_path / "evil")])
    assert res.exit_code == 2 and "outside the archive" in res.output
    assert not (tmp_path / "escape.json").exists()


def tiny_data_dir(trained) -> Path:
    recipe = yaml.safe_load(Path(trained["recipe"]).read_text())
    return Path(recipe["data"]["train"]).parent


def test_classification_task(assets, tmp_path):
    """task.type=classification: a label per image+text pair, through the same path."""
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "adapters", epochs=1)
    raw["task"] = {"type": "classification", "metric": "macro_f1"}
    raw["data"]["label_field"] = "kind"
    recipe = tmp_path / "cls.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(recipe)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "adapters" / "tiny" / "manifest.json").read_text())
    assert manifest["task"] == "classification" and sorted(manifest["vocabulary"]) == ["color", "yes/no"]


def test_frozen_feature_cache_matches_uncached(assets, tmp_path):
    import mmpeft
    from mmpeft.config import load_recipe

    results = []
    for cache in (True, False):
        raw = tiny.recipe_dict(assets["bert"], assets["effnet"], assets["data"], tmp_path / f"c{cache}", text_method="none",
                               image_method="none", epochs=3, cache_frozen_features=cache)
        raw["encoders"]["image"]["image_size"] = 32
        bundle = mmpeft.finetune(load_recipe(raw))
        results.append(json.loads((bundle / "metrics.json").read_text()))
    cached, plain = results
    assert [round(r["train_loss"], 4) for r in cached["history"]] == [round(r["train_loss"], 4) for r in plain["history"]]
    assert cached["test"]["accuracy"] == plain["test"]["accuracy"]


def test_bf16_bundle_is_scored_under_its_autocast(assets, tmp_path):
    # evaluate/predict once scored every bundle in float32, so a bf16-trained model could
    # not reproduce its own test loss; they now use the autocast it was trained under
    import torch

    from mmpeft.inference import Predictor, evaluate_bundle

    from accelerate import Accelerator

    Accelerator(cpu=True)  # an earlier float32 run in this process: accelerate once refused a bf16 one after it
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path, mixed_precision="bf16")
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(recipe)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "tiny"
    result = evaluate_bundle(bundle)
    assert result["metrics"]["answer"]["loss"] == result["stored"]["answer"]["loss"] and result["max_abs_diff"] == 0.0

    predictor = Predictor(bundle)
    image, question = str(assets["data"]["test"].parent / "images/test_1.png"), "what color is the shape ?"
    probs = predictor.predict([image], [question], top_k=3)[0]["top_k"]
    from mmpeft.data.batching import Collator
    from mmpeft.data.samples import Sample

    rows = [Sample(image, question, "", {}, "input 1")]  # the same preprocessing as predict
    inputs = Collator(rows, dict(predictor.model.encoders.items()), predictor.tasks, predictor.store)([0])["inputs"]
    with torch.no_grad():
        fp32 = predictor.model.logits(inputs).float().softmax(-1)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = predictor.model.logits(inputs).float().softmax(-1)[0]
    assert not torch.equal(fp32, bf16)
    for entry in probs:
        index = predictor.vocab.answers.index(entry["answer"])
        assert entry["probability"] == round(bf16[index].item(), 6)


def test_plots_without_a_validation_split(tmp_path):
    """With no validation split the curves figure is the loss alone, not an empty accuracy
    panel beside it; with one, both panels."""
    from PIL import Image

    from mmpeft.report import save_plots

    test = {"accuracy": 0.5, "groups": {"kind": {"a": {"accuracy": 0.4, "count": 10}, "b": {"accuracy": 0.6, "count": 10}}}}
    history = [{"epoch": e, "train_loss": 2.0 / e} for e in (1, 2, 3)]
    assert save_plots(tmp_path, history, test, ["kind"]) == ["training_curves.png", "group_accuracy.png"]
    assert Image.open(tmp_path / "training_curves.png").size == (550, 400)
    for row in history:
        row.update(eval_accuracy=0.5, eval_loss=1.0, **{"eval_kind=a": 0.4})
    save_plots(tmp_path, history, test, ["kind"])
    assert Image.open(tmp_path / "training_curves.png").size == (1000, 400)


def test_every_command_exits_2_on_bad_input(trained, tmp_path):
    """Input the user can fix exits 2 with one message and no traceback, whatever the command."""
    bundle = str(trained["bundle"])
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        ["validate", str(tmp_path / "nope.yaml")],
        ["finetune", str(trained["recipe"]), "train.epoch=3"],
        ["evaluate", str(tmp_path / "no_bundle")],
        ["predict", bundle, "--image", "x.png"],  # no --question
        ["predict", bundle, "--image", "x.png", "--question", "q", "--top-k", "0"],
        ["inspect", str(tmp_path / "no_bundle")],
        ["merge", bundle, "--out", str(taken)],  # onto an existing folder
        ["export", bundle, "--format", "tflite", "--out", str(tmp_path / "e")],
        ["export", bundle, "--out", str(taken)],
        ["push", bundle, "not-a-repo-id", "--hub-dir", str(tmp_path / "hub")],
        ["pull", "/no/such/bundle"],
        ["bench", "methods", "--recipe", "recipes/quickstart.yaml", "--methods", "lroa", "--out", str(tmp_path / "b")],
        ["bench", "vqa-rad", "--recipe", "recipes/medical_vqa_15ep.yaml", "--seeds", "one", "--out", str(tmp_path / "b")],
        ["bench", "search", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "b")],
        ["bench", "quickstart", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "b")],
    ]
    for args in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.exit_code, res.output)
        assert "error:" in res.output and "Traceback" not in res.output, (args, res.output)
    assert list(taken.iterdir()) == []  # nothing written over the existing folder


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU processes")
def test_a_signal_to_one_process_stops_every_process_at_one_checkpoint(assets, tmp_path):
    """SIGTERM reaches process 0 of two only: both write the same checkpoint and exit (not
    process 1 training on into a collective process 0 has left); the resumed run finishes."""
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "adapters", epochs=2)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = TWO_PROCESSES + [str(recipe)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MMPEFT_KILL_AT="train.step#2", MMPEFT_KILL_SIGNAL="TERM", MMPEFT_KILL_RANK="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "stopped by SIGTERM" in out and "stopped with another process of this run" in out, out[-3000:]
    assert not (tmp_path / "adapters" / "tiny").exists()
    written = [p.name for p in (tmp_path / "adapters" / ".checkpoints" / "tiny").iterdir()]
    assert len(written) == 1 and written[0].endswith("-s00000002"), (written, out[-3000:])  # one checkpoint, at step 2
    env = {k: v for k, v in env.items() if not k.startswith("MMPEFT_KILL")}
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "resuming from" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads((tmp_path / "adapters" / "tiny" / "metrics.json").read_text())["test"]["count"] == 24


def test_report_to_mlflow_and_tensorboard_get_the_losses_and_validation_metrics(assets, tmp_path, monkeypatch):
    """train.report_to through accelerate's trackers: MLflow against a local file store (no server,
    no network) holds each epoch's validation accuracy as metrics.json does; TensorBoard writes its
    event file; a tracker whose package is missing stops the run before its data loads."""
    import importlib.util

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask for it
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "out", report_to=["mlflow", "tensorboard"])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    history = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())["history"]
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("mmpeft")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.data.params["train.lr"] == "0.005"
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(h["epoch"], pytest.approx(h["eval_accuracy"])) for h in history]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= len(history)
    assert list((tmp_path / "out" / ".runs" / "tiny").glob("events.out.tfevents.*"))
    if importlib.util.find_spec("wandb") is None:
        raw["train"]["report_to"] = ["wandb"]
        path.write_text(yaml.safe_dump(raw))
        res = CliRunner().invoke(app, ["finetune", str(path), "--overwrite"])
        assert res.exit_code == 2 and "pip install wandb" in res.output and "rows train" not in res.output, res.output
