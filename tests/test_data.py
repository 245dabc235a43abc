"""Manifests, built-in datasets, vocabulary and metrics."""

import json
from pathlib import Path

import pytest
import torch

from mmpeft.data import easy_vqa_samples, load_manifest, vqa_rad_samples
from mmpeft.data.batching import ImageStore
from mmpeft.errors import DataError
from mmpeft.tasks import Vocabulary, compute_metrics, normalize_answer

VQA_RAD = Path(__file__).resolve().parents[2] / "shared" / "vqa_rad"


def test_manifest_formats_agree(tmp_path):
    rows = [{"img": "a.png", "q": "what ?", "label": " Yes ", "kind": "closed"},
            {"img": "sub/b.png", "q": "where ?", "label": 4, "kind": "open"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.csv").write_text("img,q,label,kind\na.png,what ?, Yes ,closed\nsub/b.png,where ?,4,open\n")
    loaded = [load_manifest(tmp_path / f"m.{ext}", "img", "q", "label", ["kind"]) for ext in ("jsonl", "json", "csv")]
    for samples in loaded:
        assert [s.answer for s in samples] == ["yes", "4"]
        assert [s.image for s in samples] == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
        assert [s.groups["kind"] for s in samples] == ["closed", "open"]


def test_manifest_errors_name_file_and_row(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"image": "a.png", "question": "q", "answer": "x"}) + "\n" + json.dumps({"image": "b.png", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl, row 2: missing field\(s\) 'answer'"):
        load_manifest(p)
    p.write_text("{not json}\n")
    with pytest.raises(DataError, match=r"m.jsonl, line 1: not valid JSON"):
        load_manifest(p)
    with pytest.raises(DataError, match="unsupported manifest type '.txt'"):
        (tmp_path / "m.txt").write_text("x")
        load_manifest(tmp_path / "m.txt")


def test_bad_images_stop_or_skip(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"image": "ok.png", "question": "q", "answer": "a"}, {"image": "missing.png", "question": "q", "answer": "a"},
            {"image": "broken.png", "question": "q", "answer": "a"}]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_manifest(p)
    with pytest.raises(DataError, match=r"m.jsonl, row 2: file not found: .*missing.png \(2 bad image\(s\)"):
        ImageStore().check({"train": samples}, "error")
    kept = ImageStore().check({"train": samples}, "skip")
    assert [s.image for s in kept["train"]] == [str(tmp_path / "ok.png")]


def test_vocabulary_and_normalisation():
    assert normalize_answer("  Left   Lung ") == "left lung"
    assert normalize_answer(4) == "4"
    v = Vocabulary.build(["b", "a", "b", "c", "c", "c"], min_count=2)
    assert v.answers == ["c", "b"] and v.encode("a") == -1


def test_metrics_count_out_of_vocabulary_as_wrong():
    m = compute_metrics(["yes", "no", "yes", "yes"], ["yes", "no", "no", "unseen"],
                        {"t": ["closed", "closed", "closed", "open"]}, [True, True, True, False])
    assert m["accuracy"] == 0.5 and m["count"] == 4 and m["out_of_vocab"] == 1
    assert m["groups"]["t"] == {"closed": {"accuracy": 2 / 3, "count": 3}, "open": {"accuracy": 0.0, "count": 1}}
    # per class F1: yes: p=1/3 r=1 -> 0.5; no: p=1 r=0.5 -> 2/3; unseen: 0
    assert m["per_answer"]["yes"]["f1"] == pytest.approx(0.5)
    assert m["per_answer"]["no"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_easy_vqa_counts():
    pytest.importorskip("easy_vqa")
    train, test = easy_vqa_samples("train"), easy_vqa_samples("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({s.answer for s in train}) == 13
    assert {s.groups["question_type"] for s in test} == {"yes/no", "shape", "color"}


@pytest.mark.skipif(not (VQA_RAD / "trainset.json").is_file(), reason="VQA-RAD not present at ../shared/vqa_rad")
def test_vqa_rad_quirks():
    train, test = vqa_rad_samples(str(VQA_RAD), "train"), vqa_rad_samples(str(VQA_RAD), "test")
    assert (len(train), len(test)) == (3064, 451)
    raw = json.loads((VQA_RAD / "trainset.json").read_text()) + json.loads((VQA_RAD / "testset.json").read_text())
    ints = [r for r in raw if isinstance(r["answer"], int)]
    assert len(ints) == 10  # integer answers become strings
    assert all(isinstance(s.answer, str) for s in train + test)
    assert sum(1 for r in raw if r["answer_type"] == "CLOSED ") == 2
    assert {s.groups["answer_type"] for s in train + test} == {"OPEN", "CLOSED"}
    closed = [s for s in test if s.groups["answer_type"] == "CLOSED"]
    assert (len(closed), len(test) - len(closed)) == (272, 179)
    assert all(s.answer == s.answer.lower().strip() for s in train + test)
    vocab = Vocabulary.build([s.answer for s in train])
    unseen_open = [s for s in test if s.groups["answer_type"] == "OPEN" and vocab.encode(s.answer) < 0]
    assert len(unseen_open) == 41  # kept in the test set, scored wrong
    assert len({s.image for s in train} & {s.image for s in test}) > 0  # split is by question


def test_vqa_rad_missing_root_message(tmp_path):
    with pytest.raises(DataError, match=r"VQA-RAD not found .*CC0.*OSF .*data.root="):
        vqa_rad_samples(str(tmp_path / "nowhere"), "train")


class _PixelEncoder:
    """Stands in for an image encoder: pixels are the raw RGB values, no resizing."""

    modality = "image"

    from mmpeft.encoders.base import ImageEncoder

    batch = ImageEncoder.batch  # the image encoders' own batching (one view per unique image)

    def pixels(self, image):
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype="float32")).permute(2, 0, 1)


def test_augmentation_keeps_left_right_and_one_view_per_image(tmp_path):
    """data.augment: crops and jitter but never a flip (a marker on the left stays on the
    left); each image is augmented once per batch and shared by its questions (row_index),
    never cached as features; two batches see different views."""
    import random

    import numpy as np
    from PIL import Image

    from mmpeft.data.batching import Collator
    from mmpeft.data.samples import Sample
    from mmpeft.encoders.images import augment

    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :16] = 255  # white band on the left
    Image.fromarray(arr).save(tmp_path / "left.png")
    Image.fromarray(arr[:, ::-1]).save(tmp_path / "right.png")
    rng = random.Random(0)
    for _ in range(20):
        view = np.asarray(augment(Image.open(tmp_path / "left.png"), rng).convert("L"), dtype=float)
        half = view.shape[1] // 2
        assert view[:, :half].mean() > view[:, half:].mean() + 50

    rows = [Sample(str(tmp_path / f), f"q{i}", "yes", {}, f"row {i}") for i, f in enumerate(["left.png", "left.png", "right.png"])]
    store = ImageStore()
    collate = Collator(rows, {"image": _PixelEncoder()}, {}, store, augment_images=True, seed=0)
    first, again = collate([0, 1, 2]), collate([0, 1, 2])
    collate.epoch = 1
    second = collate([0, 1, 2])
    pixels = first["inputs"]["image"]["pixel_values"]
    assert pixels.shape[0] == 2 and first["inputs"]["image"]["row_index"].tolist() == [0, 0, 1]
    assert "image" not in first["keys"] and not store.pixels
    # a new view every epoch; within an epoch a batch's views depend only on the batch, not on
    # what was collated before it (workers, prefetching and resumed runs see the same views)
    assert not torch.equal(pixels, second["inputs"]["image"]["pixel_values"])
    assert torch.equal(pixels, again["inputs"]["image"]["pixel_values"])
    plain = Collator(rows, {"image": _PixelEncoder()}, {}, ImageStore())([0, 1, 2])
    assert plain["keys"]["image"] == [rows[0].image, rows[2].image]


def test_paths_relative_to_the_wrong_folder_are_said_so(tmp_path):
    """Every row's image missing: the first bad row of each file and the row counts are named,
    and the advice is about the folder the paths are read from, not on_bad_image: skip."""
    (tmp_path / "data").mkdir()
    for name in ("train", "test"):
        rows = [{"image": f"data/{name}_{i}.png", "question": "q", "answer": "a"} for i in range(3)]
        (tmp_path / "data" / f"{name}.csv").write_text("image,question,answer\n" + "".join(
            f"{r['image']},{r['question']},{r['answer']}\n" for r in rows))
    train, test = (load_manifest(tmp_path / "data" / f"{n}.csv") for n in ("train", "test"))
    with pytest.raises(DataError) as err:
        ImageStore().check({"train": train, "test": test}, "error")
    message = " ".join(str(err.value).split())
    assert message.startswith(f"{tmp_path / 'data' / 'train.csv'}, row 1: file not found")  # data rows from 1, as JSONL
    assert "in 6 of 6 rows" in message and f"{tmp_path / 'data' / 'test.csv'}, row 1" in message
    assert "read from the manifest's folder" in message and "skip" not in message
