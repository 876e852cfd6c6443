"""A training run's directory as a model: its task, architecture, tokenizer and parameters.

    run_dir/
      config.yaml       `task`, the `model` fields and the training keys (`python -m train`)
      tokenizer.model   the sentencepiece model the run trained or was given, or a checkpoint's
                        tokenizer files (tokenizer.json, tokenizer_config.json...): `Tokenizer.load(run_dir)`
      labels.json       label names (classification)
      artefacts.json    what made each file, and the sha256 of the tokenizer files (train.rundir)
      checkpoints/      Orbax steps (see transformer.checkpoint)

The sampler, fine-tuning from a pretrained run and the training job all open runs here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from typing import Any

import flax.linen as nn
import jax
import yaml

from transformer.checkpoint import CheckpointUnreadable, Checkpointer
from transformer.config import ModelConfig
from transformer.files import sha256_file
from transformer.tasks import Task
from transformer.tokenizer import Tokenizer

ARTEFACTS = "artefacts.json"  # {file name: what made it}; train.rundir.Artefacts writes it
DIGEST = "sha256"  # in a file's record: the file's own digest when the run made it


@dataclasses.dataclass(frozen=True)
class Run:
    """A run directory opened: the model of its task and the parameters of one checkpoint."""

    path: pathlib.Path
    task: Task
    model: nn.Module
    params: Any  # boxed in nn.Partitioned, on this process's first device
    tokenizer: Tokenizer
    step: int  # the checkpoint the parameters come from


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The values of a run's config.yaml; a clear error when `run_dir` is not a run directory."""
    path = pathlib.Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no config.yaml); train one with `python -m train`."
        )
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict) or values.get("task") not in list(Task) or "model" not in values:
        raise ValueError(f"{path} is not a run's config: it needs a `task` ({', '.join(Task)}) and `model` fields.")
    return values


def label_names(run_dir: str | os.PathLike) -> list[str]:
    """The label names of a classification run (labels.json); empty for other tasks."""
    path = pathlib.Path(run_dir) / "labels.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def run_model(run_dir: str | os.PathLike) -> tuple[Task, nn.Module]:
    """The task and the model (heads included) a run directory trained."""
    values = read_config(run_dir)
    task = Task(values["task"])
    model = task.model(
        ModelConfig.from_dict(values["model"]),
        num_labels=max(len(label_names(run_dir)), 2),
        next_sentence_prediction=bool(values.get("next_sentence_prediction") or values.get("sentence_order_prediction")),
        span_boundary_objective=bool(values.get("span_boundary_objective")),
    )
    return task, model


def read_artefacts(run_dir: str | os.PathLike) -> dict[str, dict]:
    """The records of a run's artefacts.json ({} where there is none); a clear error where it is damaged."""
    path = pathlib.Path(run_dir) / ARTEFACTS
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        valid = isinstance(records, dict) and all(isinstance(record, dict) for record in records.values())
        problem = "" if valid else "not an object of records"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = str(error)
    if problem:
        raise ValueError(
            f"{path} is damaged ({problem}); it records what made each file of the run. Put back a good copy, "
            f"or delete it: the run's files are then adopted as they are, unchecked."
        )
    return records


def check_unchanged(run_dir: str | os.PathLike, records: dict[str, dict]) -> None:
    """Raises naming the first file of `records` that differs from the digest recorded when the run
    made it (a tokenizer edited or replaced since). Records without a digest (older runs) pass."""
    run_dir = pathlib.Path(run_dir)
    for name, record in sorted(records.items()):
        path = run_dir / name
        if DIGEST not in record:
            continue
        now = sha256_file(path) if path.is_file() else None
        if now == record[DIGEST]:
            continue
        raise ValueError(
            f"{path} is not the file this run was made with (sha256 {record[DIGEST][:12]} recorded in "
            f"{run_dir / ARTEFACTS}, {f'sha256 {now[:12]}' if now else 'missing'} now): its checkpoints were trained with the recorded one, and would be "
            f"resumed or sampled with another tokenization. Put the recorded file back, or train a new run "
            f"(another run_dir) with this one."
        )


def load_run(run_dir: str | os.PathLike, *, step: int | None = None) -> Run:
    """The model, parameters (`step`, or the newest step that restores cleanly) and tokenizer of a
    training run, on this process's first device, whatever mesh the run trained on.

    A damaged newest step is passed over with a warning naming it (and left in place); a
    tokenizer file that differs from the one the run trained with is an error.
    """
    run_dir = pathlib.Path(run_dir)
    task, model = run_model(run_dir)
    check_unchanged(run_dir, read_artefacts(run_dir))
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *task.example_inputs()))["params"]
    checkpointer = Checkpointer(run_dir / "checkpoints", step_option="step=N (--step N on the command line)")
    try:
        if step is None:
            params, step = _newest(checkpointer, abstract, run_dir)
        else:
            params = checkpointer.restore_params(abstract, step)
    finally:
        checkpointer.close()
    return Run(run_dir, task, model, params, Tokenizer.load(run_dir), step)


def _newest(checkpointer: Checkpointer, abstract_params, run_dir: pathlib.Path) -> tuple[Any, int]:
    """(parameters, step) of the newest step that restores cleanly, with a warning for each damaged one passed over."""
    steps = checkpointer.all_steps() or [None]  # None: restore_params raises, naming the empty folder
    for step in reversed(steps):
        try:
            return checkpointer.restore_params(abstract_params, step), step
        except CheckpointUnreadable as error:
            if step == steps[0]:
                raise
            warnings.warn(
                f"Checkpoint step {step} of {run_dir} cannot be read ({error.reason}); it is left in place, and "
                f"the step before it is loaded instead.", stacklevel=3,
            )
