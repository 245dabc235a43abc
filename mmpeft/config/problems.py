"""Recipe problems as one line each: pydantic's errors with their dotted path (and, for a
misspelt key, the closest valid key), and a registered choice's settings validated in place."""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ValidationError


def validate_choice(block: dict, key: str, default: str, registry, where: str):
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
        return None, None, [format_error(err, cls, prefix=where) for err in exc.errors()]
    return {key: choice, **settings.model_dump()}, settings, []


def describe_error(err: dict, model: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as ``dotted.path: what is wrong (got ...)``."""
    return format_error(err, model, prefix)


def format_error(err: dict, model: type[BaseModel], prefix: str = "") -> str:
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
