"""mmpeft: parameter-efficient fine-tuning of multimodal (text + image) models.

The Python API mirrors the CLI::

    import mmpeft
    bundle_dir = mmpeft.finetune("recipes/quickstart.yaml", overrides=["train.epochs=1"])
    bundle = mmpeft.load_bundle(bundle_dir)
    mmpeft.evaluate(bundle_dir)

This module only hands names on, and only when they are first used, so that importing a
light part of the package (``mmpeft.config``, the CLI's ``validate``) does not load torch.
"""

from importlib import import_module

from .version import __version__

# public name -> (module, attribute)
_API = {
    "finetune": ("mmpeft.train", "finetune"),
    "load_bundle": ("mmpeft.bundle.io", "load_bundle"),
    "evaluate": ("mmpeft.inference", "evaluate_bundle"),
    "load_recipe": ("mmpeft.config", "load_recipe"),
}

__all__ = [*_API, "__version__"]


def __getattr__(name):
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'mmpeft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
