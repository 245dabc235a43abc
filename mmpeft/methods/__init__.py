"""PEFT methods: one module each, one registration each.

Importing this package registers every built-in method in :data:`METHODS`; each method's
recipe settings are registered under the same name in :mod:`mmpeft.config.methods`.
"""

from . import adapter, bitfit, boft, frozen, ia3, ln_tuning, loha, lokr, lora, oft, prompt, vera  # noqa: F401  (registration)
from .base import METHODS, PeftMethod, build_method, count_parameters

__all__ = ["METHODS", "PeftMethod", "build_method", "count_parameters"]
