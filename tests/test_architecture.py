"""The package's structure: layering and import graph, registries that agree, a new method
picked up by the benchmarks, and an architecture table whose every row fits its model."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmpeft"

# Lowest first; a module may import only from its own layer or below (same-layer imports
# are allowed as long as they form no loop).
LAYERS = [
    ["errors", "registry", "files", "version", "progress", "faults", "interrupt"],
    ["config"],
    ["quant", "encoders", "methods", "tasks"],
    ["fusion", "data"],
    ["model"],
    ["runtime", "scoring", "memory", "optim", "report", "profiling", "tracking"],
    ["checkpoint", "train", "inference", "bundle", "serve"],
    ["bench"],
    ["cli", "docs", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYER["__init__" if len(parts) == 1 else parts[1]]


def own_imports(path: Path):
    """``(imported module, line, inside a function)`` for every import of an mmpeft module."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "mmpeft":
                    if child.module is None or child.level and not child.module:
                        # `from . import x`: each name is a submodule
                        found.extend((f"{target}.{a.name}", child.lineno, nested) for a in child.names)
                    else:
                        found.append((target, child.lineno, nested))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names if a.name.split(".")[0] == "mmpeft")
            visit(child, nested)

    visit(tree, False)
    return found


def all_modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in all_modules():
        assert layer_of(module_name(path)) is not None


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for path in all_modules():
        me = module_name(path)
        for target, line, _ in own_imports(path):
            if layer_of(target) > layer_of(me):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                             f"(layer {layer_of(target)} above {layer_of(me)})")
    assert not wrong, "\n".join(wrong)


def test_import_graph_has_no_loop():
    graph: dict[str, set] = {}
    for path in all_modules():
        me = module_name(path)
        edges = graph.setdefault(me, set())
        parts_me = me.split(".")
        own_packages = {".".join(parts_me[:i]) for i in range(1, len(parts_me) + 1)}  # already being imported
        for target, _, _ in own_imports(path):
            parts = target.split(".")
            # importing a.b.c runs a/__init__ and a/b/__init__ first (unless they are the importer's own)
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges -= own_packages - {me}
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}
    loops = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not loops, "\n".join(loops)


def test_own_modules_are_imported_at_the_top_except_in_the_cli():
    """Function-local imports of the package's own modules hide the import graph; only the
    CLI imports its commands lazily (so that validate and --help do not load torch)."""
    local = [f"{path.relative_to(PACKAGE.parent)}:{line} {target}"
             for path in all_modules() if path.relative_to(PACKAGE).parts[0] != "cli"
             for target, line, nested in own_imports(path) if nested]
    assert not local, "\n".join(local)


def test_package_inits_only_hand_names_on():
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        logic = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                 and n.name not in ("__getattr__", "__dir__")]
        assert not logic, f"{path}: {[n.name for n in logic]} belong in a module of their own"


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_recipes_validate_without_torch():
    out = run_python(
        "import sys\n"
        "from mmpeft.config import load_recipe\n"
        "load_recipe('recipes/medical_vqa.yaml', ['encoders.image.peft={method: adapter, reduction_factor: 4}'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))\n")
    assert out.strip() == "[]"


def test_evaluation_and_prediction_do_not_import_training():
    out = run_python("import sys\nimport mmpeft.inference, mmpeft.bundle.merge, mmpeft.bundle.export\n"
                     "print('mmpeft.train' in sys.modules)\n")
    assert out.strip() == "False"


def test_registries_agree():
    """Every method and head is registered twice under one name: its torch-free recipe
    settings (config layer) and its implementation, which points at those settings."""
    from mmpeft.config import FUSION_SETTINGS, METHOD_SETTINGS
    from mmpeft.fusion import FUSIONS
    from mmpeft.methods import METHODS

    assert METHODS.names() == METHOD_SETTINGS.names()
    assert FUSIONS.names() == FUSION_SETTINGS.names()
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.Settings is METHOD_SETTINGS.get(name), name
        assert cls.keeps_base_frozen == METHOD_SETTINGS.get(name).keeps_base_frozen, name
    for name in FUSIONS.names():
        assert FUSIONS.get(name).Settings is FUSION_SETTINGS.get(name), name


def test_model_type_modalities_agree_with_the_architecture_table():
    """What the torch-free config layer knows a local transformers folder reads is what its row says."""
    from mmpeft.config.inputs import MODEL_TYPE_MODALITIES
    from mmpeft.encoders.architectures import DUAL_ENCODERS, TABLE

    hf_types = {k: row.modality for k, row in TABLE.items() if not k.startswith("efficientnet_lite")}
    assert MODEL_TYPE_MODALITIES == {**hf_types, **DUAL_ENCODERS}


@pytest.fixture
def dummy_method():
    """A new method registered the way a contributor would (settings + implementation)."""
    from mmpeft.config import METHOD_SETTINGS, MethodSettings
    from mmpeft.methods import METHODS
    from mmpeft.methods.base import PeftMethod

    @METHOD_SETTINGS.register("dummy")
    class DummySettings(MethodSettings):
        pass

    @METHODS.register("dummy")
    class Dummy(PeftMethod):
        Settings = DummySettings
        default_lr = 7e-4

        def apply(self, encoder):
            for p in encoder.parameters():
                p.requires_grad_(False)

    yield "dummy"
    METHODS.unregister("dummy")
    METHOD_SETTINGS.unregister("dummy")


def test_benchmarks_pick_up_a_new_method(dummy_method, tmp_path, monkeypatch):
    from mmpeft.bench import methods as bench_methods
    from mmpeft.bench import vqa_rad
    from mmpeft.bench.common import benchmark_methods

    assert dummy_method in benchmark_methods()
    assert vqa_rad.configurations()[dummy_method] == dummy_method
    assert f"{dummy_method} 0.0007" in vqa_rad.settings(bench_methods.load_recipe("recipes/medical_vqa_15ep.yaml"))
    # the methods benchmark trains it: record what it asks finetune for instead of training
    asked = []

    def fake_finetune(recipe, overwrite):
        asked.append((recipe.encoders["image"].peft["method"], recipe.train.lr))
        bundle = tmp_path / "runs" / recipe.run_name
        bundle.mkdir(parents=True)
        (bundle / "manifest.json").write_text(json.dumps({
            "encoders": {"image": {"trainable_parameters": 1, "total_parameters": 2}}, "head": {"parameters": 3}, "files": {}}))
        (bundle / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}, "history": [{"epoch_seconds": 1.0}]}))
        return bundle

    monkeypatch.setattr(bench_methods, "finetune", fake_finetune)
    rows = bench_methods.run("recipes/quickstart.yaml", out=str(tmp_path / "out"), sides=("image",), work_dir=str(tmp_path / "runs"))
    recipe_lr = bench_methods.load_recipe("recipes/quickstart.yaml").train.lr
    refused = {r["method"] for r in rows if "refused" in r}
    assert refused == {"vera", "ln_tuning"}  # the EfficientNet has no Linear or LayerNorm layers
    assert [m for m, _ in asked] == [m for m in benchmark_methods() if m not in refused]
    assert dict(asked)[dummy_method] == recipe_lr and dict(asked)["full"] == 5e-5
    assert [r["method"] for r in rows] == benchmark_methods()


# --- the architecture table -------------------------------------------------

# A tiny config per transformers model_type in the table (a new row needs one here).
TINY = {
    "text": dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=64),
    "distilbert": dict(vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64),
    "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8),
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "waveform": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),
                     conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    "whisper": dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=16, max_source_positions=25, max_target_positions=8,
                    vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
    "clap": dict(spec_size=64, window_size=4, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), patch_embeds_hidden_size=8,
                 hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], enable_fusion=False),
    "ast": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_mel_bins=16, max_length=32,
                patch_size=8, frequency_stride=8, time_stride=8),
}
KIND = {"bert": "text", "roberta": "text", "xlm-roberta": "text", "electra": "text", "deberta-v2": "text",
        "distilbert": "distilbert", "vit": "vision", "deit": "vision", "dinov2": "vision", "clip_vision_model": "vision",
        "clip_text_model": "text", "siglip_vision_model": "vision", "convnext": "convnext", "resnet": "resnet", "wav2vec2": "waveform", "hubert": "waveform",
        "wavlm": "waveform", "whisper": "whisper", "audio-spectrogram-transformer": "ast",
        "clap_audio_model": "clap"}


def tiny_model(model_type: str, assets):
    if model_type in ("efficientnet_lite", "efficientnet_lite_audio"):  # mmpeft's own CNN encoders, image and audio
        from mmpeft.encoders import build_encoder

        encoder = build_encoder(str(assets["effnet" if model_type == "efficientnet_lite" else "effnet_audio"]))
        assert encoder.arch == model_type
        return encoder.model
    from transformers import AutoConfig, AutoModel

    if model_type == "clap_audio_model":  # CLAP's audio tower has no AutoModel entry: mmpeft reads it from a whole CLAP
        from transformers import ClapAudioConfig, ClapAudioModel

        return ClapAudioModel(ClapAudioConfig(**TINY["clap"]))
    if model_type == "siglip_text_model":  # nor SigLIP's text tower (mmpeft loads a merged one with its own class)
        from transformers import SiglipTextConfig, SiglipTextModel

        return SiglipTextModel(SiglipTextConfig(**TINY["text"]))
    assert model_type in KIND, f"add a tiny config for the new architecture {model_type!r} to this test"
    return AutoModel.from_config(AutoConfig.for_model(model_type, **TINY[KIND[model_type]]))


@pytest.mark.parametrize("model_type", sorted(__import__("mmpeft.encoders.architectures", fromlist=["TABLE"]).TABLE))
def test_every_table_row_fits_its_model(model_type, assets):
    """The defaults of each row name modules that exist in a model of that type."""
    import re

    from mmpeft.encoders import architecture, match_targets
    from mmpeft.encoders.hf import hf_modality

    row = architecture(model_type)
    model = tiny_model(model_type, assets)
    if not model_type.startswith("efficientnet_lite"):
        assert hf_modality(model.config) == row.modality
    names = [n for n, _ in model.named_modules() if n]
    assert row.lora and match_targets(model, row.lora), f"{model_type}: LoRA targets {row.lora} match nothing"
    if row.ia3:
        targets, feedforward = row.ia3
        matched = set(match_targets(model, targets))
        assert matched and set(match_targets(model, feedforward) if feedforward else []) <= matched
    for pattern in (row.adapter_attention, row.adapter_ffn, row.cnn_blocks):
        if pattern:
            assert any(re.fullmatch(pattern, n) for n in names), f"{model_type}: {pattern} matches no module"
    if row.prompt == "vpt":
        assert hasattr(model, "embeddings")


# The modules that own a kind: a task kind, a data source or an encoder family may be named
# and its attributes probed there, and nowhere else (ask the kind, don't probe it).
OWNERS = ("tasks/", "config/tasks.py", "config/task_checks.py", "config/datasets.py", "data/sources.py",
          "data/huggingface.py", "data/samples.py", "encoders/")


def _strings(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def test_no_kind_is_named_or_probed_outside_its_own_module():
    """Outside the modules that own them, no comparison tests a task kind's, data source's or
    encoder family's name, and no hasattr / getattr probes a task or an encoder."""
    from mmpeft.config.datasets import DATASET_SPECS
    from mmpeft.encoders.families import ENCODER_FAMILIES
    from mmpeft.tasks import TASKS

    names = set(TASKS.names()) | set(DATASET_SPECS.names()) | set(ENCODER_FAMILIES.names())
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(OWNERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                named = [s for part in (node.left, *node.comparators) for s in _strings(part) if s in names]
                if named:
                    found.append(f"mmpeft/{rel}:{node.lineno} compares with {named}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                  and node.args):
                target = ast.unparse(node.args[0])
                if any(word in target for word in ("task", "enc", "settings")):
                    found.append(f"mmpeft/{rel}:{node.lineno} {node.func.id}({target}, ...)")
    assert not found, "\n".join(found)
