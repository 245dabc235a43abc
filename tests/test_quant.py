"""4-bit / 8-bit quantized frozen encoders (bitsandbytes on CPU) with trainable methods on top."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from mmpeft.bundle.io import load_bundle
from mmpeft.bundle.writer import write_bundle  # noqa: E402
from mmpeft.config import load_recipe  # noqa: E402
from mmpeft.model import build_model  # noqa: E402
from mmpeft.quant import quantized_layers, weight_bytes  # noqa: E402
from tests import tiny  # noqa: E402
from tests.helpers import fixed_batch, train_steps, write_and_reload  # noqa: E402


def quant_recipe(assets, tmp_path, bits, text_method="lora", image_method="bitfit", optimizer="adamw"):
    raw = tiny.recipe_dict(assets["bert64"], assets["vit64"], assets["data"], tmp_path, text_method=text_method,
                           image_method=image_method, optimizer=optimizer)
    q = {"bits": bits, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    raw["encoders"]["text"]["quantization"] = q
    raw["encoders"]["image"]["quantization"] = q
    return load_recipe(raw)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_training_and_exact_reload(assets, tmp_path, bits):
    recipe = quant_recipe(assets, tmp_path, bits)
    model = build_model(recipe, 3)
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert quantized_layers(model.encoders["text"]).get(kind, 0) >= 8  # q,k,v,o,ffn x 2 layers
    assert quantized_layers(model.encoders["image"]).get(kind, 0) >= 8
    trainable = {n for n, p in model.encoders["text"].named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    inputs, labels = fixed_batch(model)
    losses = train_steps(model, inputs, labels)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        logits = model.logits(inputs)
    manifest, loaded = write_and_reload(model, recipe, tmp_path / "b")  # reload quantizes a fresh base the same way
    assert manifest["encoders"]["text"]["quantization"]["bits"] == bits
    assert quantized_layers(loaded.model.encoders["text"]).get(kind, 0) >= 8
    with torch.no_grad():
        assert torch.allclose(loaded.model.logits(inputs), logits, atol=1e-6)


def test_nf4_weights_are_smaller(assets, tmp_path):
    from mmpeft.encoders import build_encoder
    from mmpeft.config import QuantizationConfig

    full = build_encoder(str(assets["bert64"]))
    q4 = build_encoder(str(assets["bert64"]), quantization=QuantizationConfig(bits=4))
    linear_fp32 = sum(m.weight.numel() * 4 for m in full.modules() if isinstance(m, torch.nn.Linear))
    saved = weight_bytes(full) - weight_bytes(q4)
    assert saved > 0.8 * linear_fp32 * (1 - 0.5 / 4)  # 4-bit codes + constants vs float32 weights


def test_quantized_merge_dequantizes(assets, tmp_path):
    from mmpeft.bundle.merge import merge_bundle

    recipe = quant_recipe(assets, tmp_path, 4, image_method="lora")
    model = build_model(recipe, 3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    bundle = tmp_path / "b"
    write_bundle(bundle, model, recipe, ["a", "b", "c"], {"test": {}})
    report = merge_bundle(bundle, tmp_path / "merged")  # default float32 tolerance: 1e-5
    assert report["dequantized"]["text"] >= 8 and report["max_abs_logit_diff"] <= 1e-5
    merged = load_bundle(tmp_path / "merged")
    assert not quantized_layers(merged.model.encoders["text"])
    assert merged.recipe.encoders["text"].quantization is None


def test_8bit_optimizer_step(assets, tmp_path):
    from mmpeft.optim import make_optimizer

    recipe = quant_recipe(assets, tmp_path, 4, optimizer="adamw_8bit")
    model = build_model(recipe, 3)
    opt = make_optimizer(model, recipe.train)
    assert type(opt).__name__ == "AdamW8bit"
    inputs, labels = fixed_batch(model)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    F.cross_entropy(model.logits(inputs), labels).backward()
    opt.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def _quantized_methods():
    from mmpeft.methods import METHODS

    # lora has its own tests above
    return [m for m in METHODS.names() if METHODS.get(m).quantized_base and m != "lora"]


@pytest.mark.parametrize("method", _quantized_methods())
def test_every_frozen_base_method_on_4bit(assets, tmp_path, method):
    recipe = quant_recipe(assets, tmp_path, 4, text_method=method, image_method=method)
    model = build_model(recipe, 3)
    assert quantized_layers(model.encoders["text"]).get("Linear4bit", 0) >= 8
    inputs, labels = fixed_batch(model)
    model.train()
    loss = F.cross_entropy(model.logits(inputs), labels)
    loss.backward()
    if method != "none":
        # every trainable tensor gets a gradient, except BERT's pooler, which mean pooling never uses
        grads = [(n, p.grad) for n, p in model.encoders["text"].named_parameters() if p.requires_grad and "pooler" not in n]
        assert grads and all(g is not None for _, g in grads)
    model.train(False)
    with torch.no_grad():
        logits = model.logits(inputs)
    _, loaded = write_and_reload(model, recipe, tmp_path / "b")
    with torch.no_grad():
        assert torch.allclose(loaded.model.logits(inputs), logits, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_return_the_autocast_dtype(assets, tmp_path, bits):
    # bitsandbytes returns its input's dtype (float32 after an autocast LayerNorm); nn.Linear
    # returns the autocast dtype. Measured on an H100, the difference doubled activation memory.
    recipe = quant_recipe(assets, tmp_path, bits, image_method="lora")
    model = build_model(recipe, 3)
    seen = []
    layers = [m for m in model.encoders["text"].modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    for layer in layers:
        layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))  # after mmpeft's own hook
    inputs, _ = fixed_batch(model)
    with torch.no_grad():
        plain = model.logits(inputs)
        assert seen and set(seen) == {torch.float32}  # no autocast: unchanged
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.logits(inputs)
    assert len(seen) == len(layers) and set(seen) == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model.logits(inputs), plain)
