"""A newcomer's first hour: recipe-relative paths, encodings, clear errors that keep their
text, fast validation, output that fits the terminal, ordinary permissions."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data import load_manifest
from mmpeft.errors import DataError, RecipeError
from tests import tiny

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def project(assets, tmp_path) -> Path:
    """A user's project: data/ with images and manifests, recipes/tiny.yaml naming them
    relative to the recipe file."""
    base = tmp_path / "project"
    shutil.copytree(Path(assets["data"]["train"]).parent, base / "data")
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], {"train": "../data/train.jsonl", "test": "../data/test.jsonl"},
                           base / "adapters", epochs=1)  # output.dir, like other outputs, is relative to the working directory
    (base / "recipes").mkdir()
    (base / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return base


def test_recipe_paths_are_read_from_the_recipe_folder_from_any_directory(assets, tmp_path, monkeypatch):
    base = project(assets, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(base / "recipes" / "tiny.yaml")
    assert Path(recipe.data.train) == (base / "data" / "train.jsonl").resolve()
    # command-line paths are relative to the working directory, like any argument
    (elsewhere / "mine.jsonl").write_text("")
    assert Path(load_recipe(base / "recipes" / "tiny.yaml", ["data.eval=mine.jsonl"]).data.eval) == Path("mine.jsonl")
    res = runner.invoke(app, ["finetune", str(base / "recipes" / "tiny.yaml")])
    assert res.exit_code == 0, res.output
    bundle = base / "adapters" / "tiny"
    # the bundle keeps the resolved (absolute) paths, so it evaluates from anywhere too
    assert Path(yaml.safe_load((bundle / "recipe.yaml").read_text())["data"]["test"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output


def test_data_root_is_the_base_of_manifest_paths(assets, tmp_path):
    base = project(assets, tmp_path)
    recipe = load_recipe(base / "recipes" / "tiny.yaml", [f"data.root={base / 'data'}", "data.train=train.jsonl",
                                                          "data.test=test.jsonl"])
    from mmpeft.config.paths import data_problems

    assert data_problems(recipe) == []


def test_validate_names_a_missing_data_file_with_its_absolute_path(assets, tmp_path, monkeypatch):
    base = project(assets, tmp_path)
    (base / "data" / "test.jsonl").unlink()
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["validate", str(base / "recipes" / "tiny.yaml")])
    assert res.exit_code == 2
    assert f"data.test: {(base / 'data' / 'test.jsonl').resolve()} not found" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["finetune", str(base / "recipes" / "tiny.yaml")])
    assert res.exit_code == 2 and "data.test:" in res.output


def test_error_text_keeps_square_brackets(tmp_path):
    """Console markup must not eat brackets out of a message (paths, pip extras, lists)."""
    raw = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["data"] = {"source": "manifest", "train": str(tmp_path / "run[1]" / "train.jsonl"), "test": str(tmp_path / "t.jsonl")}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2 and "run[1]/train.jsonl" in res.output, res.output


def test_bom_csv_trains_and_other_encodings_are_named(assets, tmp_path):
    rows = [json.loads(line) for line in Path(assets["data"]["train"]).read_text().splitlines()]
    images = Path(assets["data"]["train"]).parent
    for split, source in (("train", assets["data"]["train"]), ("test", assets["data"]["test"])):
        lines = ["image,question,answer,kind"] + [
            f"{images / r['image']},{r['question']},{r['answer']},{r['kind']}"
            for r in (json.loads(line) for line in Path(source).read_text().splitlines())]
        (tmp_path / f"{split}.csv").write_bytes("\ufeff".encode() + "\r\n".join(lines).encode("utf-8"))  # "CSV UTF-8"
    samples = load_manifest(tmp_path / "train.csv")
    assert len(samples) == len(rows) and samples[0].text == rows[0]["question"]
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"},
                           tmp_path / "adapters", epochs=1)
    (tmp_path / "bom.yaml").write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(tmp_path / "bom.yaml")])
    assert res.exit_code == 0, res.output
    latin = tmp_path / "latin.csv"
    data = "image,question,answer\nx.png,qu'est-ce que c'est,caf\xe9\n".encode("latin-1")
    latin.write_bytes(data)
    offset = data.index(bytes([0xE9]))
    with pytest.raises(DataError, match=rf"latin.csv: not UTF-8 text \(byte {offset}: b'\\xe9\\n'...\); save it as UTF-8"):
        load_manifest(latin)


def test_recipe_file_in_another_encoding_is_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"r.yaml: not UTF-8 text \(byte 9"):
        load_recipe(path)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "not UTF-8" in res.output and "Traceback" not in res.output


def run_cli_in_fresh_python(*args) -> subprocess.CompletedProcess:
    """The CLI in a new interpreter; prints the heavy libraries it imported on the last line."""
    code = ("import sys\nfrom mmpeft.cli import main\nsys.argv = ['mmpeft', *sys.argv[1:]]\ntry:\n    main()\n"
            "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'accelerate'}))\n"
            "sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)


def test_validate_and_recipe_errors_do_not_load_torch(tmp_path):
    ok = run_cli_in_fresh_python("validate", "recipes/medical_vqa.yaml")
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == "[]", ok.stdout + ok.stderr
    bad = run_cli_in_fresh_python("finetune", "recipes/quickstart.yaml", "train.epoch=3")
    assert bad.returncode == 2 and "did you mean 'epochs'" in bad.stderr
    assert bad.stdout.strip().splitlines()[-1] == "[]"


def test_help_shows_types_in_words_and_version():
    for command in (["finetune", "--help"], ["predict", "--help"], ["bench", "search", "--help"], ["--help"]):
        res = runner.invoke(app, command)
        assert res.exit_code == 0
        for typer_label in ("<bool>", "<list[str]>", "<int>", "<str>", "<path>", "{recipe}", "{bundle}"):
            assert typer_label not in res.output, (command, typer_label)
    assert "finetune [OPTIONS] RECIPE [KEY=VALUE]..." in runner.invoke(app, ["finetune", "--help"]).output
    from mmpeft.version import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"mmpeft {__version__}"


def test_dry_run_table_fits_80_columns(assets, tmp_path):
    raw = tiny.recipe_dict(assets["bert"], assets["effnet"], assets["data"], tmp_path, text_method="lora", image_method="adapter")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(tmp_path / "r.yaml"), "--dry-run"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 80
    assert "text: lora touches query x2, value x2" in res.output


def test_shared_files_have_ordinary_permissions(assets, tmp_path):
    from mmpeft.bundle.writer import write_bundle
    from mmpeft.model import build_model
    from tests.helpers import recipe_for

    recipe = recipe_for(assets, "bert", "lora", tmp_path)
    model = build_model(recipe, 3)
    old = os.umask(0o022)
    try:
        write_bundle(tmp_path / "b", model, recipe, ["a", "b", "c"], {"test": {}})
        os.umask(0o077)
        write_bundle(tmp_path / "private", model, recipe, ["a", "b", "c"], {"test": {}})
    finally:
        os.umask(old)
    for folder, (file_mode, dir_mode) in (("b", (0o644, 0o755)), ("private", (0o600, 0o700))):
        paths = [tmp_path / folder, *(tmp_path / folder).rglob("*")]
        modes = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
        dirs = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
        assert modes == {file_mode} and dirs == {dir_mode}, (folder, modes, dirs)


def test_readme_tour_uses_real_files():
    text = (ROOT / "README.md").read_text()
    tour = text.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    assert "some.png" not in tour and "easy_vqa.get_test_image_paths()" in tour
    assert "after it has finished" in tour and ". .venv/bin/activate" in tour
    assert "osf.io/89kps" in text  # where VQA-RAD comes from, for users without ../shared


def test_validate_reads_and_checks_every_row_as_finetune_does(assets, tmp_path):
    """`mmpeft validate` said OK for each of these; it now reads every row and opens every file
    (without torch), exits 2 naming the file, row or column, and says how much it checked."""
    base = project(assets, tmp_path)
    recipe = base / "recipes" / "tiny.yaml"
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "rows checked: 36 train / 12 validation / 24 test; 72 image, 0 audio and 0 video file(s) opened" in res.output
    rows = [json.loads(line) for line in (base / "data" / "train.jsonl").read_text().splitlines()]
    (base / "data" / "images" / "fake.jpg").write_text("a text file saved as .jpg")

    def manifest(name: str, edit) -> str:
        changed = [edit(i, dict(r)) for i, r in enumerate(rows)]
        (base / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in changed))
        return f"data.train={base / 'data' / name}"

    renamed = manifest("renamed.jsonl", lambda i, r: {"img": r["image"], "q": r["question"], "a": r["answer"]})
    missing = manifest("missing.jsonl", lambda i, r: {**r, "image": "images/nope.png"} if i == 3 else r)
    text_jpg = manifest("textjpg.jsonl", lambda i, r: {**r, "image": "images/fake.jpg"} if i == 5 else r)
    no_question = manifest("noq.jsonl", lambda i, r: {k: v for k, v in r.items() if k != "question"} if i == 2 else r)
    (base / "data" / "empty.jsonl").write_text("")
    (base / "data" / "rows.arrow").write_bytes(b"ARROW1")
    cases = [
        ([renamed], ["renamed.jsonl, row 1", "missing field(s) 'image', 'question', 'answer'", "it has: img, q, a"]),
        ([missing], ["missing.jsonl, row 4", "nope.png"]),
        ([text_jpg], ["textjpg.jsonl, row 6", "fake.jpg"]),
        ([no_question], ["noq.jsonl, row 3", "missing field(s) 'question'"]),
        ([f"data.test={base / 'data' / 'empty.jsonl'}"], ["no test rows (check data.test:", "empty.jsonl"]),
        ([f"data.train={base / 'data' / 'rows.arrow'}"], ["unsupported manifest type '.arrow'", "data.source: huggingface"]),
    ]
    for overrides, needles in cases:
        res = runner.invoke(app, ["validate", str(recipe), *overrides])
        flat = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output, (overrides, res.output)
        assert all(n in flat for n in needles), (needles, res.output)


def test_the_own_data_example_is_a_working_manifest_and_recipe():
    """recipes/own_data.yaml reads the shipped example manifest, at the encoders' own image
    size, and the README shows the manifest's first row as it is."""
    res = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "own_data.yaml")])
    assert res.exit_code == 0 and "rows checked: 18 train / 6 validation / 12 test; 36 image" in res.output, res.output
    recipe = load_recipe(ROOT / "recipes" / "own_data.yaml")
    assert recipe.encoders["image"].image_size is None and recipe.data.source == "manifest"
    first = (ROOT / "examples" / "own_data" / "train.jsonl").read_text().splitlines()[0]
    assert first in (ROOT / "README.md").read_text()


def test_predict_spells_the_answer_as_its_top_k_does(capsys):
    """The medical bundle printed `No` above a top-k list saying `no`."""
    from mmpeft.cli.common import print_answers

    print_answers({"answer": "no", "top_k": [{"answer": "no", "probability": 0.9428}, {"answer": "yes", "probability": 0.0016}]})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["no", "  0.9428  no", "  0.0016  yes"]


def test_predict_input_reads_the_columns_the_bundle_was_trained_on(assets, tmp_path):
    """`predict --input` used the default column names whatever the bundle was trained on, and
    said so only after loading the model: it now reads the recipe's names, and checks every
    row before torch loads."""
    base = project(assets, tmp_path)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (base / "data" / f"{split}.jsonl").read_text().splitlines()]
        renamed = [{"img": r["image"], "q": r["question"], "a": r["answer"]} for r in rows]
        (base / "data" / f"{split}_renamed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    recipe = base / "recipes" / "tiny.yaml"
    overrides = ["data.train=../data/train_renamed.jsonl", "data.test=../data/test_renamed.jsonl", "data.image_field=img",
                 "data.text_field=q", "data.label_field=a"]
    raw = load_recipe(recipe, [], anchor=False).model_dump(mode="json")
    raw["data"].update({k.split(".", 1)[1]: v for k, v in (o.split("=", 1) for o in overrides)})
    raw["output"]["dir"] = str(tmp_path / "out")
    (base / "recipes" / "renamed.yaml").write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["finetune", str(base / "recipes" / "renamed.yaml")])
    assert res.exit_code == 0 and re.search(r"finished in \d+ s", res.output), res.output  # the run's total time, last
    bundle = tmp_path / "out" / "tiny"
    res = CliRunner().invoke(app, ["predict", str(bundle), "--input", str(base / "data" / "test_renamed.jsonl")])
    assert res.exit_code == 0 and "24 predictions" in res.output, res.output
    bad = base / "data" / "bad.jsonl"
    bad.write_text(json.dumps({"img": "images/test_0.png", "question": "x"}) + "\n")
    proc = run_cli_in_fresh_python("predict", str(bundle), "--input", str(bad))
    assert proc.returncode == 2 and "bad.jsonl, row 1: needs field(s) 'q'" in " ".join(proc.stderr.split()), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # answered before torch was imported


def test_recipes_ship_in_the_package_and_copy_out(tmp_path):
    """`mmpeft recipes list / copy` read the recipes inside the installed package (mmpeft/recipes
    is this repository's recipes/ folder, so a pip install has them too)."""
    from importlib.resources import files

    from typer.testing import CliRunner

    from mmpeft.cli import app

    shipped = Path(str(files("mmpeft") / "recipes"))
    repo = Path(__file__).resolve().parents[1] / "recipes"
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in repo.glob("*.yaml"))
    runner = CliRunner()
    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0 and "quickstart" in res.output and "easy_vqa_caption" in res.output, res.output
    assert "Quickstart: easy-VQA" in res.output
    res = runner.invoke(app, ["recipes", "copy", "quickstart", str(tmp_path / "mine")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mine" / "quickstart.yaml").read_bytes() == (repo / "quickstart.yaml").read_bytes()
    res = runner.invoke(app, ["recipes", "copy", "quickstart", str(tmp_path / "mine")])
    assert res.exit_code == 2 and "already exists" in res.output
    assert runner.invoke(app, ["recipes", "copy", "quickstart", str(tmp_path / "mine"), "--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["recipes", "copy", "quikstart"])
    assert res.exit_code == 2 and "did you mean 'quickstart'" in res.output, res.output


def test_finetune_says_once_when_images_are_read_far_below_their_size(assets, tmp_path):
    """A copied quickstart keeps image_size 64: real photos would train at 64 px without a word."""
    from PIL import Image
    from typer.testing import CliRunner

    from mmpeft.cli import app
    from tests import tiny

    files = tiny.make_dataset(tmp_path / "data")
    runner = CliRunner()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny.recipe_dict(assets["bert"], assets["vit"], files, tmp_path / "out")))
    res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 0 and "fine detail is lost" not in res.output, res.output  # 32 px images at 32 px
    for image in (tmp_path / "data" / "images").glob("*.png"):
        Image.open(image).convert("RGB").resize((256, 192)).save(image)
    res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("images are 256 px on their longer side (median); encoder 'image' reads them at 32 px") == 1
