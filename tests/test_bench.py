"""Benchmark summaries: mean +- std over seeds and the goal check are computed, not typed in."""
from pathlib import Path

import pytest

from mmpeft.bench.vqa_rad import goals, markdown, summarize

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
VQA_RAD_RECIPE = str(REPO / "recipes" / "medical_vqa_15ep.yaml")


def _run(config, seed, open_, closed, overall, trainable=100, total=10_000):
    return {"config": config, "seed": seed, "open": open_, "closed": closed, "overall": overall, "trainable": trainable,
            "total": total, "peak_rss_mib": 1000.0 + seed, "epoch_seconds": 10.0 + seed}


def test_summary_mean_std_over_seeds():
    runs = [_run("lora", 0, 0.60, 0.80, 0.72), _run("lora", 1, 0.64, 0.78, 0.74), _run("head only", 0, 0.5, 0.7, 0.6)]
    rows = {r["config"]: r for r in summarize(runs)}
    lora = rows["lora"]
    assert lora["seeds"] == 2
    assert lora["open"][0] == pytest.approx(62.0) and lora["open"][1] == pytest.approx(2.8284271, rel=1e-6)
    assert lora["overall"][0] == pytest.approx(73.0)
    assert lora["trainable_pct"] == pytest.approx(1.0)
    assert lora["peak_mib"] == 1001.0 and lora["epoch_seconds"] == pytest.approx(10.5)
    assert rows["head only"]["open"] == (pytest.approx(50.0), 0.0)


def test_goals_pick_best_peft_and_compare_with_full():
    runs = [_run("lora", 0, 0.6, 0.81, 0.73, trainable=150), _run("bitfit", 0, 0.6, 0.7, 0.65),
            _run("full", 0, 0.6, 0.8, 0.745, trainable=10_000), _run("head only", 0, 0.7, 0.9, 0.9)]
    text = goals(summarize(runs))
    # head only and full are not PEFT configurations, so lora is the best one even though head only scores higher
    assert "`lora`" in text
    assert "overall >= 72: 73.0 (met)" in text and "closed >= 80: 81.0 (met)" in text
    assert "trainable <= 2%: 1.50% (met)" in text
    assert "(74.5): +1.5 (missed)" in text
    assert "full not run yet" in goals(summarize(runs[:2]))
    assert goals(summarize([runs[3]])) == ""


def test_markdown_prints_settings_and_published_rows():
    runs = [_run("lora", 0, 0.6, 0.8, 0.72), _run("lora", 1, 0.6, 0.8, 0.72)]
    runs[0]["cpu_steal_pct"], runs[1]["cpu_steal_pct"] = 12.0, 74.6
    machine = {"cuda": None, "processor": "cpu", "cpu_count": 2, "torch": "2.x", "torch_threads": 1}
    text = markdown({"recipe": "r.yaml", "overrides": [], "machine": machine, "settings": "160 px, 15 epochs",
                     "summary": summarize(runs[:1]), "runs": runs})
    assert "cpu, 2 CPU cores, torch 2.x (1 threads)" in text
    assert "Settings: 160 px, 15 epochs." in text
    assert "during the runs: 12-75% (2 of 2 runs measured)" in text
    assert "| lora | 1 | 60.0 ± 0.0 | 80.0 ± 0.0 | 72.0 ± 0.0 | 100 | 1.00 | 1000 | 10.0 |" in text
    assert "| PubMedCLIP (published) | | 60.1 | 80.0 | 72.1 |" in text


def test_bad_subset_or_override_stops_before_any_run(tmp_path):
    """A typo in --configs, --methods, --sides, --seeds or an override is reported before
    anything is trained or written, with the available choices."""
    from mmpeft.bench.common import choose, parse_seeds
    from mmpeft.bench import methods as bench_methods
    from mmpeft.bench import vqa_rad
    from mmpeft.errors import RecipeError, UsageError

    assert choose(None, ["a", "b"], "--x") == ["a", "b"]
    assert choose(["b"], ["a", "b"], "--x") == ["b"]
    with pytest.raises(UsageError, match=r"--configs: unknown 'fulll'; did you mean 'full'\? \(available: head only, lora"):
        vqa_rad.run(VQA_RAD_RECIPE, configs=["lora", "fulll"], out=str(tmp_path / "out"), work_dir=str(tmp_path / "runs"))
    with pytest.raises(UsageError, match="--methods: unknown 'lroa'; did you mean 'lora'"):
        bench_methods.run(QUICKSTART, methods=["lroa"], out=str(tmp_path / "out"), work_dir=str(tmp_path / "runs"))
    with pytest.raises(UsageError, match="--sides: unknown 'audio'"):
        bench_methods.run(QUICKSTART, sides=["audio"], out=str(tmp_path / "out"), work_dir=str(tmp_path / "runs"))
    with pytest.raises(RecipeError, match="bach_size"):
        vqa_rad.run(VQA_RAD_RECIPE, configs=["lora"], overrides=["train.bach_size=8"], out=str(tmp_path / "out"), work_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"--out .*a_file/out: cannot create that folder .*choose a writable folder"):
        vqa_rad.run(VQA_RAD_RECIPE, configs=["lora"], out=str(blocker / "out"), work_dir=str(tmp_path / "runs"))
    with pytest.raises(UsageError, match="cannot create that folder"):
        bench_methods.run(QUICKSTART, methods=["lora"], out=str(blocker / "out"), work_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
    assert parse_seeds("0,1,2") == (0, 1, 2)
    with pytest.raises(UsageError, match="--seeds: expected comma-separated integers"):
        parse_seeds("0,one")


def test_resume_only_into_results_of_the_same_recipe(tmp_path):
    """Runs resume only into a results file made with the same resolved recipe; another
    recipe's results are refused (not overwritten), and nothing trains with no jobs left."""
    import json

    from mmpeft.bench import methods as bench_methods
    from mmpeft.bench import vqa_rad
    from mmpeft.bench.common import recipe_fingerprint
    from mmpeft.config import load_recipe
    from mmpeft.errors import UsageError

    recipe = "recipes/medical_vqa_15ep.yaml"
    out = tmp_path / "out"
    out.mkdir()
    cache = out / "vqa_rad.json"
    done = [_run("lora", 0, 0.6, 0.8, 0.72)]
    other = recipe_fingerprint(load_recipe(recipe, ["train.epochs=3"]))
    assert other != recipe_fingerprint(load_recipe(recipe, []))
    # data location and output settings do not change results, so they do not change the fingerprint
    assert other == recipe_fingerprint(load_recipe(recipe, ["train.epochs=3", "data.root=/elsewhere", "output.dir=x"]))
    cache.write_text(json.dumps({"recipe": recipe, "overrides": ["train.epochs=3"], "recipe_sha256": other, "runs": done}))
    before = cache.read_text()
    with pytest.raises(UsageError, match="holds runs of another recipe or other overrides .*Pass another --out"):
        vqa_rad.run(recipe, str(out), ["lora"], seeds=(0,), work_dir=str(tmp_path / "runs"))
    assert cache.read_text() == before
    result = vqa_rad.run(recipe, str(out), ["lora"], seeds=(0,), overrides=["train.epochs=3"], work_dir=str(tmp_path / "runs"))
    assert result["runs"] == done and result["summary"][0]["overall"] == (pytest.approx(72.0), 0.0)
    # a file from before fingerprints existed matches on recipe path and overrides, and gains one
    cache.write_text(json.dumps({"recipe": recipe, "overrides": [], "runs": done}))
    vqa_rad.run(recipe, str(out), ["lora"], seeds=(0,), work_dir=str(tmp_path / "runs"))
    assert json.loads(cache.read_text())["recipe_sha256"] == recipe_fingerprint(load_recipe(recipe, []))
    assert not (tmp_path / "runs").exists()
    # the methods benchmark resumes the same way
    (out / "methods.json").write_text(json.dumps({"recipe": "recipes/quickstart.yaml", "overrides": [], "rows": [],
                                                 "recipe_sha256": other}))
    with pytest.raises(UsageError, match="methods.json holds runs of another recipe"):
        bench_methods.run(QUICKSTART, out=str(out), methods=["lora"], work_dir=str(tmp_path / "runs"))


def test_bundles_of_another_out_stay_apart():
    """A benchmark with a non-default --out keeps its bundles under <out>/runs, so it cannot
    overwrite the bundles behind the committed results (both benchmarks use this helper)."""
    from mmpeft.bench.common import bundle_folder

    assert bundle_folder("benchmarks/results", "benchmarks/runs") == "benchmarks/runs"
    assert bundle_folder("benchmarks/results/", "benchmarks/runs/vqa_rad") == "benchmarks/runs/vqa_rad"
    assert bundle_folder("/tmp/other", "benchmarks/runs") == "/tmp/other/runs"


def test_steal_percent_from_proc_stat_counters():
    """Steal is the 8th /proc/stat counter's share of the first eight."""
    from mmpeft.bench.common import cpu_ticks, steal_percent

    start = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    end = [200, 0, 100, 1000, 0, 0, 0, 650, 0, 0]  # +100 user, +50 system, +200 idle, +600 steal
    assert steal_percent(start, end) == pytest.approx(63.2)
    assert steal_percent(None, end) is None and steal_percent(start, start) is None
    ticks = cpu_ticks()
    assert ticks is None or (len(ticks) >= 8 and all(t >= 0 for t in ticks))


def test_atomic_text_file_keeps_the_old_file_when_interrupted(tmp_path):
    """Results files and prediction files are written through a sibling and renamed: an
    error mid-write keeps the previous content and leaves no temporary file behind."""
    from mmpeft.bench.common import write_atomic
    from mmpeft.files import atomic_text_file

    target = tmp_path / "results.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_text_file(target) as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("results", sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("benchmarks/results/**/*.json")
                                           if "recipe_sha256" in p.read_text()))
def test_committed_results_still_resume(results):
    """Every committed benchmark still resumes: its stored settings, resolved by today's
    schema, give the fingerprint of its recipe and overrides resolved today."""
    import json

    from mmpeft.bench.common import previous_results, recipe_fingerprint
    from mmpeft.config import load_recipe

    res = json.loads(Path(results).read_text())
    root = Path(__file__).resolve().parents[1]
    assert "recipe_resolved" in res
    fingerprint = recipe_fingerprint(load_recipe(str(root / res["recipe"]), res["overrides"]))
    assert previous_results(Path(results), res["recipe"], res["overrides"], fingerprint) == res


def test_resume_survives_new_settings_with_defaults(tmp_path):
    """A setting added after a benchmark was run (absent from its stored settings) takes
    its default on both sides and does not stop a resume; a changed value, or a setting
    that no longer exists, still does. (Before, any new head setting broke every resume.)"""
    import json

    from mmpeft.bench.common import previous_results, recipe_fingerprint, resolved_settings
    from mmpeft.config import load_recipe
    from mmpeft.errors import UsageError

    recipe = "recipes/medical_vqa_15ep.yaml"
    loaded = load_recipe(recipe, [])
    fingerprint = recipe_fingerprint(loaded)
    cache = tmp_path / "vqa_rad.json"

    def stored(edit):
        settings = resolved_settings(loaded)
        edit(settings)
        cache.write_text(json.dumps({"recipe": recipe, "overrides": [], "recipe_sha256": "an older schema's hash",
                                     "recipe_resolved": settings, "runs": []}))

    stored(lambda s: (s["fusion"].pop("gate_input"), s["train"].pop("log_every")))  # as if added later, at defaults
    assert previous_results(cache, recipe, [], fingerprint)["runs"] == []
    stored(lambda s: s["train"].update(epochs=3))
    with pytest.raises(UsageError, match="holds runs of another recipe"):
        previous_results(cache, recipe, [], fingerprint)
    stored(lambda s: s["train"].update(removed_setting=1))
    with pytest.raises(UsageError, match="holds runs of another recipe"):
        previous_results(cache, recipe, [], fingerprint)
    stored(lambda s: s["train"].update(num_workers=4, log_every=7))  # change nothing computed: resumes across them
    assert previous_results(cache, recipe, [], fingerprint)["runs"] == []


def test_memory_benchmark_trains_every_configuration_on_cpu(tmp_path):
    # the CUDA table's code path, run on CPU with tiny models (no peak memory off CUDA)
    pytest.importorskip("bitsandbytes")
    from mmpeft.bench import memory

    text, image = memory.build_bases(tmp_path, small=True)
    rows = memory.training_report(text, image, "cpu", batch=2, steps=2, warmup=1)
    assert [(r["config"], r["gradient_checkpointing"]) for r in rows] == [
        (name, ckpt) for name, _, _ in memory.CONFIGS for ckpt in (False, True)]
    assert not [r for r in rows if "error" in r]
    by = {(r["config"], r["gradient_checkpointing"]): r for r in rows}
    full = by[("full (bf16 autocast)", False)]["trainable"]
    lora = {r["trainable"] for r in rows if r["config"] != "full (bf16 autocast)"}
    assert len(lora) == 1 and lora.pop() < full / 5
    assert all(r["peak_mib"] is None and r["samples_per_s"] > 0 and r["dry_run_estimate_mib"] > 0 for r in rows)
    # checkpointing is active, so the estimate shrinks with it
    assert by[("lora bf16", True)]["dry_run_estimate_mib"] < by[("lora bf16", False)]["dry_run_estimate_mib"]


def test_memory_targets_and_failed_runs():
    from mmpeft.bench import memory

    def run(config, ckpt, peak, rate):
        return {"config": config, "gradient_checkpointing": ckpt, "peak_mib": peak, "samples_per_s": rate,
                "trainable": 10, "dry_run_estimate_mib": 1.0, "model_mib": 1.0}

    result = {"machine": {"cuda": "GPU X", "processor": "cpu", "cpu_count": 2, "torch": "t"}, "settings": {},
              "weights": [{"encoder": "t", "float32": 400, "bfloat16": 200, "int8": 110, "nf4": 70, "nf4_vs_bf16": 0.35}],
              "training": [run("full (bf16 autocast)", False, 1000, 100), run("lora bf16", False, 400, 300),
                           run("lora bf16", True, 200, 200), run("lora + nf4 base (double quant)", False, 300, 150),
                           {"config": "lora + nf4 base (double quant)", "gradient_checkpointing": True, "error": "OutOfMemoryError: x"}]}
    targets = {t["target"]: t for t in memory.targets(result)}
    assert targets["NF4 encoder weight bytes / bf16"]["measured"] == pytest.approx(0.35) and targets["NF4 encoder weight bytes / bf16"]["met"]
    assert targets["LoRA bf16 peak / full fine-tuning peak"]["measured"] == pytest.approx(0.4)
    assert targets["NF4 throughput / LoRA bf16 throughput"]["measured"] == pytest.approx(0.5)
    assert not targets["NF4 throughput / LoRA bf16 throughput"]["met"]
    failed = targets["NF4 + checkpointing peak / LoRA bf16 + checkpointing peak"]
    assert failed["measured"] is None and not failed["met"]
    result["targets"] = memory.targets(result)
    text = memory.markdown(result)
    assert "GPU X" in text and "failed: OutOfMemoryError: x" in text and "| <= 0.45 | 0.40 | met |" in text


def test_search_runs_variants_in_parallel_and_resumes(assets, tmp_path):
    """`mmpeft bench search`: every variant x seed trains (two at a time), one result line
    each with its test accuracy and validation curve; a second call trains nothing."""
    import json

    import yaml
    from typer.testing import CliRunner

    from mmpeft.cli import app
    from tests import tiny

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "unused",
                                                      text_method="bitfit", image_method="bitfit")))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"recipe": str(recipe), "base": ["train.epochs=2"], "seeds": [0],
                                      "configs": {"slow": {"overrides": ["train.lr=0.0001"]},
                                                  "one_epoch": {"overrides": ["train.epochs=1"], "seeds": [0, 1]},
                                                  "no_data": {"overrides": [f"data.train={tmp_path / 'missing.jsonl'}"]}}}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "search", str(search), "--out", str(out), "--jobs", "2", "--threads", "1"])
    assert res.exit_code == 1 and "1 of 4 run(s) failed: no_data_s0" in res.output, res.output
    assert "no_data_s0 said: error:" in res.output and "missing.jsonl" in (out / "logs" / "no_data_s0.log").read_text()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["name"], r["seed"], r["rc"]) for r in rows) == [
        ("no_data", 0, 2), ("one_epoch", 0, 0), ("one_epoch", 1, 0), ("slow", 0, 0)]
    rows = [r for r in rows if r["rc"] == 0]
    for r in rows:
        metrics = json.loads((out / "runs" / f"{r['name']}_s{r['seed']}" / "metrics.json").read_text())
        assert r["overall"] == metrics["test"]["accuracy"] and r["eval"] == [h["eval_accuracy"] for h in metrics["history"]]
        assert r["epochs"] == (1 if r["name"] == "one_epoch" else 2) and r["jobs"] == 2 and r["threads"] == 1
        assert r["overrides"][-1] == ("train.epochs=1" if r["name"] == "one_epoch" else "train.lr=0.0001")
    one = sorted(100 * r["overall"] for r in rows if r["name"] == "one_epoch")
    mean = sum(one) / 2
    summary = (out / "summary.md").read_text()  # no answer types in this data: no open / closed columns
    assert f"| one_epoch | 0,1 | {mean:.1f} ± " in summary and "| variant | seeds | test accuracy | validation |" in summary
    assert "no_data" not in (out / "summary.md").read_text().split("Variants:")[0]
    # resuming trains only what has no result yet: here the failed run, which fails again
    res = CliRunner().invoke(app, ["bench", "search", str(search), "--out", str(out)])
    assert res.exit_code == 1 and "1 of 1 run(s) failed" in res.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    res = CliRunner().invoke(app, ["bench", "search", str(search), "--out", str(out), "--only", "slow,one_epoch"])
    assert res.exit_code == 0 and len((out / "results.jsonl").read_text().splitlines()) == 5
    # a variant whose settings changed is refused, not mixed with its old runs
    changed = yaml.safe_load(search.read_text())
    changed["configs"]["slow"]["overrides"] = ["train.lr=0.0002"]
    search.write_text(yaml.safe_dump(changed))
    res = CliRunner().invoke(app, ["bench", "search", str(search), "--out", str(out), "--only", "slow"])
    assert res.exit_code == 2 and "holds runs of variant 'slow' made with other settings" in res.output, res.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 5


def test_search_reports_every_task_of_a_multi_task_variant(assets, tmp_path):
    """A multi-task variant: the first task's accuracy is the main table; every other task's
    declared metrics are kept per run and summarised in a table of their own."""
    import json

    import yaml
    from typer.testing import CliRunner

    from mmpeft.cli import app
    from tests import tiny

    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "unused", text_method="bitfit",
                           image_method="bitfit", epochs=1)
    raw.pop("task")
    raw["tasks"] = {"answer": {"type": "vqa"}, "seen": {"type": "classification", "encoders": ["image"], "weight": 0.5}}
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"recipe": str(recipe), "seeds": [0, 1], "configs": {"both": {"overrides": []}}}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "search", str(search), "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    seen = []
    for r in rows:
        tasks = json.loads((out / "runs" / f"both_s{r['seed']}" / "metrics.json").read_text())["tasks"]
        assert r["overall"] == tasks["answer"]["accuracy"]
        assert r["others"] == {"seen": {"accuracy": tasks["seen"]["accuracy"], "macro_f1": tasks["seen"]["macro_f1"]}}
        seen.append(100 * tasks["seen"]["accuracy"])
    import statistics

    summary = (out / "summary.md").read_text()
    assert "Task `seen` on the same runs" in summary and "| variant | accuracy | macro_f1 |" in summary
    assert f"| both | {statistics.mean(seen):.1f} ± {statistics.stdev(seen):.1f} |" in summary


def test_search_file_problems_are_named_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from mmpeft.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: recipes/medical_vqa.yaml\nseed: [0]\nconfigs:\n  a: {overides: [train.lr=1]}\n  b: {overrides: train.lr=1}\n")
    res = CliRunner().invoke(app, ["bench", "search", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    for problem in ("seed: unknown key", "configs.a.overides: unknown key", "configs.b.overrides: expected a list"):
        assert problem in res.output, res.output
    typo = tmp_path / "typo.yaml"
    typo.write_text("recipe: recipes/medical_vqa.yaml\nconfigs:\n  a: {overrides: [train.epoch=3]}\n")
    res = CliRunner().invoke(app, ["bench", "search", str(typo), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "variant 'a' does not load" in res.output and "did you mean 'epochs'" in res.output
    res = CliRunner().invoke(app, ["bench", "search", str(typo), "--out", str(tmp_path / "o"), "--only", "b"])
    assert res.exit_code == 2 and "--only: unknown variant(s) b" in res.output
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_committed_search_resumes_with_nothing_left_to_run(tmp_path):
    """The committed H100 search is complete: resuming it trains nothing and rewrites the
    same summary from its result lines (the table is computed, not typed in)."""
    import shutil

    from typer.testing import CliRunner

    from mmpeft.cli import app

    root = Path(__file__).resolve().parents[1]
    committed = root / "benchmarks" / "results" / "vqa_rad_search_h100"
    out = tmp_path / "search"
    shutil.copytree(committed, out)
    res = CliRunner().invoke(app, ["bench", "search", str(root / "benchmarks" / "vqa_rad_search.yaml"), "--out", str(out),
                                   "train.mixed_precision=no", "data.root=/tmp/stage/vqa_rad"])
    assert res.exit_code == 0, res.output
    assert (out / "results.jsonl").read_text() == (committed / "results.jsonl").read_text()
    table = lambda p: p.read_text().split("\n\n", 1)[1]  # noqa: E731  (the first line names the search file's path)
    assert table(out / "summary.md") == table(committed / "summary.md")


def test_reproduce_script_names_real_commands_and_options():
    """Every `mmpeft bench` line of benchmarks/reproduce.sh names a real subcommand and only
    options it has (the commands behind the README's tables, paths explicit)."""
    import re
    import subprocess

    import typer.main

    from mmpeft.cli import app

    script = (REPO / "benchmarks" / "reproduce.sh").read_text().replace("\\\n", " ")
    commands = typer.main.get_command(app).commands["bench"].commands
    lines = [line for line in script.splitlines() if "mmpeft bench " in line and not line.lstrip().startswith("#")]
    assert len(lines) >= 12
    for line in lines:
        sub = re.search(r"mmpeft bench ([a-z-]+)", line).group(1)
        assert sub in commands, line
        known = {opt for p in commands[sub].params for opt in p.opts}
        used = set(re.findall(r"(--[a-z-]+)", line.split(f"mmpeft bench {sub}", 1)[1]))
        assert used <= known, (sub, used - known)
        required = {p.opts[0] for p in commands[sub].params if p.required and p.opts[0].startswith("--")}
        assert required <= used, (sub, required - used)
    listed = subprocess.run(["bash", str(REPO / "benchmarks" / "reproduce.sh"), "list"], capture_output=True, text=True)
    names = listed.stdout.split()
    assert listed.returncode == 0 and len(names) == len(lines) and "throughput" in names
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "reproduce.sh"), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_bench_generate_times_mmpeft_against_plain_generate_and_qlora(assets, tmp_path):
    """`mmpeft bench generate` on a tiny decoder: the scores of the bundle's one test scoring,
    identical text from mmpeft's path and plain transformers generate, the references unseen in
    training counted, and LoRA against QLoRA side by side (one process each)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from mmpeft.cli import app
    from tests import tiny
    from tests.test_generate import generate_recipe
    from tests.test_tasks import write_rows

    rows = write_rows(tmp_path / "rows")
    decoder = tiny.make_decoder(tmp_path / "llama64", "llama", hidden=64)
    raw = generate_recipe(assets, rows, tmp_path / "out", epochs=1)
    raw["task"]["decoder"] = str(decoder)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["bench", "generate", "--recipe", str(path), "--out", str(tmp_path / "res"), "--rows", "24",
                                   "--qlora-rows", "16"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "res" / "generate.json").read_text())
    stored = json.loads((tmp_path / "out" / "generate_bench" / "metrics.json").read_text())["tasks"]["answer"]
    assert result["test"]["exact_match"] == stored["exact_match"] and result["test_rows"] == 24
    g = result["generation"]
    assert g["rows"] == 24 and g["generated_tokens"] > 0 and set(g["tokens_per_second"]) == {"mmpeft", "transformers"}
    assert g["unseen_in_training"]["of_test_rows"] == 24
    lora, qlora = result["lora_vs_qlora"]
    assert "error" not in lora and "error" not in qlora, result["lora_vs_qlora"]
    assert qlora["decoder_weights_mb"] < lora["decoder_weights_mb"]  # NF4 linear layers take less than float32 ones
    assert (tmp_path / "res" / "answer_examples.png").is_file() and "mmpeft / transformers" in (tmp_path / "res" / "generate.md").read_text()


def test_methods_subset_keeps_other_rows_and_records_refusals(tmp_path):
    """A --methods subset adds to the rows of the same settings (kept, in benchmark order), and a
    method that cannot adapt an encoder (VeRA on the EfficientNet) is a row saying why, not a stop."""
    import json

    from mmpeft.bench import methods as bench_methods
    from mmpeft.bench.common import recipe_fingerprint
    from mmpeft.config import load_recipe

    out = tmp_path / "out"
    out.mkdir()
    rows = [{"side": "text", "method": "lora", "trainable": 10, "encoder_total": 100, "head_trainable": 5,
             "test_accuracy": 0.5, "seconds_per_epoch": 1.0, "adapter_bytes": 40},
            {"side": "image", "method": "bitfit", "trainable": 20, "encoder_total": 100, "head_trainable": 5,
             "test_accuracy": 0.6, "seconds_per_epoch": 2.0, "adapter_bytes": 80}]
    fingerprint = recipe_fingerprint(load_recipe(QUICKSTART, []))
    (out / "methods.json").write_text(json.dumps({"recipe": QUICKSTART, "overrides": [], "rows": rows,
                                                 "recipe_sha256": fingerprint}))
    got = bench_methods.run(QUICKSTART, out=str(out), methods=["vera"], sides=["image"], work_dir=str(tmp_path / "runs"))
    assert [(r["side"], r["method"]) for r in got] == [("image", "bitfit"), ("image", "vera"), ("text", "lora")]
    assert got[1]["refused"].startswith("none of the") and "Linear layers" in got[1]["refused"]
    assert not (tmp_path / "runs").exists()  # nothing trained
    table = (out / "methods.md").read_text()
    assert "| image | vera | refused: none of the" in table and "| text | lora | 10 |" in table


def test_vqa_rad_records_a_configuration_whose_method_cannot_adapt_an_encoder(tmp_path):
    from mmpeft.bench import vqa_rad

    result = vqa_rad.run(VQA_RAD_RECIPE, str(tmp_path / "out"), ["vera"], seeds=(0,), work_dir=str(tmp_path / "runs"))
    assert result["runs"] == [] and list(result["refused"]) == ["vera"]
    assert result["refused"]["vera"].startswith("image: none of the") and not (tmp_path / "runs").exists()
    assert "| vera | refused: image: none of the" in (tmp_path / "out" / "vqa_rad.md").read_text()
