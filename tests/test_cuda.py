"""The quantized path on a CUDA GPU, end to end through the CLI.

CI has no GPU, so these are skipped there (with that reason); they run where one is
lent: ``python -m pytest tests/test_cuda.py``. On CPU the same path is covered by
test_quant.py with bitsandbytes' CPU backend.
"""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from tests import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; run on a GPU machine)")
pytest.importorskip("bitsandbytes")

runner = CliRunner()


@pytest.mark.parametrize("bits,optimizer", [(4, "paged_adamw_8bit"), (8, "adamw_8bit")])
def test_quantized_finetune_on_cuda_reloads_and_reproduces(assets, tmp_path, bits, optimizer):
    raw = tiny.recipe_dict(assets["bert64"], assets["vit64"], assets["data"], tmp_path, text_method="lora",
                           image_method="lora", epochs=4, optimizer=optimizer, gradient_checkpointing=True,
                           device="cuda", mixed_precision="bf16")
    for enc in raw["encoders"].values():
        enc["quantization"] = {"bits": bits, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    recipe = tmp_path / "cuda.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    res = runner.invoke(app, ["finetune", str(recipe)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "tiny"
    log = [json.loads(line) for line in (bundle / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["encoders"]["text"]["quantization"]["bits"] == bits
    assert manifest["encoders"]["image"]["quantization"]["compute_dtype"] == "bfloat16"

    # evaluate quantizes a fresh base the same way and must reproduce the stored metrics
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "reproduced" in res.output
