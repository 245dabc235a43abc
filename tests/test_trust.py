"""Integrity that a file cannot switch off, pinned digests, pulls that verify what they copied,
and damaged files that end in a clear message instead of a traceback (issue 35)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmpeft.bundle import hub
from mmpeft.bundle.io import load_bundle
from mmpeft.bundle.manifest import bundle_digest
from mmpeft.cli import app
from mmpeft.errors import BundleError
from mmpeft.files import json_fingerprint
from mmpeft.serve.pool import AdapterPool
from tests.helpers import copy_of, fixed_batch

runner = CliRunner()
DIGEST = re.compile(r"digest (sha256:[0-9a-f]{64})")


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def edit_manifest(folder: Path, change, reseal: bool = False) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    if reseal:  # as a forger would: the integrity hash recomputed
        manifest.pop("integrity", None)
        manifest["integrity"] = json_fingerprint(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def as_format_1(manifest: dict) -> None:
    manifest.pop("integrity")
    manifest["format_version"] = 1


def answers(folder: Path, assets) -> list:
    data = Path(assets["data"]["test"]).parent
    res = runner.invoke(app, ["predict", str(folder), "--image", str(data / "images/test_1.png"),
                              "--question", "what color is the shape ?"])
    assert res.exit_code == 0, res.output
    return res.output


def test_a_downgraded_bundle_is_refused_and_names_the_command_that_seals_ones_own(bundle, tmp_path, assets):
    evil = copy_of(bundle, tmp_path)

    def downgrade(m):  # the attack of the issue: answers swapped, integrity deleted, format 1 declared
        m["vocabulary"][:2] = m["vocabulary"][1::-1]
        as_format_1(m)

    edit_manifest(evil, downgrade)
    with pytest.raises(BundleError, match="format 1 is not sealed"):
        load_bundle(evil)
    data = Path(assets["data"]["test"]).parent
    for command in (["predict", str(evil), "--image", str(data / "images/test_1.png"), "--question", "q"],
                    ["inspect", str(evil)], ["merge", str(evil), "--out", str(tmp_path / "m")]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2 and f"mmpeft seal {evil}" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_seal_upgrades_an_own_format_1_bundle_and_never_blesses_a_changed_file(bundle, tmp_path, assets):
    old = copy_of(bundle, tmp_path, "old")
    edit_manifest(old, as_format_1)
    res = runner.invoke(app, ["seal", str(old)])
    assert res.exit_code == 0 and "sealed (format 2)" in res.output, res.output
    digest = DIGEST.search(res.output).group(1)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and digest == bundle_digest(manifest)
    assert answers(old, assets) == answers(bundle, assets)  # sealing changes no weight and no answer
    res = runner.invoke(app, ["seal", str(old)])
    assert res.exit_code == 0 and "already sealed; unchanged" in res.output and digest in res.output

    changed = copy_of(bundle, tmp_path, "changed")
    edit_manifest(changed, as_format_1)
    head = load_file(str(changed / "head.safetensors"))
    save_file({k: v + 1 for k, v in head.items()}, str(changed / "head.safetensors"))
    before = (changed / "manifest.json").read_text()
    res = runner.invoke(app, ["seal", str(changed)])
    assert res.exit_code == 2 and "does not match" in res.output and (changed / "manifest.json").read_text() == before


def test_a_pinned_digest_refuses_a_resealed_forgery_everywhere(bundle, tmp_path, assets):
    res = runner.invoke(app, ["inspect", str(bundle)])
    assert res.exit_code == 0, res.output
    digest = DIGEST.search(res.output).group(1)
    assert digest == bundle_digest(json.loads((bundle / "manifest.json").read_text()))
    data = Path(assets["data"]["test"]).parent
    ask = ["--image", str(data / "images/test_1.png"), "--question", "what color is the shape ?"]
    res = runner.invoke(app, ["predict", str(bundle), *ask, "--expect-digest", digest])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["predict", str(bundle), *ask, "--expect-digest", digest[len("sha256:"):].upper()]).exit_code == 0

    forged = copy_of(bundle, tmp_path, "forged")  # answers swapped and resealed: the integrity hash cannot tell
    edit_manifest(forged, lambda m: m["vocabulary"].reverse(), reseal=True)
    load_bundle(forged)  # loads: integrity is against accidents only
    for command in (["predict", str(forged), *ask], ["evaluate", str(forged)], ["merge", str(forged), "--out", str(tmp_path / "m")],
                    ["pull", str(forged), "--out", str(tmp_path / "p")]):
        res = runner.invoke(app, [*command, "--expect-digest", digest])
        assert res.exit_code == 2 and "not the expected" in res.output and "Traceback" not in res.output, (command, res.output)
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
    with pytest.raises(BundleError, match="not the expected"):
        AdapterPool({"x": forged}, log=lambda *a: None, digests={"x": digest})
    pool = AdapterPool({"x": bundle}, log=lambda *a: None, digests={"x": digest})
    assert pool.bundles["x"].summary["digest"] == digest
    res = runner.invoke(app, ["serve", str(bundle), str(forged), "--expect-digest", digest])
    assert res.exit_code == 2 and "NAME=sha256:HEX once per served bundle" in res.output


def test_push_and_pull_print_the_digest_and_pull_pins_it(bundle, tmp_path):
    digest = bundle_digest(json.loads((bundle / "manifest.json").read_text()))
    res = runner.invoke(app, ["push", str(bundle), "alice/b", "--hub-dir", str(tmp_path / "hub")])
    assert res.exit_code == 0 and digest in res.output, res.output
    res = runner.invoke(app, ["pull", "alice/b", "--hub-dir", str(tmp_path / "hub"), "--out", str(tmp_path / "got"),
                              "--expect-digest", digest])
    assert res.exit_code == 0 and f"the pinned digest {digest}" in res.output, res.output


def test_pull_verifies_the_copy_so_a_file_swapped_after_the_check_never_lands(bundle, tmp_path, monkeypatch):
    source = copy_of(bundle, tmp_path, "source")
    checked = hub._check_tree

    def check_then_swap(root, manifest, where, ignore=()):
        files = checked(root, manifest, where, ignore)
        if Path(root) == source:  # right after the source was checked, before it is copied
            (source / "README.md").unlink(missing_ok=True)
            (source / "metrics.json").write_text('{"test": {"accuracy": 1.0}}')
        return files

    monkeypatch.setattr(hub, "_check_tree", check_then_swap)
    res = runner.invoke(app, ["pull", str(source), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "metrics.json does not match" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_a_hub_folder_is_looked_up_alone_and_repo_ids_cannot_leave_it(bundle, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hugging Face Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    (tmp_path / "hub").mkdir()
    shutil.copytree(bundle, tmp_path / "outside")  # a real bundle beside the hub folder
    monkeypatch.chdir(tmp_path / "hub")
    res = runner.invoke(app, ["pull", "me/nonexistent", "--hub-dir", ".", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "is not in the hub folder" in res.output, res.output
    for evil in ("../outside", "a/../../outside", "me/..", "me/-x", "a/b/c"):
        res = runner.invoke(app, ["pull", evil, "--hub-dir", "sub", "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and "must look like 'owner/name'" in res.output, (evil, res.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("where", ["encoders", "encoders/text"])
def test_a_symlink_loop_in_a_bundle_is_a_clear_error(bundle, tmp_path, assets, where):
    evil = copy_of(bundle, tmp_path)
    shutil.rmtree(evil / where)
    (evil / where).symlink_to(evil / where)  # points at itself
    data = Path(assets["data"]["test"]).parent
    for command in (["inspect", str(evil)], ["predict", str(evil), "--image", str(data / "images/test_1.png"), "--question", "q"],
                    ["evaluate", str(evil)], ["merge", str(evil), "--out", str(tmp_path / "m")]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2 and "symbolic-link loop" in res.output and "Traceback" not in res.output, (command, res.output)


def test_a_deeply_nested_safetensors_header_is_a_clear_error(bundle, tmp_path):
    evil = copy_of(bundle, tmp_path)
    header = b"[" * 200_000
    (evil / "head.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    edit_manifest(evil, lambda m: None)
    from mmpeft.files import seal

    seal(evil)  # resealed: only the header's own check can refuse it
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(evil)


def test_a_huge_vocabulary_is_refused_before_its_head_is_built(bundle, tmp_path, monkeypatch):
    evil = copy_of(bundle, tmp_path)
    huge = [f"a{i}" for i in range(1_000_000)]

    def grow(m):
        m["vocabulary"] = huge
        m["tasks"]["answer"]["state"]["labels"] = huge

    edit_manifest(evil, grow, reseal=True)
    from mmpeft import model as model_module

    built = []
    real = model_module.build_fusion
    monkeypatch.setattr(model_module, "build_fusion", lambda *a, **k: built.append(torch.get_default_device()) or real(*a, **k))
    with pytest.raises(BundleError, match=r"head.safetensors does not match the model its recipe builds: .*shape mismatch"):
        load_bundle(evil)
    assert built and all(d.type == "meta" for d in built)  # nothing of its size was allocated
    loaded = load_bundle(bundle)  # an honest bundle passes the same check
    inputs, _ = fixed_batch(loaded.model, 2)
    assert loaded.model.logits(inputs).shape == (2, 3)
