"""Recipe schema, YAML loading, dotted overrides."""

from .loading import apply_overrides, dump_recipe, load_recipe, validate_recipe
from .schema import DataConfig, EncoderConfig, OutputConfig, QuantizationConfig, Recipe, TaskConfig, TrainConfig

__all__ = [
    "Recipe", "EncoderConfig", "DataConfig", "TaskConfig", "TrainConfig", "OutputConfig",
    "QuantizationConfig", "load_recipe", "validate_recipe", "apply_overrides", "dump_recipe",
]
