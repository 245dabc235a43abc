"""Tiny random encoders and a tiny image+question dataset, built locally (no hub).

Each model is created from a config, saved to a directory and then loaded back
through mmpeft's real loading code, as transformers' own tests do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

WORDS = ["what", "color", "is", "the", "shape", "there", "a", "red", "green", "blue", "?", "yes", "no", "square", "circle"]


def make_bert(directory: Path, hidden: int = 32) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(directory / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=hidden * 2 if hidden > 32 else 37, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _processor(directory: Path, size: int) -> None:
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": size, "width": size}}))


def make_vit(directory: Path, hidden: int = 32) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=hidden * 2 if hidden > 32 else 37,
                       image_size=32, patch_size=8)).save_pretrained(directory)
    _processor(directory, 32)
    return directory


def make_clip_vision(directory: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                     image_size=32, patch_size=8, projection_dim=16)).save_pretrained(directory)
    _processor(directory, 32)
    return directory


def make_resnet(directory: Path) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(3)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).save_pretrained(directory)
    _processor(directory, 32)
    return directory


def make_efficientnet(directory: Path) -> Path:
    """EfficientNet-Lite0 architecture with random weights, saved in mmpeft's CNN format."""
    from mmpeft.encoders.zoo import LITE_MEAN, LITE_STD, EfficientNetBackbone, _build_efficientnet, save_efficientnet

    torch.manual_seed(4)
    net = _build_efficientnet("efficientnet-lite0")
    # random running statistics so batch-norm in eval mode is not the identity
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_efficientnet(EfficientNetBackbone(net, "efficientnet-lite0"),
                      {"arch": "efficientnet_lite", "variant": "efficientnet-lite0", "image_mean": LITE_MEAN,
                       "image_std": LITE_STD, "image_size": 32}, directory)
    return directory


def make_efficientnet_audio(directory: Path) -> Path:
    """The random EfficientNet-Lite0 saved as an audio encoder (its folder says modality: audio)."""
    make_efficientnet(directory)
    meta = json.loads((directory / "mmpeft_encoder.json").read_text())
    (directory / "mmpeft_encoder.json").write_text(json.dumps({**meta, "modality": "audio"}))
    return directory


def make_wav2vec2(directory: Path, hidden: int = 32) -> Path:
    """A random Wav2Vec2 (two conv layers, two transformer layers) and its feature extractor, at 8 kHz."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(5)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=hidden + 5,
                                 conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                 num_conv_pos_embedding_groups=2, feat_extract_norm="layer")).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=8000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(directory)
    return directory


def make_whisper(directory: Path) -> Path:
    """A random Whisper (encoder and a one-layer decoder) reading 1-second 16-bin log-mel windows at 8 kHz."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(6)
    WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=16, max_source_positions=25,
                               max_target_positions=8, vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)).save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=160, chunk_length=1, n_fft=400).save_pretrained(directory)
    return directory


def make_clap(directory: Path, fusion: bool = False) -> Path:
    """A random CLAP (text tower, HTSAT audio tower, projections) over 1-second 16-bin log-mel images at 8 kHz.
    With ``fusion``: CLAP's feature fusion for longer clips, over 64 mel bins (the extractor
    shrinks a long clip's mel to 64 bins whatever its own count) at 50 frames a second."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(8)
    bins, hop = (64, 160) if fusion else (16, 80)
    audio = dict(spec_size=64, window_size=4, num_mel_bins=bins, patch_size=4, patch_stride=(4, 4), patch_embeds_hidden_size=8,
                 hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], enable_fusion=fusion,
                 fusion_type="aff_2d" if fusion else None)
    text = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=40)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(directory)
    ClapFeatureExtractor(feature_size=bins, sampling_rate=8000, hop_length=hop, max_length_s=1, fft_window_size=200,
                         nb_frequency_bins=101, frequency_max=4000 if fusion else 14_000).save_pretrained(directory)
    return directory


def make_ast(directory: Path) -> Path:
    """A random Audio Spectrogram Transformer over 32 frames x 16 mel bins, at 8 kHz."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(7)
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_mel_bins=16,
                       max_length=32, patch_size=8, frequency_stride=8, time_stride=8)).save_pretrained(directory)
    ASTFeatureExtractor(feature_size=1, sampling_rate=8000, num_mel_bins=16, max_length=32).save_pretrained(directory)
    return directory


TONES = {"red": 300.0, "green": 900.0, "blue": 2000.0}  # each colour also has a sound, for audio rows


def write_tone(path: Path, hz: float, seconds: float, rate: int = 8000, seed: int = 0, channels: int = 1) -> Path:
    """A sine tone with a little noise, as 16-bit PCM WAV."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(t.shape)
    soundfile.write(str(path), np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave, rate, subtype="PCM_16")
    return path


def make_audio_dataset(directory: Path, n_train: int = 36, n_test: int = 18, seed: int = 0) -> dict:
    """Rows with an image, a question and a tone: the answer (the colour) is in the image and in the sound."""
    rng = random.Random(seed)
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            color = list(COLORS)[i % 3]
            img = Image.new("RGB", (24, 24), (255, 255, 255))
            ImageDraw.Draw(img).rectangle([4, 4, 20, 20], fill=COLORS[color])
            img.save(directory / f"images/{split}_{i}.png")
            write_tone(directory / f"audio/{split}_{i}.wav", TONES[color], rng.uniform(0.2, 0.6), seed=i)
            rows.append({"image": f"images/{split}_{i}.png", "audio": f"audio/{split}_{i}.wav",
                         "question": "what color is it ?", "answer": color})
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = path
    return files


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def shape_image(path: Path, color: str, shape: str) -> None:
    """A 24x24 white image with one square or circle of ``color``."""
    img = Image.new("RGB", (24, 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)([4, 4, 20, 20], fill=COLORS[color])
    img.save(path)


def write_shape_manifests(directory: Path, row, n_train: int, n_test: int, seed: int = 0) -> dict:
    """``train.jsonl`` / ``test.jsonl`` of shape images: ``row(rng, i, name) -> (colour, shape, row dict)``
    for the i-th image of a split, drawn with one seeded generator."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            name = f"images/{split}_{i}.png"
            color, shape, record = row(rng, i, name)
            shape_image(directory / name, color, shape)
            rows.append(record)
        files[split] = directory / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def make_dataset(directory: Path, n_train: int = 48, n_test: int = 24, seed: int = 0) -> dict:
    """Coloured shapes with two question types; answers are learnable from image + text."""
    def row(rng, i, name):
        color = rng.choice(list(COLORS))
        shape = rng.choice(["square", "circle"])
        if i % 2:
            return color, shape, {"image": name, "question": "what color is the shape ?", "answer": color.upper(), "kind": "color"}
        asked = rng.choice(list(COLORS))
        return color, shape, {"image": name, "question": f"is there a {asked} shape ?",
                              "answer": "Yes" if asked == color else " no", "kind": "yes/no"}

    return write_shape_manifests(directory, row, n_train, n_test, seed)


def recipe_dict(text_dir, image_dir, data_files, out_dir, text_method="lora", image_method="lora", fusion="gated", **train):
    t = {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "head_lr": 5e-3, "seed": 0, "log_every": 1}
    t.update(train)
    return {
        "name": "tiny",
        "encoders": {
            "text": {"model": str(text_dir), "max_length": 16, "peft": {"method": text_method}},
            "image": {"model": str(image_dir), "peft": {"method": image_method}},
        },
        "fusion": {"type": fusion, "hidden_size": 32, "dropout": 0.0},
        "task": {"type": "vqa", "group_fields": ["kind"]},
        "data": {"source": "manifest", "train": str(data_files["train"]), "test": str(data_files["test"]), "eval_fraction": 0.25},
        "train": t,
        "output": {"dir": str(out_dir), "plots": False},
    }


DECODER_WORDS = WORDS + ["a", "describe", "image", "answer", ":", "."]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_decoder(directory: Path, family: str = "llama", hidden: int = 32, chat: bool = False) -> Path:
    """A tiny random causal LM of ``family`` (llama, qwen2, gpt2) with a word-level tokenizer
    whose pad token is its eos token (as SmolLM2's is), saved as transformers saves models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(DECODER_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    common = dict(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=2, n_positions=128, **common)
    else:
        cls = LlamaConfig if family == "llama" else Qwen2Config
        cfg = cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=family == "qwen2", **common)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
