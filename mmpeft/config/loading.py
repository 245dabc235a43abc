"""Read a recipe from YAML, apply dotted overrides, validate everything at once.

Errors are collected (pydantic's, then the per-method and per-fusion settings)
and raised together as one :class:`~mmpeft.errors.RecipeError`, each with its
dotted path and, for a misspelt key, the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from ..files import read_text
from .fusion import FUSION_SETTINGS
from .inputs import encoder_modality
from .methods import METHOD_SETTINGS, quantized_problem
from .problems import format_error, validate_choice
from .task_checks import validate_tasks
from .tasks import SINGLE_TASK
from .datasets import dataset_spec, foreign_keys, missing_keys
from .paths import anchor_paths, apply_environment
from .schema import DataConfig, Recipe


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of YAML; anything larger is a mistake (or hostile)
MAX_RECIPE_VALUES = 100_000  # values after YAML aliases are expanded ("billion laughs" stops here)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the second would
    silently replace the first: two ``train:`` blocks, say)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str | None = None):
    """YAML (safe loader, no duplicate keys) of bounded size after alias expansion."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source) from None
    except RecursionError:
        raise RecipeError(["nested too deeply to be a recipe"], source) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise RecipeError([f"not a usable recipe value: {str(exc).splitlines()[0]}"], source) from None
    _check_size(value, source)
    return value


def _check_size(value, source) -> None:
    """Count values as a consumer would see them (aliases expanded), stopping at the bound."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise RecipeError([f"expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases that repeat each other?); "
                               "a recipe is much smaller"], source)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _RecipeFileError(RecipeError):
    def __init__(self, message: str):
        super().__init__([message])


def load_recipe(source: str | Path | dict, overrides: Sequence[str] = (), anchor: bool = True) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        source: a YAML file path or an already-parsed dict.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars/lists.
        anchor: read relative data paths of a recipe file from its folder (see
            :mod:`mmpeft.config.paths`); a bundle's resolved recipe is loaded without.

    Returns:
        The validated :class:`Recipe`, with every method/fusion default filled in.

    Raises:
        RecipeError: listing every problem found (exit code 2).
    """
    name = None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise RecipeError([f"recipe file not found: {path}"], None)
        text = read_text(path, _RecipeFileError, max_bytes=MAX_RECIPE_BYTES)
        raw = parse_yaml(text, name)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(["the recipe must be a mapping of keys (encoders:, fusion:, ...)"], name)
        if anchor:
            anchor_paths(raw, path.resolve().parent)
    apply_environment(raw)
    problems = apply_overrides(raw, overrides)
    if problems:
        raise RecipeError(problems, name)
    return validate_recipe(raw, name)


def apply_overrides(raw: dict, overrides: Iterable[str]) -> list[str]:
    """Set ``a.b.c=value`` entries in ``raw`` in place; returns problems found."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(f"override {item!r}: empty key")
            continue
        try:
            value = parse_yaml(text) if text.strip() != "" else ""
        except RecipeError as exc:
            if "expands to" in str(exc) or "nested too deeply" in str(exc) or "usable recipe value" in str(exc):
                problems.append(f"override {item!r}: {exc.problems[0]}")
                continue
            value = text  # not YAML: the text as it is
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return problems


def validate_recipe(raw: dict, source: str | None = None) -> Recipe:
    """Validate a raw recipe dict; see :func:`load_recipe`."""
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [format_error(err, Recipe) for err in exc.errors()]

    # Method settings, per encoder, even if other parts failed: report all at once.
    resolved_peft: dict[str, dict] = {}
    encoders = raw.get("encoders") if isinstance(raw.get("encoders"), dict) else {}
    for enc_name, block in encoders.items():
        if not isinstance(block, dict):
            continue
        peft = block.get("peft", {"method": "lora"})
        if not isinstance(peft, dict):
            continue  # already reported by pydantic
        where = f"encoders.{enc_name}.peft"
        settings, parsed, errs = validate_choice(peft, "method", "lora", METHOD_SETTINGS, where)
        problems += errs
        if settings is not None:
            resolved_peft[enc_name] = settings
            problem = block.get("quantization") and quantized_problem(
                f"encoders.{enc_name}.quantization", settings["method"], parsed)
            if problem:
                problems.append(problem)
    fusion = raw.get("fusion", {"type": "gated"})
    resolved_fusion = None
    if isinstance(fusion, dict):
        resolved_fusion, parsed, errs = validate_choice(fusion, "type", "gated", FUSION_SETTINGS, "fusion")
        problems += errs
        if parsed is not None and encoders:
            problems += parsed.modality_problems(list(encoders))

    resolved_tasks, task_problems = validate_tasks(raw, list(encoders))
    problems += task_problems

    if recipe is not None:
        problems += _semantic_checks(recipe, resolved_tasks if not task_problems else {})
    if problems:
        raise RecipeError(problems, source)
    for enc_name, settings in resolved_peft.items():
        recipe.encoders[enc_name].peft = settings
    recipe.fusion = resolved_fusion
    if recipe.tasks:
        recipe.tasks = resolved_tasks
        recipe.task = None  # a recipe of several tasks has no single one (its dump says so)
    else:
        recipe.task = resolved_tasks[SINGLE_TASK]
    return recipe


def _semantic_checks(recipe: Recipe, tasks: dict) -> list[str]:
    """Each data block the recipe reads (its data:, and each task's own) against the encoders
    that read it (a task's data: only its own encoders)."""
    encoders = list(recipe.encoders)
    readers: dict[str, list[str]] = {}  # data block path -> the encoders reading its rows
    for name, block in tasks.items():
        where = f"tasks.{name}.data" if block.get("data") else "data"
        readers.setdefault(where, [])
        readers[where] += [e for e in (block.get("encoders") or encoders) if e not in readers[where] and e in encoders]
    if not tasks:  # the task blocks had problems of their own: check the recipe's data: as it stands
        readers["data"] = encoders
    problems = []
    for where, names in readers.items():
        data = recipe.data if where == "data" else DataConfig.model_validate(tasks[where.split(".")[1]]["data"])
        if where == "data":  # (a task's own data: had these checked with its block)
            problems += missing_keys(data, where) + foreign_keys(data, where)
        reads = {name: encoder_modality(recipe.encoders[name]) for name in names}
        problems += _own_column_problems(data, where, reads, encoders)
        problems += dataset_spec(data.source).input_problems(data, where, reads)
    return problems


def _own_column_problems(data, where: str, reads: dict, encoders: list[str]) -> list[str]:
    """``data.encoder_fields`` against the encoders reading the block (``reads``: name -> modality)."""
    problems = []
    for name in data.encoder_fields:
        key = f"{where}.encoder_fields.{name}"
        if name not in encoders:
            close = difflib.get_close_matches(name, encoders, n=1)
            problems.append(f"{key}: {name!r} is not an encoder of this recipe" +
                            (f"; did you mean {close[0]!r}?" if close else f" (have: {', '.join(encoders)})"))
        elif name not in reads:
            problems.append(f"{key}: encoder {name!r} reads none of these rows (its tasks have data of their own)")
        elif not dataset_spec(data.source).columns:
            problems.append(f"{key}: {data.source} has fixed columns; an encoder reads a column of its own from a "
                            "manifest or a huggingface dataset (data.source: manifest / huggingface)")
        elif reads[name] is None:
            problems.append(f"{key}: the modality of encoder {name!r} is not known before it loads; set "
                            f"encoders.{name}.modality (text, image or audio) to read a column of its own")
    return problems


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default explicit)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
