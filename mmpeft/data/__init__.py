"""Data: manifests, built-in datasets (easy_vqa, vqa_rad, fsdd), image and audio checking and batching."""

from .audio import BadAudio, read_audio
from .checks import probe_images
from .loader import Collator, ImageStore, Splits, load_splits, make_loader, recipe_splits
from .samples import Sample, easy_vqa_samples, fsdd_samples, load_manifest, read_rows, vqa_rad_root, vqa_rad_samples

__all__ = [
    "Sample", "Splits", "load_splits", "recipe_splits", "load_manifest", "read_rows", "easy_vqa_samples", "vqa_rad_samples",
    "vqa_rad_root", "fsdd_samples", "ImageStore", "Collator", "make_loader", "probe_images", "BadAudio", "read_audio",
]
