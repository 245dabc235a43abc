"""PEFT methods: one module each, one registration each.

Importing this package registers every built-in method in :data:`METHODS`.
"""

from .base import METHODS, MethodSettings, PeftMethod, count_parameters
from . import adapter, bitfit, frozen, ia3, lora, prompt  # noqa: F401  (registration side effects)


def build_method(settings: dict, where: str = "peft") -> PeftMethod:
    """Instantiate the method named by ``settings['method']`` with its settings."""
    return METHODS.get(settings.get("method", "lora"))(settings, where)


__all__ = ["METHODS", "PeftMethod", "MethodSettings", "build_method", "count_parameters"]
