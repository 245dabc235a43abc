"""What a recipe check knows of each data source (``data.source``): the keys it reads, the
paths it needs, the folder it lives in, what its rows can feed, and its model-card text.

These are registered here, in the config layer, so that ``mmpeft validate`` checks a
recipe without importing torch; each source's row reader registers under the same name in
:mod:`mmpeft.data.sources` (a test checks the two registries agree), as methods do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Optional

from ..registry import Registry

# data keys every source reads (the run's own settings and the split sizes)
COMMON_KEYS = ("source", "eval_fraction", "on_bad_image", "on_bad_audio", "on_bad_video", "image_cache_mb", "max_train_samples",
               "max_eval_samples", "max_test_samples", "group_by_image", "augment")
# keys naming the columns of sources whose rows have named columns (manifest, huggingface)
COLUMN_KEYS = ("image_field", "text_field", "label_field", "audio_field", "video_field", "encoder_fields")


class DatasetSpec:
    """One data source as the recipe check sees it. Subclass, set the class attributes,
    override :meth:`input_problems` / :meth:`card_lines` where the source needs to, and
    register the class in :data:`DATASET_SPECS`."""

    title: ClassVar[str] = ""
    #: data keys of its own (besides :data:`COMMON_KEYS`): a non-default value of any other is refused
    keys: ClassVar[tuple[str, ...]] = ()
    #: keys that must be set (paths)
    required: ClassVar[tuple[str, ...]] = ()
    #: data keys holding paths (made absolute from the recipe file's folder)
    path_keys: ClassVar[tuple[str, ...]] = ()
    #: its path keys name files (not folders), and what they should be
    path_is_file: ClassVar[bool] = False
    path_hint: ClassVar[str] = ""
    #: rows with named columns: encoders may read a column of their own (data.encoder_fields)
    columns: ClassVar[bool] = False
    #: the modalities its rows carry (sources with columns: any, through the column names)
    modalities: ClassVar[frozenset] = frozenset({"image", "text", "audio"})
    #: a built-in dataset read from a folder: (environment variable, default folder, a file it holds, where it comes from)
    folder: ClassVar[Optional[tuple[str, str, str, str]]] = None

    def input_problems(self, data, where: str, reads: dict) -> list[str]:
        """Problems of the encoders reading this block (``reads``: encoder name -> modality)."""
        if self.columns:
            return []
        return [f"{where}.source: {data.source} has no {kind}; {kind} encoders read a source that has it "
                f"(a manifest or a huggingface dataset with a {kind} column)"
                for kind in dict.fromkeys(k for k in reads.values() if k and k not in self.modalities)]

    def card_lines(self, data) -> list[str]:
        """A paragraph for the bundle's model card (none by default)."""
        return []

    def folder_path(self, root: Optional[str]) -> Path:
        """A built-in dataset's folder: data.root, else its environment variable, else its default."""
        env, default, _, _ = self.folder
        return Path(root or os.environ.get(env) or default).expanduser()

    def folder_missing(self, root: Optional[str]) -> Optional[str]:
        """Why a built-in dataset's folder cannot be used (None when it can)."""
        env, _, marker, origin = self.folder
        folder = self.folder_path(root)
        if (folder / marker).exists():
            return None
        return (f"{self.title} not found at {folder.resolve()} (no {marker}). {origin} and set data.root=<that directory> in "
                f"the recipe or on the command line, or ${env}.")


DATASET_SPECS: Registry[type[DatasetSpec]] = Registry("data source")


def dataset_spec(source: str) -> DatasetSpec:
    return DATASET_SPECS.get(source)()


@DATASET_SPECS.register("manifest")
class ManifestSpec(DatasetSpec):
    """Your own rows: a JSONL, CSV or JSON-list file per split, image and audio paths relative to it."""

    title = "manifest"
    keys = ("root", "train", "eval", "test") + COLUMN_KEYS
    required = ("train", "test")
    path_keys = ("root", "train", "eval", "test")
    path_is_file = True
    path_hint = "path to a .jsonl, .csv or .json file"
    columns = True


@DATASET_SPECS.register("conversations")
class ConversationsSpec(DatasetSpec):
    """Conversation manifests as LLaVA (``conversations``: from / value) and LLaMA-Factory (``messages``:
    role / content) write them: one row per assistant turn, its user turn the prompt, earlier turns its history."""

    title = "conversations"
    keys = ("root", "train", "eval", "test")
    required = ("train", "test")
    path_keys = ("root", "train", "eval", "test")
    path_is_file = True
    path_hint = "path to a .json (a list of records) or .jsonl file of conversation records"
    modalities = frozenset({"image", "text"})

    def card_lines(self, data) -> list[str]:
        return [f"Conversations from `{Path(str(data.train)).name}` (one row per assistant turn; the reply as written is the "
                "column `reply`)."]


@DATASET_SPECS.register("huggingface")
class HuggingFaceSpec(DatasetSpec):
    """A Hugging Face ``datasets`` dataset on local disk: a ``save_to_disk`` folder, parquet /
    arrow files, or an ``imagefolder`` / ``audiofolder`` layout."""

    title = "Hugging Face dataset"
    keys = ("path", "test", "split", "eval_split", "test_split") + COLUMN_KEYS
    required = ("path",)
    path_keys = ("path", "test")
    path_hint = "a save_to_disk folder, a .parquet / .arrow file or a folder of them, or an imagefolder / audiofolder folder"
    columns = True


@DATASET_SPECS.register("easy_vqa")
class EasyVqaSpec(DatasetSpec):
    """easy-VQA (pip package easy-vqa): 38,575 train / 9,673 test questions about shapes, 13 answers."""

    title = "easy-VQA"
    modalities = frozenset({"image", "text"})


@DATASET_SPECS.register("easy_vqa_captions")
class EasyVqaCaptionsSpec(EasyVqaSpec):
    """easy-VQA's images with one caption each ("a red circle"), its class the answer (24 classes)."""

    title = "easy-VQA captions"


@DATASET_SPECS.register("vqa_rad")
class VqaRadSpec(DatasetSpec):
    """VQA-RAD (Lau et al. 2018, CC0): radiology images, 3,064 train / 451 test questions."""

    title = "VQA-RAD"
    keys = ("root",)
    path_keys = ("root",)
    modalities = frozenset({"image", "text"})
    folder = ("MMPEFT_VQA_RAD_ROOT", "../shared/vqa_rad", "trainset.json",
              "VQA-RAD (Lau et al. 2018, CC0) comes from OSF project 89kps (https://osf.io/89kps/); put images/, "
              "trainset.json and testset.json in one directory")

    def card_lines(self, data) -> list[str]:
        return [f"VQA-RAD (Lau et al. 2018, CC0), community split: 3,064 training / 451 test questions; "
                f"{100 * data.eval_fraction:.0f}% of training held out for validation and early stopping; the test split is "
                "scored once. Metrics as in the medical VQA papers: accuracy on open, closed and all test questions "
                "(classification over the training answers), per question type and organ.", ""]


@DATASET_SPECS.register("fsdd")
class FsddSpec(DatasetSpec):
    """The Free Spoken Digit Dataset (CC BY-SA 4.0): 3,000 recordings of spoken digits by six speakers."""

    title = "FSDD"
    keys = ("root", "pair_images", "text", "holdout_speakers")
    path_keys = ("root",)
    folder = ("MMPEFT_FSDD_ROOT", "../shared/fsdd", "recordings",
              "The Free Spoken Digit Dataset (CC BY-SA 4.0) comes from github.com/Jakobovski/free-spoken-digit-dataset; "
              "put its recordings/ folder in one directory")

    def input_problems(self, data, where: str, reads: dict) -> list[str]:
        problems = []  # FSDD rows are recordings: images only when paired, text only when given
        for name, kind in reads.items():
            if kind == "image" and not data.pair_images:
                problems.append(f"encoders.{name}: an image encoder on FSDD needs {where}.pair_images: true "
                                "(handwritten images of each recording's digit)")
            if kind == "text" and not data.text:
                problems.append(f"encoders.{name}: a text encoder on FSDD needs {where}.text (the text of every row)")
        return problems


@DATASET_SPECS.register("moving_shapes")
class MovingShapesSpec(DatasetSpec):
    """Generated clips of a shape moving left, right, up or down; questions on its direction
    (order matters), colour and shape (mmpeft/data/moving_shapes.py)."""

    title = "moving shapes"
    keys = ("clips",)
    modalities = frozenset({"video", "text"})

    def card_lines(self, data) -> list[str]:
        return [f"Moving shapes (generated by mmpeft): {data.clips} training, {max(1, data.clips // 4)} validation and "
                f"{max(1, data.clips // 2)} test clips of 8 frames; three questions each (direction, colour, shape).", ""]


@DATASET_SPECS.register("moving_shapes_captions")
class MovingShapesCaptionsSpec(MovingShapesSpec):
    """The moving-shapes clips with one caption each ("a red circle moves left"), its class the answer (48 classes)."""

    title = "moving shapes captions"

    def card_lines(self, data) -> list[str]:
        return [f"Moving shapes captions (generated by mmpeft): {data.clips} training clips, one caption each.", ""]


def foreign_keys(data, where: str) -> list[str]:
    """Keys set to other than their default that ``data.source`` does not read."""
    spec = dataset_spec(data.source)
    fields = type(data).model_fields
    own = set(COMMON_KEYS) | set(spec.keys)
    readers = {}
    for name in DATASET_SPECS.names():
        for key in DATASET_SPECS.get(name).keys:
            readers.setdefault(key, []).append(name)
    return [f"{where}.{key}: source {data.source} does not read it (it is read by {', '.join(readers.get(key, ['none']))}); "
            "remove it or change the source"
            for key in data.model_fields_set if key in fields and key not in own
            and getattr(data, key) != fields[key].get_default(call_default_factory=True)]


def missing_keys(data, where: str) -> list[str]:
    spec = dataset_spec(data.source)
    return [f"{where}.{key}: required when {where}.source is {data.source!r}" + (f" ({spec.path_hint})" if spec.path_hint else "")
            for key in spec.required if getattr(data, key) is None]
