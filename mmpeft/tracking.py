"""Experiment tracking (``train.report_to``): the run's losses and validation metrics sent to
each tracker through accelerate's own tracker classes, as the Hugging Face Trainer's
``report_to`` does: TensorBoard (``<output.dir>/.runs/<run>``), MLflow (its
``MLFLOW_TRACKING_URI``, a ``file:`` store needs no server), Weights & Biases and the rest of
accelerate's list. Only the main process reports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from .errors import RecipeError

#: tracker -> the package it needs
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def check_trackers(names) -> list[str]:
    """The trackers whose packages are installed; an explicitly named one that is not is an
    error before anything trains (TensorBoard, the default, is left out with a note)."""
    found, notes = [], []
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is not None:
            found.append(name)
        elif name == "tensorboard":
            notes.append("tensorboard is not installed: no TensorBoard log (pip install tensorboard)")
        else:
            raise RecipeError([f"train.report_to: {name} needs the package {PACKAGES[name]} (pip install {PACKAGES[name]}), "
                               f"or leave {name} out"])
    for note in notes:
        print(note)
    return found


class Trackers:
    """The run's trackers: :meth:`log` a row of numbers at a step, :meth:`close` at the end."""

    def __init__(self, names, run_name: str, logdir: Path, config: dict):
        """``names``: trackers whose packages :func:`check_trackers` found."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        # hyperparameters as trackers take them: numbers, text and booleans (a list or mapping as its JSON)
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}
        for name in names:  # already checked (check_trackers)
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "mlflow":  # one experiment for mmpeft's runs (MLFLOW_EXPERIMENT_NAME overrides), a run per run name
                tracker = cls(experiment_name="mmpeft", run_name=run_name)
            elif cls.requires_logging_directory:
                tracker = cls(run_name, str(logdir))
            else:
                tracker = cls(run_name)
            try:
                tracker.start()
                tracker.store_init_configuration(config)
            except Exception as exc:  # the tracker's own settings (a tracking URI, a login) are the user's to fix
                text = str(exc).splitlines()[0][:300] if str(exc) else ""
                raise RecipeError([f"train.report_to: {name} could not start ({type(exc).__name__}: {text})"]) from None
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        """Numbers under names every tracker takes (MLflow refuses '=': a group's ``kind=color`` is ``kind:color``)."""
        numbers = {_NAME.sub("_", k.replace("=", ":")): v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in list(self.trackers):
            try:
                tracker.log(numbers, step=step)
            except Exception as exc:  # a tracker's hiccup (a lost connection) must not end the training run
                print(f"train.report_to: {tracker.name} stopped logging ({type(exc).__name__}: {str(exc)[:200]})")
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
