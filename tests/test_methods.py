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
from mmpeft.methods.peft_tuner import PeftTuner
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
    if method == "vera":
        return {n for n in names if ".vera_lambda_b." in n or ".vera_lambda_d." in n}
    if method == "loha":
        return {n for n in names if ".hada_w" in n}
    if method == "lokr":
        return {n for n in names if ".lokr_w" in n}
    if method == "oft":
        return {n for n in names if ".oft_R." in n}
    if method == "boft":
        return {n for n in names if ".boft_R." in n or ".boft_s." in n}
    if method == "ln_tuning":
        return {n for n in names if ".ln_tuning_layers." in n}
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
            m.attach(enc)
        return
    m.attach(enc)
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
    if method == "vera":  # the shared frozen projections travel with the adapter
        trainable += sum(b.numel() for n, b in model.encoders[side].named_buffers() if ".vera_A." in n or ".vera_B." in n)
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


PEFT_TUNERS = [m for m in ALL_METHODS if issubclass(METHODS.get(m), PeftTuner)]


@pytest.mark.parametrize("method", PEFT_TUNERS)
@pytest.mark.parametrize("kind", ["bert", "effnet"])
def test_peft_methods_load_with_plain_peft(assets, tmp_path, method, kind):
    """What a peft-backed method saves, plain peft loads onto the plain encoder, giving our outputs."""
    from peft import PeftModel

    enc = build_encoder(str(assets[kind]))
    m = build_method({"method": method})
    if refuses(enc, method):
        return  # the refusal is checked by test_trainable_set_and_identity
    m.attach(enc)
    with torch.no_grad():  # a trained-looking adapter: the comparison is not of two identities
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    m.save(enc, tmp_path)
    inputs, _ = fixed_batch(type("M", (), {"encoders": {"x": enc}})())
    enc.eval()
    with torch.no_grad():
        ours = enc(inputs["x"]).pooled
        base = build_encoder(str(assets[kind]))
        base.model = PeftModel.from_pretrained(base.model, str(tmp_path)).eval()
        theirs = base(inputs["x"]).pooled
        plain = build_encoder(str(assets[kind]))(inputs["x"]).pooled
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_layers_a_method_cannot_adapt_are_refused_by_name(assets):
    enc = build_encoder(str(assets["effnet"]))
    with pytest.raises(RecipeError, match=r"vera is not available for efficientnet_lite models: none of the \d+ target "
                                          r"layers is one it adapts \(Linear layers\)"):
        build_method({"method": "vera"}, where="encoders.image.peft").attach(enc)
    with pytest.raises(RecipeError, match="ln_tuning is not available for efficientnet_lite models: it has no LayerNorm"):
        build_method({"method": "ln_tuning"}).attach(enc)
    enc = build_encoder(str(assets["resnet"]))  # its convolutions are 3x3 and 7x7: OFT adapts 1x1 only
    with pytest.raises(RecipeError, match=r"encoders.image.peft.target_modules: oft adapts Linear and 1x1 Conv2d layers .*"
                                          r"only; it cannot adapt embedder.embedder.convolution"):
        build_method({"method": "oft", "target_modules": ["convolution"]}, where="encoders.image.peft").attach(enc)
    bert = build_encoder(str(assets["bert"]))
    with pytest.raises(RecipeError, match="matches no LayerNorm / RMSNorm layer .* named: LayerNorm"):
        build_method({"method": "ln_tuning", "target_modules": ["query"]}).attach(bert)
    # a default target list keeps the layers the method adapts: OFT's blocks of 32 divide some of
    # EfficientNet's pointwise widths only
    oft = build_method({"method": "oft"})
    oft.attach(build_encoder(str(assets["effnet"])))
    assert oft.touched and all(n.endswith(("_expand_conv", "_project_conv", "_conv_head")) for n in oft.touched)
    assert len(oft.touched) < len(build_method({"method": "lora"}).targets(build_encoder(str(assets["effnet"])))[1])


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


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_inits_that_move_the_base_reload_load_in_plain_peft_and_merge(assets, tmp_path, init):
    """PiSSA / OLoRA: equal to the base at init although the base weights changed; the bundle
    reloads identically (the residual rebuilt from the pristine base), plain peft on the plain
    base gives the same outputs (the stored rank-2r update), and merge verifies."""
    from peft import PeftModel
    from transformers import AutoModel

    from mmpeft.bundle.merge import merge_bundle

    plain = AutoModel.from_pretrained(str(assets["bert"])).eval()
    recipe = recipe_for(assets, "bert", {"method": "lora", "init": init, "rank": 4}, tmp_path)
    model = build_model(recipe, 3)
    enc = model.encoders["text"]
    ids = enc.preprocess(["what color is the shape ?", "is there a circle ?"])
    with torch.no_grad():
        assert torch.allclose(enc.model(**ids).last_hidden_state, plain(**ids).last_hidden_state, atol=1e-5)
    query = enc.model.base_model.model.encoder.layer[0].attention.self.query
    assert not torch.allclose(query.base_layer.weight, plain.encoder.layer[0].attention.self.query.weight, atol=1e-3)
    assert query.lora_B["default"].weight.abs().sum() > 0  # B starts from the weight, not at zero
    inputs, labels = fixed_batch(model)
    losses = train_steps(model, inputs, labels)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        logits = model.logits(inputs)
        ours = enc.model(**ids).last_hidden_state
    bundle = tmp_path / "bundle"
    _, loaded = write_and_reload(model, recipe, bundle)
    with torch.no_grad():
        assert torch.equal(loaded.model.logits(inputs), logits)
        theirs = PeftModel.from_pretrained(plain, str(bundle / "encoders" / "text")).eval()(**ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, AutoModel.from_pretrained(str(assets["bert"]))(**ids).last_hidden_state, atol=1e-4)
    assert merge_bundle(bundle, tmp_path / "merged")["max_abs_logit_diff"] <= 1e-5
    # a CNN's convolutions are not matrices: refused by name
    with pytest.raises(RecipeError, match=r"lora is not available for efficientnet_lite models: .*unquantized Linear"):
        build_method({"method": "lora", "init": init}).attach(build_encoder(str(assets["effnet"])))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_dropouts_train_with_the_model(assets, tmp_path, method):
    """peft's LoHa / LoKr apply rank and module dropout only in training mode: their layers
    switch with the model while the frozen base stays in eval mode."""
    from peft.tuners.lycoris_utils import LycorisLayer

    recipe = recipe_for(assets, "bert", {"method": method, "rank_dropout": 0.5}, tmp_path)
    model = build_model(recipe, 3)
    layers = [m for m in model.encoders["text"].modules() if isinstance(m, LycorisLayer)]
    model.train()
    assert layers and all(m.training for m in layers)
    assert not any(m.training for m in model.encoders["text"].modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    assert not any(m.training for m in layers)
