"""Property-based fuzzing of every entry point that reads what a user (or a stranger) wrote:
recipes and their files, dotted overrides, manifests, bundle manifests and the recipes
inside bundles. Whatever comes in, the answer is a result or an MMPeftError whose message
names the file or key (exit code 2 or 1 through the CLI), never another exception, never a
traceback, never a hang.

A fixed seed and bounded example counts keep CI inside its budget;
``MMPEFT_FUZZ_EXAMPLES=<n>`` runs n examples per test (the README's figures come from
``MMPEFT_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q -s``). Each test prints
how many cases it tried and how they ended.
"""

import copy
import json
import os
import time
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import load_recipe
from mmpeft.data import load_manifest
from mmpeft.errors import MMPeftError
from tests import tiny

EXAMPLES = int(os.environ.get("MMPEFT_FUZZ_EXAMPLES", "0"))
runner = CliRunner()


def fuzz(default: int):
    return settings(max_examples=EXAMPLES or default, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class Tally:
    """Counts how the cases of one entry point ended; printed when the test ends."""

    def __init__(self, name: str):
        self.name, self.outcomes, self.slowest = name, Counter(), 0.0

    def __call__(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.slowest = max(self.slowest, seconds)

    def report(self) -> None:
        total = sum(self.outcomes.values())
        print(f"\nfuzz {self.name}: {total} cases, {dict(self.outcomes)}, tracebacks 0, slowest {self.slowest:.2f} s")


def expect_clean(tally: Tally, call, names=()):
    """Run ``call``; it may return or raise MMPeftError naming one of ``names`` (when given)."""
    start = time.perf_counter()
    try:
        call()
        outcome = "accepted"
    except MMPeftError as exc:
        outcome = f"refused (exit {exc.exit_code})"
        text = str(exc)
        assert text.strip(), "an error without a message"
        if names:
            assert any(n in text for n in names), f"message names none of {names}: {text[:300]}"
    seconds = time.perf_counter() - start
    assert seconds < 20, f"{seconds:.1f} s for one case: unbounded work"
    tally(outcome, seconds)


# --- values of every kind a YAML or JSON file can hold ---------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["lora", "none", "full", "gated", "hadamard", "vqa", "manifest", "epoch", "auto", "../x", "[zoo]", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)

BASE = {
    "name": "fuzz",
    "encoders": {"text": {"model": "minilm", "peft": {"method": "lora", "rank": 4}},
                 "image": {"model": "efficientnet-lite0", "peft": {"method": "bitfit"}}},
    "fusion": {"type": "hadamard", "hidden_size": 32},
    "task": {"type": "vqa"},
    "data": {"source": "easy_vqa"},
    "train": {"epochs": 1, "batch_size": 8},
    "output": {"dir": "out"},
}
KEYS = ["name", "encoders", "encoders.text", "encoders.text.model", "encoders.text.peft", "encoders.text.peft.method",
        "encoders.text.peft.rank", "encoders.text.peft.target_modules", "encoders.text.quantization",
        "encoders.image.peft.method", "encoders.image.image_size", "encoders.audio", "fusion", "fusion.type",
        "fusion.attend", "fusion.query", "fusion.hidden_size", "task", "task.type", "task.metric", "task.group_fields",
        "data", "data.source", "data.train", "data.root", "data.eval_fraction", "train", "train.epochs", "train.lr",
        "train.batch_size", "train.seed", "train.checkpoint_every", "train.mixed_precision", "output.name", "output.dir",
        "unknown", "train.unknown"]


def put(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return raw


RECIPES = Tally("recipes (load_recipe on mutated recipes)")


@fuzz(300)
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_recipes(changes):
    raw = copy.deepcopy(BASE)
    for key, value in changes:
        put(raw, key, value)
    expect_clean(RECIPES, lambda: load_recipe(raw), names=[k.split(".")[0] for k, _ in changes] + ["problem"])


OVERRIDES = Tally("dotted overrides")
override_text = st.one_of(
    st.tuples(st.sampled_from(KEYS + ["", ".", "a..b", "train.epochs.x"]), st.text(max_size=40)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=40),
    st.sampled_from(["train.epochs=&a [*a]", "fusion={type: hadamard, attend: [audio]}", "encoders.text.peft={method: lorra}",
                     "train.epochs=1e400", "data.train=[1, 2]", "output.name=../../etc", "name=.."]),
)


@fuzz(300)
@given(st.lists(override_text, min_size=1, max_size=3))
def test_overrides(overrides):
    expect_clean(OVERRIDES, lambda: load_recipe(BASE, overrides))


FILES = Tally("recipe files (bytes through `mmpeft validate`)")


def alias_bomb(depth: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


recipe_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: yaml.safe_dump(v).encode(), values),
    st.builds(lambda v: b"\xef\xbb\xbf" + yaml.safe_dump(v).encode(), values),  # a BOM
    st.builds(lambda v: yaml.safe_dump(v).replace("\n", "\r\n").encode("utf-16"), values),
    st.sampled_from([alias_bomb(9).encode(), b"train: {epochs: 1}\ntrain: {epochs: 2}\n", b"[" * 3000 + b"]" * 3000,
                     ("name: caf\xe9\n").encode("latin-1"), yaml.safe_dump(BASE).encode() * 2, b"\x00" * 50,
                     b"encoders: !!python/object/apply:os.system [echo hi]\n", b"a: " + b"9" * 5000 + b"\n"]),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz(150)
@given(data=recipe_bytes)
def test_recipe_files_through_the_cli(scratch, data):
    path = scratch / "r.yaml"
    path.write_bytes(data)
    start = time.perf_counter()
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code in (0, 2), (res.exit_code, res.output[-500:])
    assert "Traceback" not in res.output and (res.exit_code == 0 or "r.yaml" in res.output or "problem" in res.output)
    FILES(f"exit {res.exit_code}", time.perf_counter() - start)


def test_huge_recipe_file_is_refused_quickly(scratch):
    path = scratch / "big.yaml"
    path.write_bytes(b"# padding\n" * 3_000_000)  # 30 MB
    start = time.perf_counter()
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "more than the 1,000,000 allowed" in res.output
    assert time.perf_counter() - start < 5


MANIFESTS = Tally("manifests (JSONL, CSV, JSON)")
row_values = st.dictionaries(st.sampled_from(["image", "question", "answer", "kind", "", "x"]), values, max_size=5)


def manifest_bytes(kind: str, rows, bom: bool, crlf: bool, junk: bytes) -> bytes:
    if kind == "jsonl":
        text = "\n".join(json.dumps(r, default=str) for r in rows)
    elif kind == "json":
        text = json.dumps(rows, default=str)
    else:
        header = sorted({k for r in rows for k in r}) or ["image"]
        text = "\n".join([",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows])
    if crlf:
        text = text.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass") + junk


@fuzz(300)
@given(kind=st.sampled_from(["jsonl", "csv", "json"]), rows=st.lists(row_values, max_size=5), bom=st.booleans(),
       crlf=st.booleans(), junk=st.one_of(st.just(b""), st.binary(max_size=8),
                                          st.sampled_from([b'\n{"image": "a", "image": "b"}', b"\n\x00\x00", b"\xff\xfe"])))
def test_manifests(scratch, kind, rows, bom, crlf, junk):
    path = scratch / f"m.{kind}"
    try:
        path.write_bytes(manifest_bytes(kind, rows, bom, crlf, junk))
    except UnicodeEncodeError:
        return
    expect_clean(MANIFESTS, lambda: load_manifest(path), names=[str(path)])


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


BUNDLES = Tally("bundle manifests and recipes (load_bundle, inspect)")
MANIFEST_KEYS = ["format", "format_version", "run_name", "task", "encoders", "encoders.text", "encoders.text.files",
                 "encoders.text.method", "encoders.text.settings", "encoders.text.fingerprint", "encoders.text.trainable_parameters",
                 "encoders.text.quantization", "head", "head.file", "head.type", "vocabulary", "files", "versions", "merged",
                 "integrity", "new_key"]


@fuzz(60)
@given(changes=st.lists(st.tuples(st.sampled_from(MANIFEST_KEYS), values), min_size=1, max_size=3), reseal=st.booleans(),
       drop=st.lists(st.sampled_from(MANIFEST_KEYS), max_size=2), recipe_text=st.one_of(st.none(), st.text(max_size=200)))
def test_bundles(bundle, tmp_path_factory, changes, reseal, drop, recipe_text):
    """An edited manifest (or recipe.yaml) is refused by its integrity hash; one re-sealed by a
    forger is still refused with the key named, or loads, and never raises anything else."""
    import shutil

    from mmpeft.bundle.io import load_bundle
    from mmpeft.files import seal

    copy_dir = tmp_path_factory.mktemp("b")
    target = copy_dir / "b"
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for key, value in changes:
        put(manifest, key, value)
    for key in drop:
        parent, _, leaf = key.rpartition(".")
        node = manifest
        for part in filter(None, parent.split(".")):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    (target / "manifest.json").write_text(json.dumps(manifest, default=str))
    if recipe_text is not None:
        (target / "recipe.yaml").write_text(recipe_text)
    if reseal and isinstance(manifest, dict):
        try:
            seal(target)
        except (TypeError, ValueError, AttributeError):
            pass  # a manifest no longer sealable (a list where the table goes): left as edited
    expect_clean(BUNDLES, lambda: load_bundle(target), names=["manifest.json", "recipe.yaml", "metrics.json", str(target),
                                                              "problem", "encoder", "safetensors"])
    res = runner.invoke(app, ["inspect", str(target)])
    assert res.exit_code in (0, 2) and "Traceback" not in res.output, res.output[-800:]


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prompt", "bitfit"])
def test_dry_run_with_fuzzed_target_modules(assets, tmp_path, method):
    """Settings that pass the schema but not the model (targets that match nothing, regexes
    that do not compile) are a recipe error, not a traceback."""
    from mmpeft.train import finetune

    for targets in (["nope"], "([unclosed", [""], "query|value"):
        raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path, text_method=method)
        key = "attention_modules" if method == "adapter" else "target_modules" if method in ("lora", "ia3") else None
        if key is None:
            raw["encoders"]["text"]["peft"]["num_tokens"] = 1
        else:
            raw["encoders"]["text"]["peft"][key] = targets if method != "adapter" or isinstance(targets, str) else "nope"
        expect_clean(Tally("dry runs"), lambda: finetune(load_recipe(raw), dry_run=True), names=["encoders.text.peft", "problem"])


def teardown_module(module):
    for tally in (RECIPES, OVERRIDES, FILES, MANIFESTS, BUNDLES):
        tally.report()
