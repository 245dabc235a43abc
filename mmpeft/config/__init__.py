"""Recipe schema, method and fusion settings, YAML loading, dotted overrides (torch-free)."""

from .fusion import FUSION_SETTINGS, FusionSettings
from .loading import apply_overrides, dump_recipe, load_recipe, validate_recipe
from .methods import METHOD_SETTINGS, MethodSettings
from .schema import AudioConfig, DataConfig, EncoderConfig, OutputConfig, QuantizationConfig, Recipe, TaskConfig, TrainConfig

__all__ = [
    "Recipe", "EncoderConfig", "DataConfig", "TaskConfig", "TrainConfig", "OutputConfig",
    "AudioConfig", "QuantizationConfig", "load_recipe", "validate_recipe", "apply_overrides", "dump_recipe",
    "METHOD_SETTINGS", "MethodSettings", "FUSION_SETTINGS", "FusionSettings",
]
