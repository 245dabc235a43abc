"""Recipe schema, method, fusion and task settings, YAML loading, dotted overrides (torch-free)."""

from .fusion import FUSION_SETTINGS, FusionSettings
from .loading import apply_overrides, dump_recipe, load_recipe, validate_recipe
from .methods import METHOD_SETTINGS, MethodSettings
from .tasks import SINGLE_TASK, TASK_SETTINGS, TaskSettings, recipe_tasks
from .schema import AudioConfig, DataConfig, EncoderConfig, OutputConfig, QuantizationConfig, Recipe, TrainConfig

__all__ = [
    "Recipe", "EncoderConfig", "DataConfig", "TrainConfig", "OutputConfig",
    "AudioConfig", "QuantizationConfig", "load_recipe", "validate_recipe", "apply_overrides", "dump_recipe",
    "METHOD_SETTINGS", "MethodSettings", "FUSION_SETTINGS", "FusionSettings",
    "TASK_SETTINGS", "TaskSettings", "SINGLE_TASK", "recipe_tasks",
]
