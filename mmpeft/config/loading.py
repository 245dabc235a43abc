"""Read a recipe from YAML, apply dotted overrides, validate everything at once.

Errors are collected (pydantic's, then the per-method and per-fusion settings)
and raised together as one :class:`~mmpeft.errors.RecipeError`, each with its
dotted path and, for a misspelt key, the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from ..files import read_text
from .fusion import FUSION_SETTINGS
from .inputs import encoder_modality
from .methods import METHOD_SETTINGS
from .tasks import SINGLE_TASK, TASK_NAME, TASK_SETTINGS
from .paths import REQUIRED_BY_SOURCE, anchor_paths, apply_environment
from .schema import Recipe


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
        problems += [_format_error(err, Recipe) for err in exc.errors()]

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
        settings, parsed, errs = _validate_choice(peft, "method", "lora", METHOD_SETTINGS, where)
        problems += errs
        if settings is not None:
            resolved_peft[enc_name] = settings
            if block.get("quantization") and not parsed.keeps_base_frozen:
                frozen = [n for n in METHOD_SETTINGS.names() if METHOD_SETTINGS.get(n).keeps_base_frozen]
                problems.append(
                    f"encoders.{enc_name}.quantization: method {settings['method']!r} trains the base weights, "
                    f"which cannot be done on a quantized base; remove quantization or choose {', '.join(frozen[:-1])} "
                    f"or {frozen[-1]}"
                )
    fusion = raw.get("fusion", {"type": "gated"})
    resolved_fusion = None
    if isinstance(fusion, dict):
        resolved_fusion, parsed, errs = _validate_choice(fusion, "type", "gated", FUSION_SETTINGS, "fusion")
        problems += errs
        if parsed is not None and encoders:
            problems += parsed.modality_problems(list(encoders))

    resolved_tasks, task_problems = _validate_tasks(raw, list(encoders))
    problems += task_problems

    if recipe is not None:
        problems += _semantic_checks(recipe)
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


def _validate_tasks(raw: dict, encoders: list[str]):
    """Each task block against its kind's settings, the encoders it names, and
    ``train.select``. Returns ``({name: resolved block}, problems)``."""
    problems: list[str] = []
    many = raw.get("tasks")
    if many is not None and raw.get("task") is not None:
        problems.append("task: give either task: (one task) or tasks: (several, by name), not both")
    if isinstance(many, dict):
        if not many:
            problems.append("tasks: needs at least one task (or use task:)")
        blocks = {name: (block, f"tasks.{name}") for name, block in many.items()}
    else:
        single = raw.get("task")
        blocks = {SINGLE_TASK: ({"type": "vqa"} if single is None else single, "task")}
    resolved, parsed = {}, {}
    for name, (block, where) in blocks.items():
        if not isinstance(name, str) or not TASK_NAME.match(name):
            problems.append(f"{where}: a task name is letters, digits and _ (starting with a letter), at most 64 characters")
            continue
        if not isinstance(block, dict):
            if many is not None:  # a single task: block of the wrong type is already reported by pydantic
                problems.append(f"{where}: must be a mapping with type: and the task's settings")
            continue
        settings, one, errs = _validate_choice(block, "type", "vqa", TASK_SETTINGS, where)
        problems += errs
        if one is None:
            continue
        if one.head is not None:
            head, parsed_head, errs = _validate_choice(one.head, "type", "gated", FUSION_SETTINGS, f"{where}.head")
            problems += errs + (parsed_head.modality_problems(one.encoders or encoders) if parsed_head else [])
            settings["head"] = head
        elif one.uses_fusion and one.encoders and isinstance(raw.get("fusion", {}), dict):
            _, shared_head, _ = _validate_choice(raw.get("fusion", {"type": "gated"}), "type", "gated", FUSION_SETTINGS, "fusion")
            if shared_head is not None:  # fusion: names modalities; this task's head sees only its own encoders
                problems += [f"{where}.encoders: {p}" for p in shared_head.modality_problems(one.encoders)]
        resolved[name], parsed[name] = settings, one
        problems += one.problems(where)
        unknown = [e for e in one.encoders if e not in encoders]
        if unknown and encoders:
            problems.append(f"{where}.encoders: {', '.join(map(repr, unknown))} not an encoder of this recipe "
                            f"(have: {', '.join(encoders)})")
        reads = one.encoders or encoders
        if not one.uses_fusion and len(reads) != 2 and encoders:
            problems.append(f"{where}: a {one.registry_name} task aligns exactly two encoders; it reads "
                            f"{len(reads)} ({', '.join(reads)}): set {where}.encoders to two of them")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    batch = train.get("batch_size", 32)
    for name, one in parsed.items():
        if not one.uses_fusion and isinstance(batch, int) and batch < 2:
            problems.append(f"train.batch_size: a {one.registry_name} task ({name}) contrasts each row with the rest of "
                            f"its batch, so a batch needs at least 2 rows (got {batch})")
    select = train.get("select")
    if isinstance(select, str) and parsed:
        task, _, metric = select.partition(".")
        if task not in parsed and task in blocks:
            pass  # that task's own block is wrong, and reported above
        elif task not in parsed:
            problems.append(f"train.select: {select!r} names no task of this recipe; use <task>.<metric> with a task of: "
                            f"{', '.join(parsed)} (e.g. {next(iter(parsed))}.{next(iter(parsed.values())).metric})")
        elif metric not in parsed[task].metrics:
            problems.append(f"train.select: task {task!r} does not report {metric!r} (it reports: "
                            f"{', '.join(parsed[task].metrics)})")
    return resolved, problems


def _validate_choice(block: dict, key: str, default: str, registry, where: str):
    """Validate ``{key: name, ...settings}`` against the settings class registered as ``name``
    in ``registry`` (:data:`METHOD_SETTINGS` or :data:`FUSION_SETTINGS`).

    Returns:
        ``(resolved dict with every default, the parsed settings, problems)``; the first
        two are None when there are problems.
    """
    choice = block.get(key, default)
    if not isinstance(choice, str):
        return None, None, [f"{where}.{key}: must be a name such as {default!r} (got {choice!r})"]
    if choice not in registry:
        return None, None, [f"{where}.{key}: {registry.unknown_message(choice)}"]
    cls = registry.get(choice)
    rest = {k: v for k, v in block.items() if k != key}
    try:
        settings = cls.model_validate(rest)
    except ValidationError as exc:
        return None, None, [_format_error(err, cls, prefix=where) for err in exc.errors()]
    return {key: choice, **settings.model_dump()}, settings, []


def _semantic_checks(recipe: Recipe) -> list[str]:
    problems = []
    data = recipe.data
    for split in REQUIRED_BY_SOURCE.get(data.source, ()):
        if getattr(data, split) is None:
            problems.append(f"data.{split}: required when data.source is {data.source!r} (path to a .jsonl, .csv or .json file)")
    reads = {name: encoder_modality(cfg) for name, cfg in recipe.encoders.items()}
    if data.source == "fsdd":  # FSDD rows are recordings: images only when paired, text only when given
        for name, kind in reads.items():
            if kind == "image" and not data.pair_images:
                problems.append(f"encoders.{name}: an image encoder on FSDD needs data.pair_images: true (handwritten "
                                "images of each recording's digit)")
            if kind == "text" and not data.text:
                problems.append(f"encoders.{name}: a text encoder on FSDD needs data.text (the text of every row)")
    elif "audio" in reads.values() and data.source != "manifest":
        problems.append(f"data.source: {data.source} has no audio; audio encoders read data.source fsdd or a manifest "
                        "with an audio column (data.audio_field)")
    return problems


# --- error formatting -------------------------------------------------------


def describe_error(err: dict, model: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as ``dotted.path: what is wrong (got ...)``."""
    return _format_error(err, model, prefix)


def _format_error(err: dict, model: type[BaseModel], prefix: str = "") -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(([prefix] if prefix else []) + loc) or "(recipe)"
    kind = err["type"]
    ctx = err.get("ctx") or {}
    field_type = _field_type_at(model, loc)
    is_int = field_type is not None and "int" in str(field_type).lower()
    if kind == "extra_forbidden":
        allowed = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(allowed)}" if allowed else "")
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: is required"
    if kind == "string_pattern_mismatch" and loc[-1] == "name":
        return (f"{path}: must be one folder name: letters, digits, _ . - (not starting with '.', no '/'), "
                f"at most 200 characters (got {err.get('input')!r})")
    if kind == "less_than_equal":
        return f"{path}: must be at most {ctx.get('le'):,} (got {err.get('input')!r})"
    if kind == "greater_than" and ctx.get("gt") == 0:
        return f"{path}: must be a positive {'integer' if is_int else 'number'} (got {err.get('input')!r})"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{path}: must be an integer (got {err.get('input')!r})"
    if kind in ("float_parsing", "float_type"):
        return f"{path}: must be a number (got {err.get('input')!r})"
    if kind in ("bool_parsing", "bool_type"):
        return f"{path}: must be true or false (got {err.get('input')!r})"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    if kind == "value_error":
        return f"{path}: {ctx.get('error')} (got {err.get('input')!r})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{path}: must be a mapping of keys (got {err.get('input')!r})"
    return f"{path}: {err['msg'][0].lower() + err['msg'][1:]} (got {err.get('input')!r})"


def _unwrap(tp):
    """Find the BaseModel class inside Optional[...] / dict[str, ...] annotations."""
    origin = typing.get_origin(tp)
    if origin is None:
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is dict and len(args) == 2:
        return ("dict", _unwrap(args[1]))
    return _unwrap(args[0]) if args else tp


def _walk(model, loc: list[str]):
    node = model
    for part in loc:
        if isinstance(node, tuple) and node[0] == "dict":
            node = node[1]
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        node = _unwrap(node.model_fields[part].annotation)
    return node


def _keys_at(model, loc: list[str]) -> list[str]:
    node = _walk(model, loc)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(node.model_fields)
    return []


def _field_type_at(model, loc: list[str]):
    if not loc:
        return None
    parent = _walk(model, loc[:-1])
    if isinstance(parent, type) and issubclass(parent, BaseModel) and loc[-1] in parent.model_fields:
        return parent.model_fields[loc[-1]].annotation
    return None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default explicit)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
