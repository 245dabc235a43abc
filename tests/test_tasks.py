"""Task kinds: metrics against scikit-learn / SciPy, losses against hand computations, every
kind trained end to end through the CLI, multi-task recipes, and bad targets refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import TASK_SETTINGS, load_recipe
from mmpeft.errors import DataError, RecipeError
from mmpeft.tasks import TASKS, ContrastiveHead, build_task
from mmpeft.tasks.multilabel import average_precision, binary_auroc
from mmpeft.tasks.regression import pearson
from tests import tiny

COLORS = tiny.COLORS
SHAPES = ["square", "circle"]


def test_task_registries_agree():
    assert TASKS.names() == TASK_SETTINGS.names()
    for name in TASKS.names():
        assert TASKS.get(name).Settings is TASK_SETTINGS.get(name), name


# --- metrics against well-kept libraries ---------------------------------------------------


def test_multilabel_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    gen = torch.Generator().manual_seed(0)
    gold = torch.rand(60, 5, generator=gen) < 0.4
    scores = (gold.float() * 0.5 + torch.rand(60, 5, generator=gen)).round(decimals=1)  # ties on purpose
    for j in range(5):
        assert binary_auroc(scores[:, j], gold[:, j]) == pytest.approx(roc_auc_score(gold[:, j], scores[:, j]), abs=1e-12)
        assert average_precision(scores[:, j], gold[:, j]) == pytest.approx(
            average_precision_score(gold[:, j], scores[:, j]), abs=1e-12)
    from mmpeft.tasks import load_task

    task = load_task("tags", TASK_SETTINGS.get("multilabel")(), {"labels": [str(j) for j in range(5)], "threshold": 0.5})
    rows = [_Row(extra={"answer": [str(j) for j in range(5) if gold[i, j]]}) for i in range(60)]
    logits = torch.logit((scores / 1.6).clamp(1e-4, 1 - 1e-4))
    m = task.score(logits, rows)
    probs = logits.sigmoid()  # thresholded probabilities; AUROC and AP rank the logits themselves
    pred = probs >= 0.5
    assert m["micro_f1"] == pytest.approx(f1_score(gold, pred, average="micro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(gold, logits.double(), average="macro"), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(gold, logits.double(), average="macro"), abs=1e-12)
    assert m["subset_accuracy"] == pytest.approx(float((pred == gold).all(1).double().mean()), abs=1e-12)


def test_regression_metrics_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    gen = torch.Generator().manual_seed(1)
    gold = (torch.randn(50, generator=gen, dtype=torch.float64) * 2).round()  # ties, as sentiment scores have
    pred = gold + torch.randn(50, generator=gen, dtype=torch.float64)
    assert pearson(pred, gold) == pytest.approx(pearsonr(pred.numpy(), gold.numpy())[0], abs=1e-10)
    task = build_task("score", TASK_SETTINGS.get("regression")(), [_Row(extra={"answer": float(v)}) for v in gold])
    rows = [_Row(extra={"answer": float(v)}) for v in gold]
    out = ((pred.double() - task.state["mean"]) / task.state["std"]).float()[:, None]
    m = task.score(out, rows)
    assert m["mae"] == pytest.approx(float((pred - gold).abs().mean()), abs=1e-5)
    assert m["rmse"] == pytest.approx(float((pred - gold).pow(2).mean().sqrt()), abs=1e-5)
    assert m["spearman"] == pytest.approx(spearmanr(pred.numpy(), gold.numpy())[0], abs=1e-5)
    decided = gold != 0
    assert m["accuracy"] == pytest.approx(float(((pred > 0) == (gold > 0))[decided].double().mean()), abs=1e-9)


class _Row:
    def __init__(self, text="", image="", extra=None, answer="", groups=None):
        self.text, self.image, self.audio, self.answer = text, image, "", answer
        self.extra, self.groups, self.where, self.inputs = extra or {}, groups or {}, "row", {}


def test_contrastive_loss_is_clip_infonce_and_duplicates_are_positives():
    settings = TASK_SETTINGS.get("contrastive")(projection_dim=4)
    task = build_task("align", settings, [])
    task.head = ContrastiveHead({"text": 3, "image": 5}, 4, 0.07, 100.0)
    task.modalities = {"text": "text", "image": "image"}
    assert float(task.head.scale()) == pytest.approx(1 / 0.07, rel=1e-6)  # CLIP's initial temperature
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    rows = [_Row(text=f"t{i}", image=f"i{i}") for i in range(6)]
    out = torch.cat([a, b], 1)
    logits = a @ b.T / 0.07
    labels = torch.arange(6)
    clip = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert float(task.loss(out, task.collate(rows))) == pytest.approx(float(clip), rel=1e-5)
    # rows 0 and 1 share a caption: the image of row 0 retrieving text 1 is a hit
    same = [_Row(text="t0" if i < 2 else f"t{i}", image=f"i{i}") for i in range(6)]
    forced = torch.cat([a, a[[1, 0, 2, 3, 4, 5]]], 1)  # image 0 looks exactly like text 1, and so on
    m = task.score(forced, same)
    assert m["text_to_image_recall@1"] == 1.0 and m["recall@1"] == pytest.approx(1.0)


def test_sigmoid_loss_is_siglip_pairwise_and_duplicates_are_positives():
    """SigLIP's loss (Zhai et al. 2023) by a loop over pairs: -log sigmoid(z * (t * x.y + b)),
    z = +1 for a match (rows sharing a caption match each other's images too), summed over
    pairs and divided by the batch; defaults t = 10, b = -10; zero-shot probabilities are
    each class's own sigmoid."""
    settings = TASK_SETTINGS.get("contrastive")(projection_dim=4, loss="sigmoid")
    assert (settings.start_temperature, settings.logit_scale_cap) == (0.1, 1000.0)
    task = build_task("align", settings, [])
    task.head = task.build_head({"text": 3, "image": 5})
    task.modalities = {"text": "text", "image": "image"}
    assert float(task.head.scale()) == pytest.approx(10.0) and float(task.head.logit_bias) == -10.0
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    with torch.no_grad():
        task.head.logit_scale.fill_(math.log(7.0))
        task.head.logit_bias.fill_(-2.5)
    rows = [_Row(text="t0" if i < 2 else f"t{i}", image=f"i{i}") for i in range(5)]
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if (rows[i].text == rows[j].text or i == j) else -1.0
            expected -= math.log(1 / (1 + math.exp(-z * (7.0 * float(a[i] @ b[j]) - 2.5))))
    loss = task.loss(torch.cat([a, b], 1), task.collate(rows))
    assert float(loss) == pytest.approx(expected / 5, rel=1e-5)
    loss.backward()
    assert task.head.logit_bias.grad is not None and task.head.logit_scale.grad is not None
    task.state["labels"] = ["x", "y"]
    task.class_embeddings = b[:2]
    answer = task.answer(torch.cat([a, b], 1)[:1].detach(), top_k=2)[0]["zero_shot"]
    want = {label: 1 / (1 + math.exp(-(7.0 * float(b[0] @ b[k]) - 2.5))) for k, label in enumerate("xy")}
    assert {c["class"]: c["probability"] for c in answer} == pytest.approx(want, abs=1e-6)
    assert TASK_SETTINGS.get("contrastive")(temperature=0.01, max_logit_scale=20).problems("task") == [
        "task.temperature: 0.01 starts the logit scale at 100, above max_logit_scale 20"]


# --- end to end ------------------------------------------------------------------------------


def write_rows(directory, n_train=48, n_test=24, seed=0):
    """Shapes with every kind of target: a vqa answer, its kind, a number, a list of tags, a caption."""
    def row(rng, i, name):
        color, shape = rng.choice(list(COLORS)), SHAPES[i % 2]
        return color, shape, {"image": name, "question": f"a {color} {shape}", "answer": color, "kind": shape,
                              "score": list(COLORS).index(color) - 1.0 + 0.1 * rng.random(), "tags": [color, shape],
                              "caption": f"a {color} {shape}", "cls": f"{color} {shape}"}

    return tiny.write_shape_manifests(directory, row, n_train, n_test, seed)


def recipe(assets, files, out, task=None, tasks=None, **train):
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], files, out, fusion="concat", epochs=2, **train)
    raw.pop("task")
    if tasks:
        raw["tasks"] = tasks
    else:
        raw["task"] = task
    return raw


KIND_BLOCKS = {
    "vqa": {"type": "vqa"},
    "classification": {"type": "classification", "field": "kind"},
    "multilabel": {"type": "multilabel", "field": "tags", "tune_threshold": True},
    "regression": {"type": "regression", "field": "score"},
    "contrastive": {"type": "contrastive", "projection_dim": 16, "class_field": "cls", "templates": ["a {}", "{}"]},
    "generate": {"type": "generate", "field": "caption", "max_new_tokens": 4},  # decoder: the tiny llama (below)
}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("task_rows"))


@pytest.mark.parametrize("kind", TASKS.names())
def test_every_task_kind_trains_evaluates_and_predicts(kind, assets, task_files, tmp_path):
    """Each registered kind (a new one is picked up here) trains through the CLI, its bundle
    reproduces its metrics with `evaluate`, and predict answers in the kind's own form."""
    block = dict(KIND_BLOCKS[kind], **({"decoder": str(assets["llama"])} if kind == "generate" else {}))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(assets, task_files, tmp_path / "out", task=block, batch_size=8)))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "out" / "tiny"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tasks"]["answer"]["type"] == kind
    history = json.loads((bundle / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] or kind == "contrastive"
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    res = runner.invoke(app, ["predict", str(bundle), "--image", str(task_files["test"].parent / "images/test_0.png"),
                              "--question", "a red square"])
    assert res.exit_code == 0, res.output
    expected = {"vqa": "0.", "classification": "0.", "multilabel": '"labels"', "regression": '"value"',
                "contrastive": '"zero_shot"', "generate": '"text"'}[kind]
    assert expected in res.output
    # inspect reads the numbers the kind declares (it ended in KeyError: 'accuracy' on a contrastive bundle)
    res = runner.invoke(app, ["inspect", str(bundle)])
    stored = json.loads((bundle / "metrics.json").read_text())["tasks"]["answer"]
    first = TASK_SETTINGS.get(kind).metrics[0]
    assert res.exit_code == 0 and f"test answer ({kind}): {first} {stored[first]:.4f}" in res.output, res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "verified on" in res.output, res.output
    # one request to `mmpeft serve`'s API answers as predict does (the kind's own form where it is not one top-k list)
    from fastapi.testclient import TestClient

    from mmpeft.inference import Predictor
    from mmpeft.serve.app import ServeSettings, create_app
    from mmpeft.serve.pool import AdapterPool

    image = task_files["test"].parent / "images/test_0.png"
    with TestClient(create_app(AdapterPool({"b": bundle}, log=lambda m: None), ServeSettings())) as client:
        reply = client.post("/predict", files={"image": ("x.png", image.read_bytes(), "image/png")},
                            data={"question": "a red square", "top_k": "2"})
    assert reply.status_code == 200, reply.text
    want = Predictor(bundle).predict([str(image)], ["a red square"], top_k=2)[0]
    body = reply.json()
    got = {"answer": body["answer"], "top_k": body["top_k"]} if "answer" in body else body["result"]
    assert got == {k: v for k, v in want.items() if k in got} and set(got) <= set(want) and got


def test_multi_task_recipe_shares_encoders_and_carries_every_head(assets, task_files, tmp_path):
    tasks = {
        "answer": {"type": "vqa"},
        "shape": {"type": "classification", "field": "kind", "encoders": ["image"], "weight": 0.5},
        "score": {"type": "regression", "field": "score", "encoders": ["text"], "weight": 0.5},
    }
    raw = recipe(assets, task_files, tmp_path / "out", tasks=tasks, select="shape.accuracy")
    rec = load_recipe(raw)
    from mmpeft.data import recipe_splits
    from mmpeft.model import build_model
    from mmpeft.tasks import recipe_task_set

    built = build_model(rec, recipe_task_set(rec, recipe_splits(rec).train))
    heads = {n.split(".")[2] for n, p in built.named_parameters() if p.requires_grad and n.startswith("head.")}
    assert heads == {"answer", "shape", "score"}
    assert built.slices["shape"] == slice(3, 5) and built.slices["score"] == slice(5, 6)
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "restored best checkpoint" in res.output and "shape.accuracy" in res.output
    bundle = tmp_path / "out" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"answer", "shape", "score"}
    assert {"eval_answer.accuracy", "eval_shape.accuracy", "eval_score.mae"} <= set(metrics["history"][-1])
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    image = str(task_files["test"].parent / "images/test_0.png")
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "a red square"])
    assert res.exit_code == 0 and "shape:" in res.output and '"value"' in res.output, res.output
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "x", "--task", "shape"])
    assert res.exit_code == 0 and "score" not in res.output, res.output
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "x", "--task", "nope"])
    assert res.exit_code == 2 and "is not a task" in res.output
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    from mmpeft.inference import evaluate_bundle

    merged = evaluate_bundle(tmp_path / "merged")  # folded weights round differently: continuous metrics move a little
    assert set(merged["metrics"]) == {"answer", "shape", "score"} and merged["max_abs_diff"] < 1e-5


def test_rows_without_a_target_add_nothing_to_that_task(assets, tmp_path):
    """Multi-task rows may lack one task's target: they are left out of its loss and metrics."""
    files = write_rows(tmp_path / "rows")
    lines = files["train"].read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for r in rows[::2]:
        r.pop("score")
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = {"answer": {"type": "vqa"}, "score": {"type": "regression", "field": "score"}}
    rec = load_recipe(recipe(assets, files, tmp_path / "out", tasks=tasks))
    from mmpeft.data import recipe_splits
    from mmpeft.tasks import recipe_task_set

    splits = recipe_splits(rec)
    score = recipe_task_set(rec, splits.train)["score"]
    target = score.collate(splits.train[:8])
    kept = [r for r in splits.train[:8] if "score" in r.extra]
    assert int((~torch.isnan(target)).sum()) == len(kept)
    out = torch.zeros(8, 1)
    by_hand = torch.nn.functional.mse_loss(out[~torch.isnan(target), 0], target[~torch.isnan(target)])
    assert float(score.loss(out, target)) == pytest.approx(float(by_hand))


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("column, value, says", [
    ("tags", {"a": 1}, "is a list or text"),
    ("score", "high", "is a number, not 'high'"),
    ("score", float("nan"), "finite number"),
])
def test_bad_targets_exit_2_naming_file_row_and_column(assets, tmp_path, column, value, says):
    files = write_rows(tmp_path / "rows", n_train=12, n_test=6)
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    rows[3][column] = value
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    kind = "multilabel" if column == "tags" else "regression"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(assets, files, tmp_path / "out", task={"type": kind, "field": column})))
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 2, res.output
    assert f"train.jsonl, row 4: column {column!r}" in res.output and says in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("change, says", [
    ({"task": {"type": "vqa", "encoders": ["audio"]}}, "task.encoders: 'audio' not an encoder"),
    ({"task": {"type": "contrastive", "encoders": ["text"]}}, "aligns exactly two encoders"),
    ({"task": {"type": "regression", "metric": "accuracy_2"}}, "task.metric: 'accuracy_2' is not a metric"),
    ({"train.select": "answer.auroc"}, "train.select: task 'answer' does not report 'auroc'"),
    ({"train.select": "shape.accuracy"}, "names no task of this recipe"),
    ({"task": {"type": "multiclass"}}, "unknown task type 'multiclass'"),
    ({"tasks": {"answer": {"type": "vqa"}}}, "either task: (one task) or tasks:"),
    ({"task": {"type": "contrastive", "metric": "zero_shot_accuracy"}}, "needs task.class_field"),
])
def test_task_recipe_errors_name_the_key(assets, tmp_path, change, says):
    raw = recipe(assets, {"train": "x.jsonl", "test": "y.jsonl"}, tmp_path, task={"type": "vqa"})
    for key, value in change.items():
        if key == "train.select":
            raw["train"]["select"] = value
        else:
            raw[key] = value
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert says in str(err.value)


def test_contrastive_batch_of_one_is_a_recipe_error(assets, task_files, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(assets, task_files, tmp_path / "out", task=KIND_BLOCKS["contrastive"], batch_size=1)))
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 2 and "needs at least 2 rows (got 1)" in res.output and "Traceback" not in res.output
    task = build_task("align", TASK_SETTINGS.get("contrastive")(projection_dim=2), [])
    assert float(task.loss(torch.ones(1, 4), torch.zeros(1, 2, dtype=torch.long))) == 0.0  # an epoch's last row alone


def test_old_single_task_recipes_and_bundles_are_unchanged(tmp_path):
    """A recipe of the earlier schema (task: {type, metric, min_answer_count, group_fields}) loads
    as one vqa task named answer, with the same settings."""
    raw = {"encoders": {"text": {"model": "minilm"}}, "task": {"type": "classification", "metric": "macro_f1",
                                                              "min_answer_count": 2, "group_fields": ["kind"]},
           "data": {"source": "easy_vqa"}}
    rec = load_recipe(raw)
    assert rec.task == {"type": "classification", "weight": 1.0, "field": None, "encoders": [], "group_fields": ["kind"],
                        "head": None, "metric": "macro_f1", "min_answer_count": 2, "data": None}


def test_contrastive_benchmark_scores_the_floor_and_the_trained_model(assets, task_files, tmp_path, monkeypatch):
    """`mmpeft bench contrastive` on a tiny recipe: both rows, every column, the floor is the
    untrained model's own score (recomputed here), the trained row is the bundle's."""
    from mmpeft.bench.contrastive import COLUMNS, floor

    raw = recipe(assets, task_files, tmp_path / "adapters", task=KIND_BLOCKS["contrastive"], batch_size=8)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["bench", "contrastive", "--recipe", str(path), "--out", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "results" / "contrastive.json").read_text())
    untrained, trained = result["rows"]
    assert set(COLUMNS) <= set(untrained) and all(trained[k] is not None for k in COLUMNS)
    again = floor(load_recipe(path))["answer"]  # (a YAML dump sorts the encoders: another head init than raw's)
    assert all(untrained[k] == again[k] for k in COLUMNS), (untrained, again)
    stored = json.loads((tmp_path / "adapters" / "contrastive_bench" / "metrics.json").read_text())["test"]
    assert all(trained[k] == stored[k] for k in COLUMNS)
    assert "untrained projections (floor)" in (tmp_path / "results" / "contrastive.md").read_text()
    res = CliRunner().invoke(app, ["bench", "contrastive", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not found" in res.output


def test_edge_cases_give_zero_loss_nan_metrics_and_clear_errors():
    """A batch with no usable answer adds no loss (not NaN); a split without rows for a task
    scores NaN (so it never selects a checkpoint); a stored state missing what its kind needs
    is a BundleError; AUROC ranks logits, which do not saturate as float32 probabilities do."""
    from mmpeft.errors import BundleError
    from mmpeft.tasks import load_task
    from mmpeft.tasks.base import _check_kind_state

    vqa = load_task("answer", TASK_SETTINGS.get("vqa")(), {"labels": ["a", "b"]})
    assert float(vqa.loss(torch.randn(2, 2), torch.tensor([-1, -1]))) == 0.0
    assert math.isnan(vqa.score(torch.zeros(0, 2), [])["accuracy"])
    tags = load_task("tags", TASK_SETTINGS.get("multilabel")(), {"labels": ["x"], "threshold": 0.5})
    assert math.isnan(tags.score(torch.zeros(0, 1), [])["micro_f1"])
    rows = [_Row(extra={"answer": ["x"] if i >= 2 else []}) for i in range(4)]
    assert tags.score(torch.tensor([[18.0], [20.0], [25.0], [30.0]]), rows)["auroc"] == 1.0
    with pytest.raises(BundleError, match="needs mean, std"):
        _check_kind_state(load_task("score", TASK_SETTINGS.get("regression")(), {}), "manifest.json")
    with pytest.raises(DataError, match="no label is seen 3 time"):
        build_task("tags", TASK_SETTINGS.get("multilabel")(min_label_count=3), [_Row(extra={"answer": ["x"]})])


def test_a_task_on_a_subset_is_checked_against_the_shared_head(assets, tmp_path):
    raw = recipe(assets, {"train": "x.jsonl", "test": "y.jsonl"}, tmp_path, tasks={
        "answer": {"type": "vqa"}, "shape": {"type": "classification", "field": "kind", "encoders": ["image"]}})
    raw["fusion"] = {"type": "cross_attention", "query": "text"}
    with pytest.raises(RecipeError, match="tasks.shape.encoders: fusion.query: 'text'"):
        load_recipe(raw)


def test_contrastive_targets_sum_to_one_in_both_directions_with_mixed_positives():
    """Row 0 and 1 share a caption, rows 1 and 2 an image: positives are not transitive, and each
    direction's soft targets must still be a distribution per query (checked against the loss
    written out by hand)."""
    task = build_task("align", TASK_SETTINGS.get("contrastive")(projection_dim=2), [])
    task.head = ContrastiveHead({"text": 2, "image": 2}, 2, 0.5, 100.0)
    task.modalities = {"text": "text", "image": "image"}
    rows = [_Row(text="t0", image="i0"), _Row(text="t0", image="i1"), _Row(text="t2", image="i1")]
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(3, 2, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 2, generator=gen), dim=-1)
    logits = a @ b.T / 0.5
    positive = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.float)
    forward = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    backward = -(positive.T / positive.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    assert float(task.loss(torch.cat([a, b], 1), task.collate(rows))) == pytest.approx(float((forward + backward) / 2), rel=1e-5)


# a usable target for each kind's row i (a new kind adds its line; the loop below fails without it)
LOSS_ROWS = {
    "vqa": lambda i: _Row(answer="yes" if i % 2 else "no"),
    "classification": lambda i: _Row(extra={"kind": "circle" if i % 2 else "square"}),
    "multilabel": lambda i: _Row(extra={"tags": ["x"] if i % 2 else ["x", "y"]}),
    "regression": lambda i: _Row(extra={"score": float(i) - 1.5}),
    "contrastive": lambda i: _Row(text=f"t{i}", image=f"i{i}"),
    "generate": lambda i: _Row(text="what color is the shape ?", answer="red" if i % 2 else "a blue circle"),
}
LOSS_SETTINGS = {"classification": {"field": "kind"}, "multilabel": {"field": "tags"}, "regression": {"field": "score"},
                 "contrastive": {"projection_dim": 4}}


@pytest.mark.parametrize("kind", TASKS.names())
def test_loss_given_the_collators_row_count_equals_the_loss_counting_on_the_device(kind, assets):
    """The training loop passes each task the collator's host-side count of rows it learns
    from, so no loss reads the device to decide (a GPU sync every step): the loss and its
    gradients are bit-identical either way, and zero for a batch of another task's rows."""
    extra = {"decoder": str(assets["llama"])} if kind == "generate" else {}
    settings = TASK_SETTINGS.get(kind)(**LOSS_SETTINGS.get(kind, {}), **extra)
    own = [LOSS_ROWS[kind](i) for i in range(4)]
    task = build_task("t", settings, own)
    if kind == "contrastive":
        task.head = task.build_head({"text": 3, "image": 5})
        task.modalities = {"text": "text", "image": "image"}
    others = [LOSS_ROWS[kind](i) for i in range(4, 6)]
    for row in others:
        row.dataset = "other"  # another task's data: no target for this one
    for rows, expect in ((own + others, 4), (own, 4), (others, 0)):
        target = task.collate(rows)
        assert int(task.usable(target).sum()) == expect
        results = []
        for count in (None, expect):
            shape = (len(rows), task.width) if target.dim() == 1 or kind != "generate" else \
                (*target.shape, len(task.tokenizer))  # token logits over the text positions
            out = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).requires_grad_()
            loss = task.loss(out, target, count)
            loss.backward()
            results.append((loss.detach(), out.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        if not expect:
            assert float(results[1][0]) == 0.0 and not results[1][1].any()
