"""Every registered method on every encoder kind: exact trainable sets, identity at
init, loss goes down, save -> load gives identical logits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpeft.bundle.io import load_bundle
from mmpeft.bundle.writer import write_bundle
from mmpeft.encoders import build_encoder
from mmpeft.fusion import FUSIONS
from mmpeft.methods import METHODS, build_method
from mmpeft.model import build_model
from mmpeft.errors import RecipeError
from tests.helpers import ENCODER_KINDS, fixed_batch, recipe_for, refuses, train_steps, write_and_reload

ALL_METHODS = METHODS.names()


def expected_trainable(method: str, names: list[str], kind: str) -> set[str]:
    """What each method must (and may only) train, from the parameter names of the adapted encoder."""
    if method == "none":
        return set()
    if method == "full":
        return set(names)
    if method == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    if method == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    if method == "ia3":
        return {n for n in names if ".ia3_l." in n}
    if method == "adapter":
        return {n for n in names if ".mmpeft_adapter." in n or n.startswith("adapters.")}
    if method == "prompt":
        return {n for n in names if "prompt" in n and "lora" not in n}
    raise AssertionError(f"add the expected trainable set of new method {method!r} to this test")


@pytest.mark.parametrize("kind", ENCODER_KINDS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_trainable_set_and_identity(assets, kind, method):
    enc = build_encoder(str(assets[kind]))
    recipe = recipe_for(assets, kind, method, "unused")  # reuse its resolved method settings
    settings = recipe.encoders["text" if kind == "bert" else "image"].peft
    torch.manual_seed(0)
    inputs, _ = fixed_batch(type("M", (), {"encoders": {"x": enc}})())
    before = enc(inputs["x"])
    m = build_method(settings)
    if refuses(enc, method):
        with pytest.raises(RecipeError, match="not available for"):
            m.apply(enc)
        return
    m.apply(enc)
    names = [n for n, _ in enc.named_parameters()]
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(method, names, kind)
    if method not in ("none",):
        assert trainable, f"{method} trains nothing on {kind}"
    if m.identity_at_init:
        enc.eval()
        after = enc(inputs["x"])
        assert torch.allclose(after.pooled, before.pooled, atol=1e-5), (after.pooled - before.pooled).abs().max()
        assert after.tokens.shape == before.tokens.shape


@pytest.mark.parametrize("kind", ENCODER_KINDS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_steps_lower_loss_and_save_load_identical(assets, tmp_path, kind, method):
    recipe = recipe_for(assets, kind, method, tmp_path)
    if refuses(build_encoder(str(assets[kind])), method):
        with pytest.raises(RecipeError, match="not available for"):
            build_model(recipe, 3)
        return
    model = build_model(recipe, 3)
    inputs, labels = fixed_batch(model)
    losses = train_steps(model, inputs, labels)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        logits = model.logits(inputs)
    bundle = tmp_path / "bundle"
    _, loaded = write_and_reload(model, recipe, bundle)
    with torch.no_grad():
        again = loaded.model.logits(inputs)
    assert torch.equal(logits, again)
    # the bundle stores only the method's own parameters: its size follows the trainable count
    side = "text" if kind == "bert" else "image"
    trainable = sum(p.numel() for p in model.encoders[side].parameters() if p.requires_grad)
    stored = sum(f.stat().st_size for f in (bundle / "encoders" / side).iterdir() if f.suffix == ".safetensors")
    if method == "full":
        trainable += sum(b.numel() for b in model.encoders[side].buffers() if b.is_floating_point())
    assert 4 * trainable <= stored <= 4 * trainable + 16_384 + 200 * len(list(model.encoders[side].parameters()))


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("kind,method", [("bert", "lora"), ("vit", "prompt"), ("effnet", "adapter")])
def test_every_fusion_saves_and_reloads(assets, tmp_path, fusion, kind, method):
    recipe = recipe_for(assets, kind, method, tmp_path, fusion=fusion)
    model = build_model(recipe, 3).train(False)
    inputs, _ = fixed_batch(model)
    with torch.no_grad():
        logits = model.logits(inputs)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model, recipe, ["a", "b", "c"], {"test": {}})
    with torch.no_grad():
        assert torch.equal(load_bundle(bundle).model.logits(inputs), logits)


def test_recipe_shape_mismatch_is_rejected(assets, tmp_path):
    """A bundle whose tensors do not fit the model its recipe implies is refused."""
    from mmpeft.files import seal
    from mmpeft.errors import BundleError

    recipe = recipe_for(assets, "effnet", "adapter", tmp_path)
    model = build_model(recipe, 3)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model, recipe, ["a", "b", "c"], {"test": {}})
    text = (bundle / "recipe.yaml").read_text().replace("hidden_size: 32", "hidden_size: 48")
    (bundle / "recipe.yaml").write_text(text)
    seal(bundle)
    with pytest.raises(BundleError, match=r"head.safetensors does not match the model its recipe builds: .*shape mismatch"):
        load_bundle(bundle)


def test_method_registry_errors():
    with pytest.raises(KeyError, match="unknown PEFT method 'lorra'; did you mean 'lora'"):
        METHODS.get("lorra")


def test_lora_target_error_lists_modules(assets):
    from mmpeft.errors import MMPeftError

    enc = build_encoder(str(assets["bert"]))
    m = build_method({"method": "lora", "rank": 2, "target_modules": ["q_proj"]}, where="encoders.text.peft")
    with pytest.raises(MMPeftError, match=r"encoders.text.peft.target_modules: \['q_proj'\] matches no layer .*available module names: .*query"):
        m.apply(enc)


def test_lora_dir_loads_with_plain_peft(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    enc = build_encoder(str(assets["bert"]))
    m = build_method({"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None,
                      "use_dora": False, "use_rslora": False})
    m.apply(enc)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_()
    m.save(enc, tmp_path)
    ids = enc.preprocess(["what color is the shape ?"])
    ours = enc.model(**ids).last_hidden_state
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(assets["bert"])), str(tmp_path)).eval()
    theirs = plain(**ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, AutoModel.from_pretrained(str(assets["bert"]))(**ids).last_hidden_state, atol=1e-3)


def test_frozen_encoder_runs_in_eval_mode(assets, tmp_path):
    recipe = recipe_for(assets, "effnet", "bitfit", tmp_path)
    model = build_model(recipe, 3)
    model.train()
    bns = [m for m in model.encoders["image"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    inputs, labels = fixed_batch(model)
    F.cross_entropy(model.logits(inputs), labels).backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert model.head.training
    # base weights never reach the optimizer
    from mmpeft.optim import make_optimizer
    from mmpeft.config import TrainConfig

    opt = make_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in in_opt for p in frozen)


@pytest.mark.parametrize("kind", ENCODER_KINDS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradient_checkpointing_recomputes_and_keeps_gradients(assets, tmp_path, kind, method):
    # frozen parts run in eval mode, and transformers checkpoints only layers in training
    # mode: checkpointing once silently did nothing for every method but full
    if refuses(build_encoder(str(assets[kind])), method):
        return  # the refusal is checked by test_trainable_set_and_identity
    model = build_model(recipe_for(assets, kind, method, tmp_path), 3)
    name = "text" if kind == "bert" else "image"
    enc = model.encoders[name]
    inputs, labels = fixed_batch(model, n=4)
    calls = [0]
    for module in enc.modules():
        module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def gradients():
        model.train()
        model.zero_grad()
        calls[0] = 0
        torch.manual_seed(0)  # full fine-tuning keeps dropout on; checkpointing replays its RNG
        np.random.seed(0)  # and Wav2Vec2's SpecAugment time masks (training mode) are drawn with numpy
        F.cross_entropy(model.logits(inputs), labels).backward()
        return calls[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain_calls, plain = gradients()
    if kind in ("resnet", "clap"):  # transformers' ResNet and CLAP audio cannot checkpoint: reported by dry runs
        assert not enc.enable_gradient_checkpointing()
        return
    assert enc.enable_gradient_checkpointing()
    ckpt_calls, ckpt = gradients()
    if method != "none":  # a frozen encoder gets no backward pass to recompute in
        assert ckpt_calls > plain_calls  # layers ran again in backward
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n
    if method != "full":
        assert not any(m.training for m in enc.modules() if isinstance(m, torch.nn.Dropout))
