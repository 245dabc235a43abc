"""PEFT methods: one module each, one registration each.

Importing this package registers every built-in method in :data:`METHODS`; each method's
recipe settings are registered under the same name in :mod:`mmpeft.config.methods`.
"""

from . import adapter, bitfit, frozen, ia3, lora, prompt  # noqa: F401  (registration side effects)
from .base import METHODS, PeftMethod, build_method, count_parameters

__all__ = ["METHODS", "PeftMethod", "build_method", "count_parameters"]
