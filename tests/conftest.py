import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bundle(assets, tmp_path_factory):
    """One tiny sealed bundle (LoRA on the text encoder, 3 answers) for the tests that probe
    bundles as an attacker would; they copy it before changing anything."""
    from mmpeft.bundle.writer import write_bundle
    from mmpeft.model import build_model
    from tests.helpers import recipe_for

    base = tmp_path_factory.mktemp("tiny_bundle")
    recipe = recipe_for(assets, "bert", "lora", base)
    write_bundle(base / "b", build_model(recipe, 3), recipe, ["a", "b", "c"], {"test": {"accuracy": 0.5, "macro_f1": 0.5}})
    return base / "b"


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": tiny.make_bert(root / "bert"),
        "vit": tiny.make_vit(root / "vit"),
        "clip": tiny.make_clip_vision(root / "clip"),
        "resnet": tiny.make_resnet(root / "resnet"),
        "effnet": tiny.make_efficientnet(root / "effnet"),
        "effnet_audio": tiny.make_efficientnet_audio(root / "effnet_audio"),
        "wav2vec2": tiny.make_wav2vec2(root / "wav2vec2"),
        "whisper": tiny.make_whisper(root / "whisper"),
        "ast": tiny.make_ast(root / "ast"),
        "clap": tiny.make_clap(root / "clap"),
        "audio_data": tiny.make_audio_dataset(root / "audio_data"),
        "data": tiny.make_dataset(root / "data"),
        # bitsandbytes' CPU 4-bit kernels need layer widths of at least one block (64)
        "bert64": tiny.make_bert(root / "bert64", hidden=64),
        "vit64": tiny.make_vit(root / "vit64", hidden=64),
        # tiny random causal LMs of three families (word-level tokenizers, pad = eos)
        "llama": tiny.make_decoder(root / "llama", "llama", chat=True),
        "qwen2": tiny.make_decoder(root / "qwen2", "qwen2"),
        "gpt2": tiny.make_decoder(root / "gpt2", "gpt2"),
        "root": root,
    }
