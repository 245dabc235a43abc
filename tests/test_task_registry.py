"""A task kind registered by a test alone (nothing else in the package edited) is validated,
trained, evaluated, predicted, inspected, merged and served through the CLI, and appears
in the generated registry reference: the loop over tasks asks the kind, never its name."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import yaml
from pydantic import Field
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config.tasks import TASK_SETTINGS, TaskSettings
from mmpeft.docs import registry_reference
from mmpeft.tasks import TASKS, Task
from tests.test_tasks import recipe, write_rows


class ParitySettings(TaskSettings):
    """Whether a row's text has an even number of words (registered by a test only)."""

    metrics = ("parity_accuracy", "loss")
    metric: str = Field("parity_accuracy", description="the metric that selects the best checkpoint")


class ParityTask(Task):
    """Even or odd word count of the row's text: two outputs, cross-entropy."""

    Settings = ParitySettings
    width = 2

    def target(self, row):
        return len(row.text.split()) % 2 if self.owns(row) else None

    def collate(self, rows):
        return torch.tensor([-1 if (t := self.target(r)) is None else t for r in rows])

    def usable(self, target):
        return target >= 0

    def loss(self, out, target, usable=None):
        if not self.rows_to_learn(target, usable):
            return out.sum() * 0.0
        return F.cross_entropy(out.float(), target.to(out.device), ignore_index=-1)

    def score(self, out, rows, group_fields=()):
        gold = self.collate(rows)
        return {"parity_accuracy": float((out.argmax(-1) == gold).float().mean()), "count": len(rows),
                "loss": float(F.cross_entropy(out.float(), gold))}

    def answer(self, out, top_k):
        return [{"even": bool(i == 0)} for i in out.argmax(-1).tolist()]


def test_a_task_registered_by_a_test_alone_works_through_the_cli(assets, tmp_path):
    TASK_SETTINGS.register("parity_test")(ParitySettings)
    TASKS.register("parity_test")(ParityTask)
    try:
        files = write_rows(tmp_path / "rows")
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe(assets, files, tmp_path / "out", task={"type": "parity_test"}, batch_size=8)))
        runner = CliRunner()
        res = runner.invoke(app, ["validate", str(path)])
        assert res.exit_code == 0, res.output
        bad = yaml.safe_load(path.read_text())
        bad["task"]["metric"] = "accuracy"
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        res = runner.invoke(app, ["validate", str(tmp_path / "bad.yaml")])
        assert res.exit_code == 2 and "parity_accuracy" in res.output, res.output
        res = runner.invoke(app, ["finetune", str(path)])
        assert res.exit_code == 0, res.output
        bundle = tmp_path / "out" / "tiny"
        stored = json.loads((bundle / "metrics.json").read_text())["tasks"]["answer"]
        assert 0.0 <= stored["parity_accuracy"] <= 1.0 and stored["count"] == 24
        res = runner.invoke(app, ["evaluate", str(bundle)])
        assert res.exit_code == 0 and "reproduced" in res.output, res.output
        image = str(files["test"].parent / "images/test_0.png")
        res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "a red square"])
        assert res.exit_code == 0 and '"even"' in res.output, res.output
        res = runner.invoke(app, ["inspect", str(bundle)])
        assert res.exit_code == 0 and f"parity_accuracy {stored['parity_accuracy']:.4f}" in res.output, res.output
        res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
        assert res.exit_code == 0 and "verified on" in res.output, res.output
        from fastapi.testclient import TestClient

        from mmpeft.serve.app import ServeSettings, create_app
        from mmpeft.serve.pool import AdapterPool

        with TestClient(create_app(AdapterPool({"b": bundle}, log=lambda m: None), ServeSettings())) as client:
            reply = client.post("/predict", files={"image": ("x.png", open(image, "rb").read(), "image/png")},
                                data={"question": "a red square"})
        assert reply.status_code == 200 and "even" in reply.json()["result"], reply.text
        assert "| `parity_test` |" in registry_reference() and "Even or odd word count" in registry_reference()
    finally:
        TASKS.unregister("parity_test")
        TASK_SETTINGS.unregister("parity_test")
