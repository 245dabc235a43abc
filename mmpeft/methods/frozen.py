"""``none`` (the encoder stays fully frozen) and ``full`` (every weight trains: the baseline)."""

from __future__ import annotations

from ..config.methods import FullSettings, NoneSettings
from ..files import read_safetensors
from .base import METHODS, PeftMethod


@METHODS.register("none")
class NoTuning(PeftMethod):
    """Linear probing: the encoder is a fixed feature extractor; only the head trains."""

    Settings = NoneSettings
    trains_encoder = False
    mergeable = True
    paper = "linear probing"

    def apply(self, encoder) -> None:
        for p in encoder.parameters():
            p.requires_grad_(False)

    def merge(self, encoder) -> bool:
        return True


@METHODS.register("full")
class FullFineTuning(PeftMethod):
    """Full fine-tuning: every encoder weight trains (the reference PEFT is compared to)."""

    Settings = FullSettings
    mergeable = True
    # A pretrained encoder needs a far smaller learning rate than adapters (2e-3 took the
    # easy-VQA text encoder to 52.5%, 5e-5 to 82.9%).
    default_lr = 5e-5
    paper = "full fine-tuning baseline"

    def apply(self, encoder) -> None:
        for p in encoder.parameters():
            p.requires_grad_(True)
        self.touched = ["(all modules)"]

    def train_modules(self, encoder):
        return [encoder.model]

    def trainable_state(self, encoder):
        # Buffers too: batch-norm running statistics change during full fine-tuning.
        return {n: t.detach().cpu().contiguous() for n, t in encoder.state_dict().items() if t.is_floating_point() or n.endswith("num_batches_tracked")}

    def load(self, encoder, directory) -> None:
        state = read_safetensors(directory / "weights.safetensors", self.trainable_state(encoder))
        encoder.load_state_dict(state, strict=False)

    def merge(self, encoder) -> bool:
        return True
