"""Encoder families register like methods: a family registered by a test alone (nothing
else edited) is validated, trained, evaluated, predicted and inspected through the CLI."""

import json

import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.encoders.base import EncoderOutput, ImageEncoder
from mmpeft.encoders.families import ENCODER_FAMILIES, EncoderFamily, family_for
from tests import tiny


def test_built_in_families_claim_their_models(assets):
    assert type(family_for("efficientnet-lite0", "efficientnet-lite0")).registry_name == "efficientnet_lite"
    assert type(family_for(str(assets["bert"]), str(assets["bert"]))).registry_name == "transformers"
    assert type(family_for(str(assets["effnet"]), str(assets["effnet"]))).registry_name == "efficientnet_lite"


class TinyConv(ImageEncoder):
    """A 3x3 convolution over 16 px images (the same seeded weights on every build)."""

    arch = "tiny_conv_test"

    def __init__(self, source: str):
        super().__init__(source, "auto")
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        self.hidden_size, self.image_size = 8, 16

    def encode_pixels(self, pixel_values):
        tokens = self.model(pixel_values).flatten(2).transpose(1, 2)
        return EncoderOutput(tokens=tokens, mask=torch.ones(tokens.shape[:2], dtype=torch.bool), pooled=tokens.mean(1))


def test_a_registered_family_trains_and_its_bundle_works_without_an_edit_elsewhere(assets, tmp_path):
    @ENCODER_FAMILIES.register("tiny_conv_test")
    class TinyConvFamily(EncoderFamily):
        order = 1

        def claims(self, model, source):
            return model == "tinyconv"

        def build(self, model, source, options):
            return TinyConv(model)

    try:
        raw = tiny.recipe_dict(assets["bert"], "tinyconv", assets["data"], tmp_path / "out", epochs=1)
        raw["encoders"]["image"].update(modality="image", peft={"method": "bitfit"})
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(raw))
        runner = CliRunner()
        for command in (["validate", str(path)], ["finetune", str(path)]):
            res = runner.invoke(app, command)
            assert res.exit_code == 0, res.output
        bundle = tmp_path / "out" / "tiny"
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["encoders"]["image"]["model"] == "tinyconv" and manifest["encoders"]["image"]["trainable_parameters"] == 8
        res = runner.invoke(app, ["evaluate", str(bundle)])
        assert res.exit_code == 0 and "reproduced" in res.output, res.output
        image = str(assets["data"]["test"].parent / "images/test_0.png")
        res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "what color is the shape ?"])
        assert res.exit_code == 0 and "0." in res.output, res.output
        res = runner.invoke(app, ["inspect", str(bundle)])
        assert res.exit_code == 0 and "tinyconv" in res.output, res.output
        from mmpeft.docs import registry_reference

        assert "| `tiny_conv_test` |" in registry_reference()  # listed in the generated reference, unedited
    finally:
        ENCODER_FAMILIES.unregister("tiny_conv_test")
