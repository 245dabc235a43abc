"""``data.source: huggingface``: the tiny manifest's rows as a ``save_to_disk`` folder and as
parquet files with embedded image bytes train exactly as the manifest does; broken data
is named by file, split, row or column."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data import recipe_splits
from mmpeft.errors import DataError, RecipeError
from mmpeft.train import finetune
from tests import tiny
from tests.helpers import bundle_results

datasets = pytest.importorskip("datasets")


def rows_of(manifest: Path, embed: bool) -> dict:
    """A manifest's rows as columns; images as embedded bytes (``embed``) or absolute paths."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    images = [str(manifest.parent / r["image"]) for r in rows]
    return {"image": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in images] if embed else images,
            "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows], "kind": [r["kind"] for r in rows]}


def to_dataset(manifest: Path, embed: bool = True):
    features = datasets.Features({"image": datasets.Image() if embed else datasets.Value("string"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "kind": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows_of(manifest, embed), features=features)


@pytest.fixture(scope="module")
def hf_data(assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    files = assets["data"]
    train, test = to_dataset(files["train"]), to_dataset(files["test"])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved"))
    train.to_parquet(str(root / "train.parquet"))
    test.to_parquet(str(root / "test.parquet"))
    paths = {"train": to_dataset(files["train"], embed=False), "test": to_dataset(files["test"], embed=False)}
    datasets.DatasetDict(paths).save_to_disk(str(root / "paths"))
    return {"saved": root / "saved", "train_parquet": root / "train.parquet", "test_parquet": root / "test.parquet",
            "paths": root / "paths", "root": root}


def recipe(assets, out: Path, **data) -> dict:
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], out, epochs=2)
    raw["data"] = {"source": "huggingface", "eval_fraction": 0.25, **{k: str(v) for k, v in data.items()}}
    return raw


def same(a, b, exact: bool) -> bool:
    """Equal, or (not ``exact``) equal but for floats within 1e-5 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], exact) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, exact) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and not exact:
        return abs(a - b) <= 1e-5 * max(1.0, abs(b))
    return a == b


@pytest.mark.parametrize("layout", ["paths", "saved", "parquet"])
def test_a_huggingface_dataset_trains_as_the_manifest_of_its_rows(assets, hf_data, tmp_path, monkeypatch, layout):
    """Image paths in a string column: bit-identical to the manifest. Embedded bytes: equal
    images become one file (content-addressed), so a batch encodes fewer distinct images,
    and the losses agree to float rounding of the other batch shapes (1e-5); every count,
    accuracy and prediction is the same."""
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    plain = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "manifest", epochs=2)
    data = {"path": hf_data[layout]} if layout != "parquet" else {"path": hf_data["train_parquet"], "test": hf_data["test_parquet"]}
    hf = load_recipe(recipe(assets, tmp_path / "hf", **data))
    splits = recipe_splits(hf)
    assert [len(splits.train), len(splits.eval), len(splits.test)] == [36, 12, 24]
    assert splits.train[0].groups and "[split train], row" in splits.train[0].where
    cached = list((tmp_path / "cache" / "hf_files").rglob("*.png"))
    if layout == "paths":
        assert cached == [] and [s.image for s in splits.train] == [s.image for s in recipe_splits(load_recipe(plain)).train]
    else:  # embedded images were written once each, named by their content
        distinct = {Path(s.image).read_bytes() for s in recipe_splits(load_recipe(plain)).train}
        assert len(cached) == len(distinct) > 1
    metrics, tensors = bundle_results(finetune(hf))
    want_metrics, want_tensors = bundle_results(finetune(load_recipe(plain)))
    metrics["data"].pop("source"), want_metrics["data"].pop("source")
    assert same(metrics, want_metrics, exact=layout == "paths")
    assert metrics["tasks"]["answer"]["accuracy"] == want_metrics["tasks"]["answer"]["accuracy"]
    assert tensors.keys() == want_tensors.keys()
    if layout == "paths":
        assert all((tensors[k] == want_tensors[k]).all() for k in tensors)


def test_the_cli_validates_and_trains_from_a_recipe_file(assets, hf_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    raw = recipe(assets, tmp_path / "out", path="saved")  # relative: read from the recipe file's folder
    raw["train"]["epochs"] = 1
    path = hf_data["root"] / "hf_recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "Data: `huggingface`" in (tmp_path / "out" / "tiny" / "README.md").read_text()


def test_broken_datasets_are_named(assets, hf_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"has no split 'validation' \(it has: train, test\)"):
        recipe_splits(load_recipe(recipe(assets, tmp_path / "o", path=hf_data["saved"], eval_split="validation")))
    with pytest.raises(DataError, match=r"missing field\(s\) 'q'.*it has: image, question, answer, kind"):
        recipe_splits(load_recipe(recipe(assets, tmp_path / "o", path=hf_data["saved"], text_field="q")))
    # a row whose embedded image is not an image: named by its split and row when the images are probed
    broken = to_dataset(assets["data"]["train"]).to_dict()
    broken["image"][4] = {"bytes": b"not an image", "path": "x.png"}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "kind": datasets.Value("string")})
    datasets.Dataset.from_dict(broken, features=features).to_parquet(str(tmp_path / "broken.parquet"))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(
        recipe(assets, tmp_path / "o", path=tmp_path / "broken.parquet", test=hf_data["test_parquet"])))
    res = CliRunner().invoke(app, ["finetune", str(tmp_path / "broken.yaml"), "--dry-run"])
    assert res.exit_code != 0 and "broken.parquet [split train], row 5" in res.output and "Traceback" not in res.output
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk.parquet: not readable as a huggingface dataset"):
        recipe_splits(load_recipe(recipe(assets, tmp_path / "o", path=tmp_path / "junk.parquet", test=tmp_path / "junk.parquet")))


def test_recipe_checks_name_the_keys(assets, tmp_path):
    with pytest.raises(RecipeError, match=r"data.path: required when data.source is 'huggingface'"):
        load_recipe(recipe(assets, tmp_path))
    with pytest.raises(RecipeError, match=r"data.path: .*nowhere not found"):
        from mmpeft.config.paths import require_data

        require_data(load_recipe(recipe(assets, tmp_path, path=tmp_path / "nowhere")))
    with pytest.raises(RecipeError, match=r"data.holdout_speakers: source huggingface does not read it \(it is read by fsdd\)"):
        raw = recipe(assets, tmp_path, path=tmp_path)
        raw["data"]["holdout_speakers"] = ["george"]
        load_recipe(raw)


def test_an_imagefolder_layout_gives_class_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    for split, n in (("train", 4), ("test", 2)):
        for label in ("circle", "square"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            for i in range(n):
                tiny.shape_image(tmp_path / "imgs" / split / label / f"{i}.png", "red", label)
    raw = {"encoders": {"image": {"model": "efficientnet-lite0", "modality": "image"}}, "task": {"type": "classification"},
           "data": {"source": "huggingface", "path": str(tmp_path / "imgs"), "label_field": "label"}}
    splits = recipe_splits(load_recipe(raw))
    assert sorted({s.answer for s in splits.test}) == ["circle", "square"] and len(splits.test) == 4
    assert all(Path(s.image).is_file() for s in splits.train + splits.eval)


def test_every_data_source_has_its_spec_and_its_reader():
    from mmpeft.config.datasets import DATASET_SPECS
    from mmpeft.data.sources import DATASETS

    assert DATASET_SPECS.names() == DATASETS.names()
    from mmpeft.docs import registry_reference

    reference = registry_reference()
    for name in DATASET_SPECS.names():
        assert f"| `{name}` |" in reference, name


def test_a_registered_dataset_trains_without_an_edit_elsewhere(assets, tmp_path):
    """A dataset registered by a test (spec + reader, nothing else): validated, trained,
    evaluated and listed in the generated reference."""
    from mmpeft.config.datasets import DATASET_SPECS, DatasetSpec
    from mmpeft.data.samples import load_manifest
    from mmpeft.data.sources import DATASETS, DatasetReader
    from mmpeft.docs import registry_reference
    from mmpeft.inference import evaluate_bundle

    @DATASET_SPECS.register("shapes_test")
    class ShapesSpec(DatasetSpec):
        """Test shapes: the tiny manifest's rows, its test rows reversed."""

        keys = ("root",)
        modalities = frozenset({"image", "text"})

    @DATASETS.register("shapes_test")
    class ShapesReader(DatasetReader):
        def read(self, data, request):
            files = assets["data"]
            return load_manifest(files["train"], group_fields=request.group_fields), None, \
                load_manifest(files["test"], group_fields=request.group_fields)[::-1]

    try:
        raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "out", epochs=1)
        raw["data"] = {"source": "shapes_test", "eval_fraction": 0.25}
        bundle = finetune(load_recipe(raw))
        assert "| `shapes_test` | Test shapes" in registry_reference()
        metrics = json.loads((bundle / "metrics.json").read_text())
        assert metrics["data"] == {"source": "shapes_test", "train": 36, "eval": 12, "test": 24}
        again = evaluate_bundle(bundle)
        assert again["max_abs_diff"] == 0 and again["metrics"]["answer"]["accuracy"] == metrics["tasks"]["answer"]["accuracy"]
        with pytest.raises(RecipeError, match=r"data.train: source shapes_test does not read it"):
            load_recipe({**raw, "data": {"source": "shapes_test", "train": "x.jsonl"}})
    finally:
        DATASET_SPECS.unregister("shapes_test")
        DATASETS.unregister("shapes_test")
