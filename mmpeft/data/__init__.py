"""Data: manifests, built-in datasets (easy_vqa, vqa_rad), image checking and batching."""

from .loader import Collator, ImageStore, Splits, load_splits, make_loader, probe_images
from .samples import Sample, easy_vqa_samples, load_manifest, read_rows, vqa_rad_root, vqa_rad_samples

__all__ = [
    "Sample", "Splits", "load_splits", "load_manifest", "read_rows", "easy_vqa_samples", "vqa_rad_samples",
    "vqa_rad_root", "ImageStore", "Collator", "make_loader", "probe_images",
]
