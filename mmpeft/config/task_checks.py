"""Checks of a recipe's tasks that one block's schema cannot make: the encoders each task
names, its own head and data, the batch a contrastive task needs, and ``train.select``."""

from __future__ import annotations

from pydantic import ValidationError

from .fusion import FUSION_SETTINGS
from .datasets import foreign_keys, missing_keys
from .problems import format_error, validate_choice
from .schema import DataConfig
from .tasks import SINGLE_TASK, TASK_NAME, TASK_SETTINGS


def validate_tasks(raw: dict, encoders: list[str]):
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
        settings, one, errs = validate_choice(block, "type", "vqa", TASK_SETTINGS, where)
        problems += errs
        if one is None:
            continue
        if one.head is not None:
            head, parsed_head, errs = validate_choice(one.head, "type", "gated", FUSION_SETTINGS, f"{where}.head")
            problems += errs + (parsed_head.modality_problems(one.encoders or encoders) if parsed_head else [])
            settings["head"] = head
        elif one.uses_fusion and one.encoders and isinstance(raw.get("fusion", {}), dict):
            _, shared_head, _ = validate_choice(raw.get("fusion", {"type": "gated"}), "type", "gated", FUSION_SETTINGS, "fusion")
            if shared_head is not None:  # fusion: names modalities; this task's head sees only its own encoders
                problems += [f"{where}.encoders: {p}" for p in shared_head.modality_problems(one.encoders)]
        if one.data is not None:
            data, errs = _task_data(one.data, f"{where}.data", many is not None)
            problems += errs
            settings["data"] = data
        resolved[name], parsed[name] = settings, one
        problems += one.problems(where)
        unknown = [e for e in one.encoders if e not in encoders]
        if unknown and encoders:
            problems.append(f"{where}.encoders: {', '.join(map(repr, unknown))} not an encoder of this recipe "
                            f"(have: {', '.join(encoders)})")
        reads = one.encoders or encoders
        if one.aligns_inputs and len(reads) != 2 and encoders:
            problems.append(f"{where}: a {one.registry_name} task aligns exactly two encoders; it reads "
                            f"{len(reads)} ({', '.join(reads)}): set {where}.encoders to two of them")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    batch = train.get("batch_size", 32)
    for name, one in parsed.items():
        if one.aligns_inputs and isinstance(batch, int) and batch < 2:
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


# settings of how batches are made and kept, one for the whole run: the recipe's data: has them
RUN_WIDE_DATA = ("image_cache_mb", "augment", "group_by_image", "on_bad_image", "on_bad_audio", "on_bad_video")


def _task_data(block, where: str, several: bool):
    """A task's own ``data:`` block, resolved (every default filled in), and its problems."""
    if not several:
        return None, [f"{where}: a single task reads the recipe's data:; put these settings there"]
    if not isinstance(block, dict):
        return None, [f"{where}: must be a mapping like data: (source, train, test, ...)"]
    try:
        data = DataConfig.model_validate(block)
    except ValidationError as exc:
        return None, [format_error(err, DataConfig, prefix=where) for err in exc.errors()]
    problems = [f"{where}.{key}: is a setting of the whole run; set it in the recipe's data: instead"
                for key in RUN_WIDE_DATA if key in block]
    problems += missing_keys(data, where) + foreign_keys(data, where)
    return data.model_dump(exclude=set(RUN_WIDE_DATA)), problems
