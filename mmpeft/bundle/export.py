"""Export a merged bundle to ONNX (its encoders' inputs in, every task's outputs side by side out), checked with onnxruntime."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import MMPeftError, UsageError
from ..files import sealed_directory
from .clap_export import branch_free_fusion
from .merge import merge_in_memory


class OnnxWrapper(nn.Module):
    """Positional tensors -> logits, in the order given by ``input_names``."""

    def __init__(self, model, layout: list[tuple[str, str]]):
        super().__init__()
        self.model = model
        self.layout = layout  # (encoder name, tensor key)

    def forward(self, *tensors):
        inputs: dict = {}
        for (name, key), tensor in zip(self.layout, tensors):
            inputs.setdefault(name, {})[key] = tensor
        return self.model.logits(inputs)  # every task's output side by side (the manifest's "outputs" say where)


def export_onnx(bundle, out: Path, *, opset: int = 17, overwrite: bool = False, tolerance: float = 1e-4,
                allow_base_mismatch: bool = False) -> dict:
    """Merge, export to ``out/model.onnx`` and compare ONNX Runtime with PyTorch on the probe batch.

    The folder is sealed: ``export.json`` lists every file's size and sha256.

    Returns:
        Report with the merge report, ``onnx_max_abs_diff`` (None without onnxruntime) and file names.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another --out")
    merged, report, inputs = merge_in_memory(bundle, allow_base_mismatch=allow_base_mismatch)
    loops = [name for name, task in merged.tasks.items() if not task.exports_onnx]
    if loops:
        raise UsageError(f"{bundle}: task(s) {', '.join(loops)} generate text token by token, which an ONNX graph of one "
                         "forward pass does not hold; use mmpeft merge and mmpeft predict / serve instead")
    model = merged.model.eval()
    for name, tensors_ in inputs.items():  # the exported graph takes one image per example
        rows = tensors_.pop("row_index", None)
        if rows is not None:
            tensors_["pixel_values"] = tensors_["pixel_values"][rows]
    layout = [(name, key) for name in model.encoders for key in sorted(inputs[name])]
    tensors = tuple(inputs[name][key] for name, key in layout)
    names = [f"{name}.{key}" for name, key in layout]
    dynamic = {}
    for (name, key), n in zip(layout, names):
        dynamic[n] = {0: "batch", 1: "tokens"} if key in ("input_ids", "attention_mask") else {0: "batch"}
    dynamic["logits"] = {0: "batch"}
    wrapper = OnnxWrapper(model, layout).eval()
    with torch.no_grad():
        expected = wrapper(*tensors).float().numpy()
    with sealed_directory(out, "export.json", overwrite=overwrite) as sealing:
        tmp = sealing.path
        # The tracer warns about every data-dependent branch of the encoders; nothing a user can
        # act on, and the parity check below is what tells whether the graph is right.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with branch_free_fusion(model) as fused:
                    torch.onnx.export(wrapper, tensors, str(tmp / "model.onnx"), input_names=names, output_names=["logits"],
                                      dynamic_axes=dynamic, opset_version=opset, dynamo=False)
            except Exception as exc:  # noqa: BLE001 - exporter failures are reported to the user
                raise MMPeftError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        exporter_warnings = dict(Counter(w.category.__name__ for w in caught))
        diff = None
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
            used = {i.name for i in session.get_inputs()}  # an input the graph never reads (AST's frames) is pruned
            got = session.run(["logits"], {n: t.numpy() for n, t in zip(names, tensors) if n in used})[0]
            diff = float(abs(got - expected).max())
            for variant in _fusion_variants(model, layout, tensors) if fused else ():  # every clip short, every clip long
                with torch.no_grad():
                    want = wrapper(*variant).float().numpy()
                got = session.run(["logits"], {n: t.numpy() for n, t in zip(names, variant) if n in used})[0]
                diff = max(diff, float(abs(got - want).max()))
            names = [n for n in names if n in used]
            if diff > tolerance:
                raise MMPeftError(f"ONNX check failed: max |logit diff| vs PyTorch {diff:.3e} > {tolerance:.0e}; nothing written")
        for name, enc in model.encoders.items():
            enc.save_preprocessor(tmp, name)
        preprocessing = {name: enc.export_preprocessing(name) for name, enc in model.encoders.items()}
        result = {"inputs": names, "output": "logits", "opset": opset, "onnx_max_abs_diff": diff, "exporter_warnings": exporter_warnings,
                  "onnxruntime": None if ort is None else ort.__version__, "merge": report}
        outputs = {name: [sl.start, sl.stop] for name, sl in model.slices.items()}  # each task's columns of `logits`
        tasks = {name: {"type": t.settings.registry_name, "state": t.state} for name, t in merged.tasks.items()}
        sealing.manifest.update({"format": "mmpeft-onnx-export", **result, "preprocessing": preprocessing, "vocabulary": merged.vocab,
                                 "outputs": outputs, "tasks": tasks})
    return result


def _fusion_variants(model, layout, tensors) -> list[tuple]:
    """The probe batch with every fused CLAP clip marked short, then long (by its ``frames``,
    real samples): the graph must answer both as PyTorch does (see :mod:`.clap_export`)."""
    variants = []
    for long in (False, True):
        variant = list(tensors)
        for i, (name, key) in enumerate(layout):
            enc = model.encoders[name]
            if key == "frames" and enc.fused:
                variant[i] = torch.full_like(tensors[i], 2 * int(enc.extractor.nb_max_samples) if long else 1)
        variants.append(tuple(variant))
    return variants
