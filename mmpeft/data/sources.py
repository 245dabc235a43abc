"""Each data source's row reader (``data.source``), registered under the name its recipe
settings have in :mod:`mmpeft.config.datasets`: a new source is a reader here (or in a
module of its own) and a spec there, and nothing else changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config.paths import manifest_path
from ..registry import Registry
from .conversations import conversation_samples
from .huggingface import huggingface_splits
from .moving_shapes import moving_shapes_caption_samples, moving_shapes_samples  # imports datasets (pyarrow, pandas) only when it reads
from .samples import Sample, easy_vqa_caption_samples, easy_vqa_samples, fsdd_samples, load_manifest, vqa_rad_samples


@dataclass
class RowRequest:
    """What a recipe reads from one data block: the encoders' modalities (``inputs``), the
    encoders reading a column of their own (``own``: name -> (modality, column)), the
    columns the tasks read raw (``targets``), whether every row needs the label column,
    the group fields, and the seed (for sources that draw, as FSDD's image pairing)."""

    inputs: tuple = ("image", "text")
    targets: tuple = ()
    label_required: bool = True
    own: Optional[dict] = None
    group_fields: list = field(default_factory=list)
    seed: int = 0


Rows = tuple[list[Sample], Optional[list[Sample]], list[Sample]]  # train, validation (None: held out of train), test


class DatasetReader:
    """Reads a data block's rows; ``read`` returns (train, validation or None, test)."""

    def read(self, data, request: RowRequest) -> Rows:
        raise NotImplementedError


DATASETS: Registry[type[DatasetReader]] = Registry("data source")


@DATASETS.register("manifest")
class ManifestReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        def one(path):
            return load_manifest(manifest_path(data, path), data.image_field, data.text_field, data.label_field,
                                 request.group_fields, data.audio_field, request.inputs, request.targets,
                                 request.label_required, request.own, video_field=data.video_field)

        return one(data.train), one(data.eval) if data.eval else None, one(data.test)


@DATASETS.register("conversations")
class ConversationsReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        def one(path):
            return conversation_samples(manifest_path(data, path))

        return one(data.train), one(data.eval) if data.eval else None, one(data.test)


@DATASETS.register("huggingface")
class HuggingFaceReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return huggingface_splits(data, request)


@DATASETS.register("easy_vqa")
class EasyVqaReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return easy_vqa_samples("train"), None, easy_vqa_samples("test")


@DATASETS.register("easy_vqa_captions")
class EasyVqaCaptionsReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return easy_vqa_caption_samples("train"), None, easy_vqa_caption_samples("test")


@DATASETS.register("vqa_rad")
class VqaRadReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return vqa_rad_samples(data.root, "train"), None, vqa_rad_samples(data.root, "test")


@DATASETS.register("fsdd")
class FsddReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        train, test = fsdd_samples(data.root, data.holdout_speakers, data.pair_images, request.seed, data.text)
        return train, None, test


@DATASETS.register("moving_shapes")
class MovingShapesReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return tuple(moving_shapes_samples(split, data.clips) for split in ("train", "eval", "test"))


@DATASETS.register("moving_shapes_captions")
class MovingShapesCaptionsReader(DatasetReader):
    def read(self, data, request: RowRequest) -> Rows:
        return tuple(moving_shapes_caption_samples(split, data.clips) for split in ("train", "eval", "test"))
