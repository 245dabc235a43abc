"""Tasks with their own data: batches of one dataset each, drawn by the stated rule and
reproducible by seed; each task learns and is scored on its own rows only; a run resumes
exactly; recipe and data problems are named."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data.sampling import DatasetBatches
from mmpeft.errors import RecipeError
from tests import tiny
from tests.test_resume import assert_same, finetune_here, kill_and_resume

runner = CliRunner()


def rows_of(sizes: dict[str, int]):
    return [SimpleNamespace(dataset=name, image=f"{name}{i}") for name, n in sizes.items() for i in range(n)]


def test_proportional_batches_hold_one_dataset_and_every_row_once():
    rows = rows_of({"": 30, "aux": 13})
    sampler = DatasetBatches(rows, 4, seed=3)
    first = list(sampler)
    assert all(len({rows[i].dataset for i in b}) == 1 for b in first)
    assert sorted(i for b in first for i in b) == list(range(43))  # every row once an epoch
    assert len(first) == len(sampler) == 8 + 4
    second = list(sampler)
    assert second != first and sorted(i for b in second for i in b) == list(range(43))
    again = DatasetBatches(rows, 4, seed=3)
    assert list(again) == first  # the same seed, the same order
    again.set_epoch(1)
    assert list(again) == second  # an epoch replayed from its number (resume)
    assert list(DatasetBatches(rows, 4, seed=4)) != first


def test_round_robin_takes_turns_and_repeats_the_smaller_dataset():
    rows = rows_of({"": 40, "aux": 8})
    batches = list(DatasetBatches(rows, 4, seed=0, rule="round_robin"))
    order = [rows[b[0]].dataset for b in batches]
    assert order == ["", "aux"] * 6  # 10 + 2 batches an epoch, in turns
    aux = [tuple(b) for b in batches if rows[b[0]].dataset == "aux"]
    passes = [sorted(aux[k] + aux[k + 1]) for k in range(0, 6, 2)]  # 2 batches a pass: 3 passes, each reshuffled
    assert passes == [list(range(40, 48))] * 3 and len(set(aux)) > 2


def test_temperature_sampling_draws_datasets_by_rows_to_the_one_over_t():
    rows = rows_of({"": 400, "aux": 25})
    sampler = DatasetBatches(rows, 5, seed=1, rule="temperature", temperature=2.0)
    expected = [400 ** 0.5 / (400 ** 0.5 + 25 ** 0.5), 25 ** 0.5 / (400 ** 0.5 + 25 ** 0.5)]
    assert sampler.shares() == pytest.approx(expected)
    counts = Counter()
    for _ in range(30):
        counts.update(rows[b[0]].dataset for b in sampler)
    total = sum(counts.values())
    assert total == 30 * 85
    assert counts["aux"] / total == pytest.approx(expected[1], abs=0.02)  # 0.2; proportional would give 0.06
    one = DatasetBatches(rows, 5, seed=1, rule="temperature", temperature=1.0)
    assert one.shares() == pytest.approx([400 / 425, 25 / 425])


def test_evaluation_batches_keep_each_dataset_in_order():
    rows = rows_of({"": 5, "aux": 3})
    assert list(DatasetBatches(rows, 4, seed=0, shuffle=False)) == [[0, 1, 2, 3], [4], [5, 6, 7]]


def write_shapes_only(directory, n_train=32, n_test=16):
    """A second dataset: shape images and their shape, no question (the image encoder's task).
    Its rows carry an `answer` column too, which is not the vqa task's (it reads the recipe's data)."""
    def row(rng, i, name):
        color, shape = rng.choice(list(tiny.COLORS)), ["square", "circle"][i % 2]
        return color, shape, {"image": name, "shape": shape, "answer": shape}

    return tiny.write_shape_manifests(directory, row, n_train, n_test, seed=5)


def own_data_recipe(assets, tmp_path, rule="round_robin", **extra):
    own = write_shapes_only(tmp_path / "shapes")
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "out", fusion="concat", epochs=2,
                           task_sampling=rule, **extra)
    raw.pop("task")
    raw["tasks"] = {
        "answer": {"type": "vqa", "group_fields": ["kind"]},
        "shape": {"type": "classification", "field": "shape", "encoders": ["image"], "weight": 0.5,
                  "data": {"source": "manifest", "train": str(own["train"]), "test": str(own["test"]), "eval_fraction": 0.25}},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_answers_of_another_datasets_rows_are_not_a_vqa_tasks():
    """Rows of a task's own built-in data (easy_vqa_captions: an answer, no extra columns) give
    the vqa task on the recipe's data no vocabulary entry and no target."""
    from mmpeft.config import TASK_SETTINGS
    from mmpeft.data.samples import Sample
    from mmpeft.tasks import build_task

    rows = [Sample("a.png", "what shape ?", "circle"), Sample("b.png", "what colour ?", "red"),
            Sample("a.png", "", "red circle", dataset="caption")]
    for kind in ("vqa", "classification"):
        task = build_task("answer", TASK_SETTINGS.get(kind)(), rows)
        assert sorted(task.labels) == ["circle", "red"]
        assert task.collate(rows).tolist() == [task.vocab.encode("circle"), task.vocab.encode("red"), -1]


def test_a_task_with_its_own_data_trains_on_it_and_is_scored_on_it(assets, tmp_path):
    path, raw = own_data_recipe(assets, tmp_path)
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "batches drawn by round_robin" in res.output and "shape 24 rows 50.0%" in res.output, res.output
    bundle = tmp_path / "out" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["tasks"]["answer"]["count"] == 24 and metrics["tasks"]["shape"]["count"] == 16  # each its own test rows
    assert set(metrics["tasks"]["answer"]["groups"]) == {"kind"} and metrics["tasks"]["shape"]["groups"] == {}
    last = metrics["history"][-1]
    assert {"train_loss.answer", "train_loss.shape", "eval_answer.accuracy", "eval_shape.accuracy"} <= set(last)
    assert last["train_loss.shape"] > 0  # its running loss is of its own batches (the others' would be 0)
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    image = str(tmp_path / "shapes" / "images" / "test_0.png")
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "what color is the shape ?"])
    assert res.exit_code == 0 and "shape:" in res.output, res.output


def test_rows_of_another_dataset_teach_a_task_nothing(assets, tmp_path):
    from mmpeft.data import recipe_splits
    from mmpeft.data.batching import Collator, ImageStore
    from mmpeft.model import build_model
    from mmpeft.tasks import recipe_task_set

    _, raw = own_data_recipe(assets, tmp_path)
    rec = load_recipe(raw)
    splits = recipe_splits(rec)
    assert {s.dataset for s in splits.train} == {"", "shape"} and sum(s.dataset == "shape" for s in splits.train) == 24
    tasks = recipe_task_set(rec, splits.train)
    # the other dataset's answer column adds nothing to the vqa task's vocabulary
    assert sorted(tasks["answer"].labels) == sorted({s.answer for s in splits.train if s.dataset == ""})
    assert not {"square", "circle"} & set(tasks["answer"].labels)
    model = build_model(rec, tasks)
    collator = Collator(splits.train, dict(model.encoders.items()), tasks, ImageStore())
    shared = [i for i, s in enumerate(splits.train) if s.dataset == ""][:4]
    own = [i for i, s in enumerate(splits.train) if s.dataset == "shape"][:4]
    batch = collator(own)
    assert set(batch["inputs"]) == {"image"} and batch["counts"] == {"answer": 0, "shape": 4}
    assert batch["targets"]["answer"].tolist() == [-1] * 4
    out = model.logits(batch["inputs"])
    assert float(tasks["answer"].loss(out[:, model.slices["answer"]], batch["targets"]["answer"])) == 0.0
    assert float(tasks["shape"].loss(out[:, model.slices["shape"]], batch["targets"]["shape"])) > 0
    batch = collator(shared)
    assert set(batch["inputs"]) == {"text", "image"} and batch["counts"] == {"answer": 4, "shape": 0}
    out = model.logits(batch["inputs"])
    assert float(tasks["shape"].loss(out[:, model.slices["shape"]], batch["targets"]["shape"])) == 0.0


def test_a_run_with_tasks_own_data_resumes_exactly(assets, tmp_path):
    path, _ = own_data_recipe(assets, tmp_path, rule="temperature")
    res = finetune_here(path, tmp_path / "ref")
    assert res.exit_code == 0, res.output
    kill_and_resume(path, tmp_path / "killed", ["train.step#4"])  # mid-epoch: the drawn order is replayed
    assert_same(tmp_path / "ref" / "tiny", tmp_path / "killed" / "tiny")


@pytest.mark.parametrize("change, says", [
    (lambda r: r["tasks"]["shape"]["data"].update(group_by_image=True), "tasks.shape.data.group_by_image: is a setting of the whole run"),
    (lambda r: r["tasks"]["shape"]["data"].pop("test"), "tasks.shape.data.test: required when tasks.shape.data.source is 'manifest'"),
    (lambda r: r["tasks"]["shape"]["data"].update(sorce="x"), "tasks.shape.data.sorce: unknown key; did you mean 'source'?"),
    (lambda r: r["train"].update(task_sampling="random"), "train.task_sampling: must be one of"),
    (lambda r: r.update(task=r.pop("tasks")["shape"]), "task.data: a single task reads the recipe's data:"),
])
def test_task_data_problems_are_named(assets, tmp_path, change, says):
    _, raw = own_data_recipe(assets, tmp_path)
    change(raw)
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert says in str(err.value)


def test_a_missing_task_data_file_or_input_is_named_before_training(assets, tmp_path):
    path, raw = own_data_recipe(assets, tmp_path)
    res = runner.invoke(app, ["finetune", str(path), "tasks.shape.data.train=nowhere.jsonl"])
    assert res.exit_code == 2 and "tasks.shape.data.train:" in res.output and "not found" in res.output, res.output
    train = tmp_path / "shapes" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[2].pop("image")
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 2 and f"{train}, row 3: missing field(s) 'image'" in res.output, res.output


def test_shared_rows_need_only_the_encoders_of_the_tasks_reading_them(assets, tmp_path):
    """A text-only answer task on the recipe's data beside an image task on its own: the shared
    manifest needs no image column, and its batches hold only the text encoder's input."""
    from mmpeft.data import recipe_splits
    from mmpeft.data.batching import Collator, ImageStore
    from mmpeft.model import build_model
    from mmpeft.tasks import recipe_task_set

    _, raw = own_data_recipe(assets, tmp_path)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(raw["data"][split])]
        text_only = tmp_path / f"text_{split}.jsonl"
        text_only.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n" for r in rows))
        raw["data"][split] = str(text_only)
    raw["tasks"]["answer"]["encoders"] = ["text"]
    rec = load_recipe(raw)
    splits = recipe_splits(rec)
    assert all(s.image == "" for s in splits.train if s.dataset == "")
    tasks = recipe_task_set(rec, splits.train)
    # the other dataset's answer column adds nothing to the vqa task's vocabulary
    assert sorted(tasks["answer"].labels) == sorted({s.answer for s in splits.train if s.dataset == ""})
    assert not {"square", "circle"} & set(tasks["answer"].labels)
    model = build_model(rec, tasks)
    collator = Collator(splits.train, dict(model.encoders.items()), tasks, ImageStore())
    batch = collator([i for i, s in enumerate(splits.train) if s.dataset == ""][:4])
    assert set(batch["inputs"]) == {"text"} and model.logits(batch["inputs"]).shape == (4, 5 + 2)
