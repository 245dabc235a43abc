"""mmpeft: parameter-efficient fine-tuning of multimodal (text + image) models.

The Python API mirrors the CLI::

    import mmpeft
    bundle_dir = mmpeft.finetune("recipes/quickstart.yaml", overrides=["train.epochs=1"])
    bundle = mmpeft.load_bundle(bundle_dir)
    mmpeft.evaluate(bundle_dir)
"""

__version__ = "0.1.0"


def finetune(recipe, overrides=(), dry_run=False, overwrite=None):
    """See :func:`mmpeft.train.finetune`."""
    from .train import finetune as _finetune

    return _finetune(recipe, overrides=overrides, dry_run=dry_run, overwrite=overwrite)


def load_bundle(path, **kwargs):
    """See :func:`mmpeft.bundle.io.load_bundle`."""
    from .bundle.io import load_bundle as _load

    return _load(path, **kwargs)


def evaluate(path, overrides=(), **kwargs):
    """See :func:`mmpeft.inference.evaluate_bundle`."""
    from .inference import evaluate_bundle

    return evaluate_bundle(path, overrides=overrides, **kwargs)


def load_recipe(source, overrides=()):
    """See :func:`mmpeft.config.load_recipe`."""
    from .config import load_recipe as _load

    return _load(source, overrides)


__all__ = ["finetune", "load_bundle", "evaluate", "load_recipe", "__version__"]
