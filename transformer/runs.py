"""A training run's directory as a model: its task, architecture, tokenizer and parameters.

    run_dir/
      config.yaml       `task`, the `model` fields and the training keys (`python -m train`)
      tokenizer.model   the sentencepiece model the run trained or was given, or a checkpoint's
                        tokenizer files (tokenizer.json, tokenizer_config.json...): `Tokenizer.load(run_dir)`
      labels.json       label names (classification)
      checkpoints/      Orbax steps (see transformer.checkpoint)

The sampler, fine-tuning from a pretrained run and the training job all open runs here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import yaml

from transformer.checkpoint import Checkpointer
from transformer.config import ModelConfig
from transformer.tasks import Task
from transformer.tokenizer import Tokenizer


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
        next_sentence_prediction=bool(values.get("next_sentence_prediction", False)),
    )
    return task, model


def load_run(run_dir: str | os.PathLike, *, step: int | None = None) -> Run:
    """The model, parameters (latest checkpoint, or `step`) and tokenizer of a training run,
    on this process's first device, whatever mesh the run trained on."""
    run_dir = pathlib.Path(run_dir)
    task, model = run_model(run_dir)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *task.example_inputs()))["params"]
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        step = checkpointer.latest_step() if step is None else step
        params = checkpointer.restore_params(abstract, step)
    finally:
        checkpointer.close()
    return Run(run_dir, task, model, params, Tokenizer.load(run_dir), step)
