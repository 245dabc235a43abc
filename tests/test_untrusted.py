"""Untrusted bundles, archives and images, probed as an attacker would; and outputs that stay
where the user said. Each is refused with a clear message before much memory or disk is used."""

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmpeft.bundle.io import load_bundle
from mmpeft.cli import app
from mmpeft.errors import BundleError, DataError, UsageError
from mmpeft.files import seal
from tests.helpers import copy_of

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def pull(source, out):
    return runner.invoke(app, ["pull", str(source), "--out", str(out)])


@pytest.mark.parametrize("link_to", ["/dev/zero", "/etc/passwd", "folder", "itself"])
def test_pulled_folder_with_links_is_refused(bundle, tmp_path, link_to):
    evil = copy_of(bundle, tmp_path)
    target = {"folder": "/etc", "itself": str(evil)}.get(link_to, link_to)
    os.symlink(target, evil / "extra")
    res = pull(evil, tmp_path / "out")
    assert res.exit_code == 2 and "extra is a symbolic link" in res.output and not (tmp_path / "out").exists()


def test_listed_file_swapped_for_a_link_or_a_fifo_is_refused(bundle, tmp_path):
    evil = copy_of(bundle, tmp_path)
    (evil / "head.safetensors").unlink()
    os.symlink("/dev/zero", evil / "head.safetensors")
    res = pull(evil, tmp_path / "out")
    assert res.exit_code == 2 and "head.safetensors is a symbolic link" in res.output
    fifo = copy_of(bundle, tmp_path, "fifo")
    (fifo / "metrics.json").unlink()
    os.mkfifo(fifo / "metrics.json")  # reading it would block forever
    res = pull(fifo, tmp_path / "out")
    assert res.exit_code == 2 and "metrics.json is not a regular file" in res.output


def test_unlisted_files_are_not_copied_into_a_verified_bundle(bundle, tmp_path):
    evil = copy_of(bundle, tmp_path)
    (evil / "payload.py").write_text("import os\n")
    res = pull(evil, tmp_path / "out")
    assert res.exit_code == 2 and "payload.py is not listed in the bundle's manifest" in res.output
    assert not (tmp_path / "out").exists()


def test_archives_beyond_limits_wrong_kind_or_truncated(bundle, tmp_path, monkeypatch):
    from mmpeft.bundle import hub

    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(bundle, arcname="b")
    monkeypatch.setattr(hub, "MAX_ARCHIVE_BYTES", 1000)  # the bundle unpacks to more than this
    res = pull(good, tmp_path / "out")
    assert res.exit_code == 2 and "more than the 1,000 allowed" in res.output
    monkeypatch.undo()
    zip_named_tgz = tmp_path / "z.tar.gz"
    shutil.make_archive(str(tmp_path / "z"), "zip", bundle)
    os.replace(tmp_path / "z.zip", zip_named_tgz)
    res = pull(zip_named_tgz, tmp_path / "out")
    assert res.exit_code == 2 and "not a readable .tar.gz" in res.output
    truncated = tmp_path / "t.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = pull(truncated, tmp_path / "out")
    assert res.exit_code == 2 and "not a readable .tar.gz" in res.output and "Traceback" not in res.output
    assert pull(good, tmp_path / "out").exit_code == 0  # within the limits it unpacks


def test_nan_weights_are_refused(bundle, tmp_path):
    evil = copy_of(bundle, tmp_path)
    head = load_file(str(evil / "head.safetensors"))
    name = next(iter(head))
    head[name] = torch.full_like(head[name], float("nan"))
    save_file(head, str(evil / "head.safetensors"))
    seal(evil)  # even re-sealed by whoever changed it
    with pytest.raises(BundleError, match="hold NaN or infinite values"):
        load_bundle(evil)


def test_edited_manifest_is_caught_by_its_integrity_hash(bundle, tmp_path):
    evil = copy_of(bundle, tmp_path)
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["vocabulary"] = ["yes", "no", "maybe"]  # same length: no shape check could notice
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="was edited after it was written"):
        load_bundle(evil)
    res = runner.invoke(app, ["inspect", str(evil)])
    assert res.exit_code == 2 and "integrity" in res.output


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("head"),
    lambda m: m.update(vocabulary="abc"),
    lambda m: m["encoders"]["text"].update(files=5),
    lambda m: m["encoders"].update(text=[]),
    lambda m: m.update(format_version="2"),
    lambda m: m["files"].update({"head.safetensors": {"bytes": -1, "sha256": "x"}}),
])
def test_manifest_with_wrong_types_or_missing_keys(bundle, tmp_path, edit):
    from mmpeft.files import json_fingerprint

    evil = copy_of(bundle, tmp_path)
    manifest = json.loads((evil / "manifest.json").read_text())
    edit(manifest)
    manifest.pop("integrity")
    manifest["integrity"] = json_fingerprint(manifest)  # a forger fixes the integrity hash: the shape check still catches it
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="damaged or was edited"):
        load_bundle(evil)


def test_decompression_bombs_and_fifo_images_follow_on_bad_image(tmp_path, monkeypatch):
    from mmpeft.data import checks, probe_images
    from mmpeft.data.batching import ImageStore
    from mmpeft.data.samples import Sample

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((400, 500, 3), dtype=np.uint8)).save(big)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    rows = [Sample(str(big), "q", "a", {}, "row 1"), Sample(str(fifo), "q", "a", {}, "row 2"),
            Sample(str(tmp_path / "ok.png"), "q", "a", {}, "row 3")]
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    monkeypatch.setattr(checks, "MAX_IMAGE_PIXELS", 100_000)
    store = ImageStore(max_pixels=100_000)
    with pytest.raises(DataError, match=r"row 1: 500x400 = 200,000 pixels, more than the 100,000 allowed"):
        store.check({"t": rows}, "error")
    with pytest.raises(DataError, match="row 2: not a regular file"):
        probe_images({"t": rows[1:]}, "error")
    kept = ImageStore(max_pixels=100_000).check({"t": rows}, "skip")
    assert [s.where for s in kept["t"]] == ["row 3"]


def test_overwrite_replaces_only_what_mmpeft_wrote(bundle, tmp_path):
    from mmpeft.files import atomic_directory

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(mine), "--overwrite"])
    assert res.exit_code == 2 and "holds files mmpeft did not write" in res.output
    assert (mine / "thesis.tex").read_text() == "months of work"
    inside = copy_of(bundle, tmp_path, "bundle_with_notes")
    (inside / "my_notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="holds files mmpeft did not write"):
        with atomic_directory(inside, overwrite=True):
            pass
    assert (inside / "my_notes.txt").exists()


def test_outputs_that_cannot_be_written_are_caught_before_training(assets, tmp_path):
    import yaml

    from tests import tiny

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out_dir, needle in ((blocker / "sub", "cannot write"), ("/proc/mmpeft_out", "cannot write")):
        raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], out_dir, epochs=1)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        res = runner.invoke(app, ["finetune", str(tmp_path / "r.yaml")])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert "epoch 1" not in res.output  # refused before any training
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / ("d" * 300), epochs=1)  # > 255 bytes
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "cannot write" in res.output and "File name too long" in res.output


def test_leftover_temporary_folders_are_removed(tmp_path):
    from mmpeft.files import atomic_directory

    dead = tmp_path / ".out.tmp-999999999-abc"  # a pid no process has
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    with atomic_directory(tmp_path / "out") as folder:
        (folder / "f").write_text("ok")
    assert not dead.exists() and (tmp_path / "out" / "f").exists()
