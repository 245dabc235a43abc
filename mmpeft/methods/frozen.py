"""``none`` (the encoder stays fully frozen) and ``full`` (every weight trains: the baseline)."""

from __future__ import annotations

from .base import METHODS, PeftMethod


@METHODS.register("none")
class NoTuning(PeftMethod):
    """Linear probing: the encoder is a fixed feature extractor; only the head trains."""

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

    keeps_base_frozen = False
    mergeable = True
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
        from .base import check_state, read_safetensors

        state = read_safetensors(directory / "weights.safetensors")
        expected = self.trainable_state(encoder)
        check_state(state, {k: v.shape for k, v in expected.items()}, directory / "weights.safetensors")
        encoder.load_state_dict(state, strict=False)

    def merge(self, encoder) -> bool:
        return True
