"""Data: rows from every registered source, split, and their files checked (torch-free, so
``mmpeft validate`` reads them without loading a model); batching is :mod:`.batching`."""

from .audio import BadAudio, read_audio
from .checks import probe_images
from .samples import Sample, easy_vqa_samples, fsdd_samples, load_manifest, read_rows, vqa_rad_root, vqa_rad_samples
from .splits import Splits, load_splits, recipe_splits

__all__ = [
    "Sample", "Splits", "load_splits", "recipe_splits", "load_manifest", "read_rows", "easy_vqa_samples", "vqa_rad_samples",
    "vqa_rad_root", "fsdd_samples", "probe_images", "BadAudio", "read_audio",
]
