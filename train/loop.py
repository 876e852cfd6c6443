"""The training job behind `python -m train`: data, tokenizer, sharded state, the step loop,
evaluation, logging and checkpoints, all in one run directory.

    run_dir/
      config.yaml       the resolved TrainConfig (model fields in full)
      tokenizer.model   the sentencepiece model the run trained or was given, or the tokenizer
                        files (tokenizer.json, tokenizer_config.json) copied from an `init_from` checkpoint
      labels.json       label names (classification, token classification)
      checkpoints/      Orbax steps: params, rest of the train state, data iterator state
      metrics.jsonl     one JSON object per log or evaluation (process 0)
      tensorboard/      the same metrics as TensorBoard events
      loss.png          the loss curves, written at the end
      artefacts.json    what made the tokenizer and the checkpoints (see train.rundir)
      .lock             names the process that trains (which holds a lock on the run directory)
      diverged.json     the step where training diverged, until a start resumes (see TrainingDiverged)
      set_aside/        checkpoint steps moved out of the way (damaged, or after resume_step)

A run directory that already holds checkpoints is resumed from its latest step that restores
cleanly: the data iterator and the per-step RNG continue exactly where the checkpoint left
them, so a run killed and restarted ends with the same parameters as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from train import data as data_lib
from train import metrics as metrics_lib
from train import rundir
from train.config import STACKS, TrainConfig, load_yaml, save_yaml, to_dict
from train.optim import learning_rate_schedule, make_optimizer, nonfinite_counts, updates_applied
from train.step import check_batch_axes, compile_steps, create_state, global_batch, make_mesh
from train.tasks import TASKS, Split, TaskData, init_source, load_splits, prepare_tokenizer, sync, task_data
from transformer import runs
from transformer.architectures import ENCODER, LM, MLM, PRETRAINING
from transformer.checkpoint import CheckpointUnreadable, Checkpointer
from transformer.compile_cache import use_compilation_cache
from transformer.files import read_json_object, write_atomically
from transformer.models import MaskedLM, keep_layers, merge_pretrained
from transformer.pretrained import checkpoint_config, from_pretrained
from transformer.sharding import axis_rules
from transformer.tasks import Task
from transformer.tokenizer import Tokenizer

WENT_BACK = "went_back.json"  # the resume_step a start went back to (see `_goes_back`)
DIVERGED = "diverged.json"  # the step where training diverged (see TrainingDiverged)
LOG_INTERVAL = "log_interval"  # in a checkpoint's data state: the metric sums of the open log interval
# Keys that may change when a run directory is resumed; any other difference is an error.
RESUMABLE_KEYS = frozenset({
    "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "sample_prompt",
    "sample_tokens", "bleu_examples", "bleu_beams", "peak_flops", "distributed", "coordinator_address", "num_processes",
    "process_id", "mesh_data", "mesh_fsdp", "mesh_tensor", "run_dir", "resume_step", "compilation_cache",
    # how a step is computed, not what: runs saved before remat became the default resume
    "model.remat_policy", "model.attention_implementation",
})
# Keys that may also change when resuming a run that diverged (the advice of TrainingDiverged).
AFTER_DIVERGENCE_KEYS = frozenset({"learning_rate", "warmup_steps"})
# Model fields a fine-tuning run chooses itself; the rest of the architecture comes from `init_from`.
FINE_TUNING_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "dtype", "remat_policy", "attention_implementation")


class TrainingDiverged(RuntimeError):
    """Raised when too many steps in a row had non-finite gradients. The run directory records it
    (diverged.json), so that the next start may resume with a lower learning_rate or more
    warmup_steps (AFTER_DIVERGENCE_KEYS)."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or interrupted) run reports."""

    run_dir: pathlib.Path
    step: int
    validation: dict[str, float]  # the last evaluation (empty without validation data)
    sample: str = ""  # causal LM: the last sample; seq2seq: one translation
    stopped_by_signal: int | None = None  # SIGTERM / SIGINT when the run was interrupted
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)  # what a model must beat (train.tasks)


# ----------------------------------------------------------------------------- set-up


def initialize_distributed(config: TrainConfig) -> None:
    """Starts multi-host JAX when configured (or when JAX_COORDINATOR_ADDRESS is set); before any JAX use."""
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (config.distributed or address):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    arguments: dict[str, Any] = {}
    if address:
        arguments["coordinator_address"] = address
    num_processes = config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    process_id = config.process_id if config.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if num_processes:
        arguments["num_processes"] = num_processes
    if process_id >= 0:
        arguments["process_id"] = process_id
    jax.distributed.initialize(**arguments)


def resolve_init_from(config: TrainConfig, resuming: bool = False) -> TrainConfig:
    """Takes the architecture of `init_from` (a pretraining run's config.yaml, or a Hugging Face
    checkpoint's config.json), keeping this run's dropout, dtype, remat and attention
    implementation, so its body loads under the new head. Resuming, the run's own config.yaml
    has it (`init_from` is not read again, and may be gone)."""
    if not config.start_from:
        return config
    source = config.run_path if resuming else init_source(config.start_from)
    if (source / "config.yaml").is_file():
        pretrained, kind = load_yaml(source / "config.yaml").model, "run"
    else:
        pretrained, kind = checkpoint_config(source), "Hugging Face checkpoint"
    stacks = (pretrained.num_encoder_layers > 0, pretrained.num_decoder_layers > 0)
    if stacks not in config.task.layers:
        has, needs = STACKS[stacks], " or ".join(STACKS[layers] for layers in config.task.layers)
        raise ValueError(
            f"{'init_from' if config.init_from else 'teacher'}={config.start_from} is a {kind} with {has}, but "
            f"task={config.task} needs {needs}: "
            + ("distil an encoder (as all-minilm-l6-v2, or a masked-LM run)." if not config.init_from else
               "fine-tune a checkpoint of that kind"
               + (" (an encoder's body, as all-minilm-l6-v2, or a decoder's, as runs/gpt-quick)."
                  if config.task.classifies else "."))
        )
    kept = {key: getattr(config.model, key) for key in FINE_TUNING_MODEL_KEYS}
    if config.teacher and not config.init_from and not resuming:  # a student of some of the teacher's layers
        kept["num_encoder_layers"] = len(student_layers(config, pretrained.num_encoder_layers))
    return dataclasses.replace(config, model=pretrained.replace(**kept))


def student_layers(config: TrainConfig, teacher_layers: int) -> list[int]:
    """The teacher layers a distillation's student starts from: `student_layers` of them (default
    half), every (teacher's / student's)-th from the first, as DistilBERT took every other one."""
    count = config.student_layers or max(1, teacher_layers // 2)
    if count > teacher_layers:
        raise ValueError(f"student_layers={count}, but the teacher {config.teacher} has {teacher_layers} layers: a "
                         f"student starts from some of them; set student_layers <= {teacher_layers}.")
    return [i * teacher_layers // count for i in range(count)]


# The head a Hugging Face checkpoint is opened with for each task; merge_pretrained keeps what fits.
_CHECKPOINT_HEADS = {Task.CLASSIFICATION: ENCODER, Task.PAIR_CLASSIFICATION: ENCODER, Task.TOKEN_CLASSIFICATION: ENCODER,
                     Task.QUESTION_ANSWERING: ENCODER, Task.MASKED_LM: MLM, Task.DISTILLATION: MLM,
                     **{task: LM for task in Task if task.generates}}


@dataclasses.dataclass
class Job:
    """A run set up: its data, model, sharded state and compiled steps."""

    config: TrainConfig
    run_dir: pathlib.Path
    data: TaskData
    tokenizer: Tokenizer
    model: nn.Module
    mesh: jax.sharding.Mesh
    state: Any
    shardings: Any
    train_step: Any
    eval_step: Any
    schedule: optax.Schedule
    batches: Any  # the training batch iterator (checkpointable)


def prepare_data(config: TrainConfig, run_dir: pathlib.Path, resuming: bool) -> tuple[TaskData, Tokenizer, int]:
    """The run's examples as features, its tokenizer and the number of labels, with the run
    directory's records checked (resuming) or written: artefacts, labels.json, config.yaml."""
    is_main = jax.process_index() == 0
    artefacts = rundir.Artefacts(run_dir, writable=is_main)
    train, validation, label_names = load_splits(config)
    training_data = rundir.sha256_json(train)
    tokenizer = prepare_tokenizer(config, run_dir, train, training_data, artefacts, resuming)
    data = {"training_data": training_data, "validation_data": rundir.sha256_json(validation)}
    if resuming:  # the checkpoints continue training, and the log evaluating, on the same data
        artefacts.check("checkpoints", data)
    else:
        artefacts.record("checkpoints", data)
    if is_main:  # after the checks: a start they refuse changes nothing
        save_yaml(config, run_dir / "config.yaml")
        if label_names:
            write_atomically(run_dir / "labels.json", json.dumps(label_names))
    return task_data(config, tokenizer, train, validation, label_names), tokenizer, max(len(label_names), 2)


def set_up(config: TrainConfig, run_dir: pathlib.Path, resuming: bool) -> Job:
    """Data, model, optimizer, the sharded train state and the compiled steps of a run."""
    mesh = make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)  # checked before files are written
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.batch_size // config.accumulation) % data_shards:
        raise ValueError(
            f"The microbatch of {config.batch_size // config.accumulation} examples cannot be split over "
            f"{data_shards} data-parallel devices; make batch_size / accumulation a multiple of {data_shards}."
        )
    check_batch_axes(mesh)
    data, tokenizer, num_labels = prepare_data(config, run_dir, resuming)
    model = config.task.model(config.model, num_labels=num_labels, next_sentence_prediction=config.pair_head,
                              span_boundary_objective=config.span_boundary_objective)
    schedule = learning_rate_schedule(config.schedule, config.learning_rate, config.warmup_steps, config.steps)
    optimizer = make_optimizer(
        schedule, weight_decay=config.weight_decay, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        grad_clip=config.grad_clip or None,
    )
    inputs = config.task.example_inputs(config.seq_length, config.source_length)
    state, shardings = create_state(model, optimizer, inputs, jax.random.PRNGKey(config.seed), mesh,
                                    microbatch=config.batch_size // config.accumulation)
    sampling = optax.linear_schedule(0.0, config.scheduled_sampling, config.steps) if config.scheduled_sampling else None
    objective, frozen = TASKS[config.task].objective, None
    if config.task == Task.DISTILLATION:
        teacher, frozen = load_teacher(config, tokenizer, mesh)
        objective = functools.partial(
            objective, teacher=teacher, temperature=config.distill_temperature, kl_weight=config.distill_kl_weight,
            mlm_weight=config.distill_mlm_weight, cosine_weight=config.distill_cosine_weight,
        )
    train_step, eval_step = compile_steps(
        model, objective, optimizer, mesh, shardings, accumulation=config.accumulation,
        label_smoothing=config.label_smoothing, sampling_probability=sampling, frozen=frozen,
    )
    batches = data_lib.batches(
        data.train.dataset, global_batch_size=config.batch_size, seed=config.seed, random_map=data.train.random_map,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    return Job(config, run_dir, data, tokenizer, model, mesh, state, shardings, train_step, eval_step, schedule, batches)


def load_teacher(config: TrainConfig, tokenizer: Tokenizer, mesh: jax.sharding.Mesh) -> tuple[nn.Module, Any]:
    """A distillation's teacher (`config.teacher`: a run directory or a checkpoint) and its
    parameters laid out on `mesh` by their logical axes (in the run's dtype), once checked against
    the student: an encoder, of the student's width and vocabulary, with a masked-LM head where the
    KL term reads one."""
    source = init_source(config.teacher)
    head = MLM if config.distill_kl_weight else ENCODER
    if (source / "config.yaml").is_file():
        run = runs.load_run(source)
        model, params, vocabulary = run.model, nn.meta.unbox(run.params), run.tokenizer
        headless = () if head == ENCODER or isinstance(model, MaskedLM) else (f"its {run.task} head",)
    else:
        opened = from_pretrained(source, head, dtype=config.model.dtype, scan_layers=config.model.scan_layers,
                                 max_length=config.model.max_length)
        model, params, vocabulary, headless = opened.model, opened.params, opened.tokenizer, opened.fresh
    student = config.model
    if not model.config.num_encoder_layers or model.config.num_decoder_layers:
        raise ValueError(f"teacher={config.teacher} is not an encoder-only model: distillation trains a smaller encoder "
                         "on an encoder's masked-LM outputs and hidden states.")
    if headless:
        raise ValueError(f"teacher={config.teacher} has no masked-LM head (it would be {', '.join(headless)}), so "
                         "the KL term has no distribution to learn from: set distill_kl_weight=0 to distil its "
                         "hidden states (distill_cosine_weight) and train the student's head on the text "
                         "(distill_mlm_weight).")
    if model.config.d_model != student.d_model:
        raise ValueError(f"teacher={config.teacher} has d_model={model.config.d_model}, the student "
                         f"{student.d_model}: the cosine term compares their hidden states; give the student the "
                         "teacher's width.")
    _check_vocabulary(config, vocabulary, model.config.vocab_size, tokenizer)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *Task.MASKED_LM.example_inputs())["params"])
    rules = axis_rules(model.config.num_kv_heads, mesh.shape["tensor"])
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    return model, jax.device_put(params, shardings)


def _check_vocabulary(config: TrainConfig, teacher: Tokenizer | None, teacher_rows: int, student: Tokenizer) -> None:
    """An error where the teacher's tokens are not the student's: as many embedding rows, and the
    same piece at every id."""
    differing = None  # the first id whose piece differs; None where the vocabularies cannot be compared
    if teacher is not None and teacher.vocab_size == student.vocab_size:
        differing = next((i for i in range(student.vocab_size) if teacher.id_to_token(i) != student.id_to_token(i)), -1)
    if differing == -1 and teacher_rows == config.model.vocab_size:
        return
    if differing is not None and differing >= 0:
        where = (f"id {differing} is {teacher.id_to_token(differing)!r} to the teacher, "
                 f"{student.id_to_token(differing)!r} to the student")
    else:
        where = (f"the teacher has {teacher.vocab_size if teacher else 'no'} pieces and {teacher_rows} embedding rows, "
                 f"the student {student.vocab_size} pieces and {config.model.vocab_size} rows")
    raise ValueError(
        f"teacher={config.teacher} reads another vocabulary than the student ({config.init_from or 'the run'}'s "
        f"tokenizer): {where}. Distillation compares the two models token by token; leave init_from out (the "
        "student then starts from the teacher's layers and tokenizer) or give a student with the teacher's tokenizer."
    )


def load_pretrained(job: Job, say) -> Any:
    """The train state with the body of `init_from` (a run's latest parameters, or a Hugging Face
    checkpoint's) under this run's (new) head; a distillation's student without `init_from`: some
    of the teacher's layers (`student_layers`)."""
    config = job.config
    source = init_source(config.start_from)
    opened_fresh: tuple[str, ...] = ()  # a checkpoint's head parameters that from_pretrained initialised
    if (source / "config.yaml").is_file():
        run = runs.load_run(source)
        pretrained, depth = run.params, run.model.config.num_encoder_layers
    else:
        decoder_only = not config.model.num_encoder_layers  # (a classifier's body is then its LM's, as GPT's)
        head = PRETRAINING if config.pair_head else LM if decoder_only else _CHECKPOINT_HEADS[config.task]
        opened = from_pretrained(
            source, head, scan_layers=config.model.scan_layers, max_length=config.model.max_length, seed=config.seed,
        )
        pretrained, opened_fresh, depth = opened.params, opened.fresh, opened.model.config.num_encoder_layers
    if config.teacher and not config.init_from:
        layers = student_layers(config, depth)
        pretrained = keep_layers(pretrained, layers)
        say(f"The student starts from the teacher's layers {', '.join(map(str, layers))} (of {depth}).")
    merged, fresh = merge_pretrained(job.state.params, pretrained)
    fresh = sorted({*fresh, *opened_fresh})
    boxed = jax.tree.map(
        lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
        job.state.params, merged, is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    say(f"Loaded the pretrained body of {source}; newly initialised: {', '.join(fresh) or 'nothing'}.")
    return job.state.replace(params=jax.device_put(boxed, job.shardings.params))


# ----------------------------------------------------------------------------- evaluation


def validation_batches(split: Split, config: TrainConfig):
    """This process's part of the batches an evaluation reads: `eval_batches` of them (0: all) of
    one seeded shuffle of the split, the same at every evaluation. A few batches are then a sample
    of the whole split, not its first examples (rt-polarity's are all of one label)."""
    batches = data_lib.batches(
        split.dataset, global_batch_size=config.batch_size, seed=config.seed + 1, num_epochs=1,
        random_map=split.random_map, process_index=jax.process_index(), process_count=jax.process_count(),
    )
    return itertools.islice(batches, config.eval_batches or None)


def validation_coverage(split: Split, config: TrainConfig) -> str:
    """How much of the split `validation_batches` reads, e.g. "320 of 1,057 examples"."""
    total = len(split.dataset)
    read = min(total, config.eval_batches * config.batch_size) if config.eval_batches else total
    return f"all {total:,} examples" if read == total else f"{read:,} of {total:,} examples"


def evaluate(job: Job, params) -> tuple[dict[str, float], str]:
    """Validation metrics (over `validation_batches`), plus what the task generates (a sample,
    translations and their BLEU) on one process's devices."""
    config, task = job.config, TASKS[job.config.task]
    if job.data.validation is None:
        return {}, ""
    sums = None
    for batch in validation_batches(job.data.validation, config):
        sums = metrics_lib.add(sums, job.eval_step(params, global_batch(batch, job.mesh)))
    result = metrics_lib.summarize(metrics_lib.to_host(sums), token_level=task.token_level)
    if job.data.validation.rows is not None:  # a language model: also per character of text
        result["nats_per_char"] = result["loss"] * job.data.validation.rows.tokens_per_character
    text = ""
    if task.generation is not None and jax.process_count() == 1:  # generation runs on one process's devices
        generated, text = task.generation(config, job.model, params, job.tokenizer, job.data)
        result.update(generated)
    return result, text


def report(job: Job, say, log: metrics_lib.MetricsLog, step: int, validation: dict, sample: str) -> None:
    if not validation:
        return
    log.write(step, "validation", {**validation, **({"sample": sample} if sample else {})})
    say(f"step {step} validation ({validation_coverage(job.data.validation, job.config)}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in validation.items()))
    if sample:
        say(f"generated: {sample}")


# ----------------------------------------------------------------------------- the loop


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step; a second SIGINT ends
    the process at once, with one line (a SIGKILL's outcome: the run resumes from its last
    checkpoint). Handlers are only installed from the main thread."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            print("Interrupted twice: stopped at once, without saving. Run the same command again to resume from "
                  "the last checkpoint.", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> int | None:
        """The signal, once every process knows of it (processes may receive it at different steps)."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        return int(np.max(flags)) or None


class Logger:
    """The training log of a run: one record per log interval, read one step late
    (`metrics_lib.IntervalMetrics`), written to the metrics log and the progress bar, with the
    non-finite gradient guard."""

    def __init__(self, job: Job, log: metrics_lib.MetricsLog, bar: tqdm):
        self.job, self.log, self.bar = job, log, bar
        config = job.config
        self.step_flops = metrics_lib.flops_per_step(config)
        self.step_tokens = metrics_lib.tokens_per_step(config)
        self.peak = metrics_lib.peak_flops_per_device(config)
        self.interval = metrics_lib.IntervalMetrics()

    def write_ready(self) -> None:
        """Writes the interval closed at an earlier step, if any (waits for that step only)."""
        closed = self.interval.read()
        if closed is None:
            return
        step, sums, counts, steps, elapsed = closed
        config = self.job.config
        if counts["consecutive"] >= config.max_nonfinite_steps:
            if jax.process_index() == 0:
                write_atomically(self.job.run_dir / DIVERGED, json.dumps({"step": step}))
            raise TrainingDiverged(
                f"Step {step}: the last {counts['consecutive']} steps had non-finite gradients ({counts['total']} "
                f"in all) and were skipped; stopping. The checkpoints in {self.job.run_dir / 'checkpoints'} hold the "
                "last good state: run again with a lower learning_rate or more warmup_steps to resume from it (after "
                "a divergence those two may change), or, if the data is at fault, fix it and start a new run_dir."
            )
        values = self._averages(sums)
        values["learning_rate"] = float(self.job.schedule(counts["applied"] - 1))  # of the last update applied
        if steps:  # not an interval of the first (compiling) step alone
            values["steps_per_second"] = steps / elapsed
            values["examples_per_second"] = steps * config.batch_size / elapsed
            values["tokens_per_second"] = steps * self.step_tokens / elapsed
            if self.peak:
                values["mfu"] = steps * self.step_flops / elapsed / (self.peak * jax.device_count())
        values["nonfinite_steps"] = counts["total"]
        self.log.write(step, "train", values)
        postfix = {"loss": f"{values['loss']:.3f}"}
        if steps:
            postfix["tok/s"] = f"{values['tokens_per_second']:,.0f}"
        if steps and self.peak:
            postfix["mfu"] = f"{values['mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)

    def _averages(self, sums: dict[str, float]) -> dict[str, float]:
        """The interval's metrics over the steps applied (NaN where every step was skipped)."""
        if not sums["finite_steps"]:
            return {"loss": math.nan, "grad_norm": math.nan}
        values = metrics_lib.summarize(sums, token_level=TASKS[self.job.config.task].token_level)
        return values | {"grad_norm": sums["grad_norm"] / sums["finite_steps"]}

    def open_interval(self) -> dict[str, float] | None:
        """The metric sums of the steps since the last log step, saved with a checkpoint so that a
        run resumed from it logs that interval whole (None when it is empty)."""
        sums = self.interval.open_sums()
        return None if sums is None else metrics_lib.to_host(sums)

    def resume_interval(self, sums: dict[str, float] | None) -> None:
        """Starts with the steps of a saved open interval (`open_interval`) before the steps to come."""
        if sums is not None:
            self.interval.add({name: np.float32(value) for name, value in sums.items()})

    def after_step(self, step: int, metrics, state, *, first: bool) -> None:
        """Adds a step's metrics; at a log step, closes the interval (read at the next step)."""
        self.interval.add(metrics)
        if first:  # the first step compiles: time from its end
            jax.block_until_ready(metrics)
            self.interval.restart()
        if step % self.job.config.log_every == 0 or step == self.job.config.steps:
            consecutive, total = nonfinite_counts(state.opt_state)
            counts = {"consecutive": consecutive, "total": total, "applied": updates_applied(state.opt_state)}
            # copied: the next step donates the state
            self.interval.end_interval(step, jax.tree.map(lambda x: jnp.array(x, copy=True), counts))


def train_loop(job: Job, checkpointer: Checkpointer, log: metrics_lib.MetricsLog, say, progress: bool,
               open_interval: dict[str, float] | None = None) -> RunResult:
    """Steps until `config.steps`, each followed by its periodic actions: write the last log
    interval, evaluate, save a checkpoint, stop on a signal. Then a last evaluation and save,
    which a signal does not interrupt. `open_interval`: the log interval a resumed checkpoint
    saved open (`Logger.open_interval`)."""
    config, state = job.config, job.state
    step = first_step = int(state.step)
    base_key = jax.random.PRNGKey(config.seed)  # step s trains with fold_in(base_key, s)
    start_time = time.time()
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and jax.process_index() == 0),
               dynamic_ncols=True, desc="train")
    logger = Logger(job, log, bar)
    logger.resume_interval(open_interval)

    def save(step: int) -> None:
        checkpointer.save(step, state, {**job.batches.get_state(), LOG_INTERVAL: logger.open_interval()}, force=True)

    validation, sample = {}, ""
    try:
        with StopSignals() as signals:
            while step < config.steps:
                batch = global_batch(next(job.batches), job.mesh)
                state, metrics = job.train_step(state, batch, jax.random.fold_in(base_key, step))
                logger.write_ready()  # the interval closed at the previous step, now that this one is queued
                step += 1
                bar.update(1)
                logger.after_step(step, metrics, state, first=step == first_step + 1)
                evaluating = step % config.eval_every == 0 and step < config.steps
                saving = step % config.checkpoint_every == 0 and step < config.steps
                if evaluating or saving:  # this step's record first: a diverged state is neither
                    logger.write_ready()  # evaluated nor saved, and no saved step lacks its record
                if evaluating:
                    with logger.interval.paused(state):
                        validation, sample = evaluate(job, state.params)
                        report(job, say, log, step, validation, sample)
                if saving:
                    save(step)
                stopped = signals.agreed() if jax.process_count() == 1 or step % config.log_every == 0 else None
                if stopped and step < config.steps:  # at the last step: finish (evaluate, save) instead
                    logger.write_ready()
                    save(step)
                    checkpointer.wait()
                    bar.close()
                    say(f"Stopped by {signal.Signals(stopped).name} at step {step}; saved {job.run_dir / 'checkpoints'}. "
                        "Run the same command again to resume.")
                    return RunResult(job.run_dir, step, validation, sample, stopped, job.data.baselines)
            logger.write_ready()  # the last steps are trained: a signal from here on waits for the files
            bar.close()
            validation, sample = evaluate(job, state.params)
            report(job, say, log, step, validation, sample)
            if checkpointer.latest_step() != step:
                save(step)
            checkpointer.wait()
            if jax.process_index() == 0 and log.path.exists():
                metrics_lib.plot_losses(log.path, job.run_dir / "loss.png")
        say(f"Done: {step} steps in {time.time() - start_time:.0f} s; run directory {job.run_dir}.")
        return RunResult(job.run_dir, step, validation, sample, baselines=job.data.baselines)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- the run


def run(config: TrainConfig, *, progress: bool = True) -> RunResult:
    """Trains (or resumes) the run described by `config`; returns the last evaluation.

    The run directory is locked while the run trains: a second process on it is refused
    (RunDirectoryBusy). A start refused before it writes anything leaves no run directory
    behind, and a finished run is not trained again. Unless JAX already has one, this
    process's persistent compilation cache becomes `config.compilation_cache` (a `jax.config`
    setting, which stays after the call).
    """
    initialize_distributed(config)
    use_compilation_cache(config.compilation_cache)
    run_dir = config.run_path
    config = resolve_init_from(config, resuming=_has_checkpoints(run_dir))  # before anything is written
    say = tqdm.write if jax.process_index() == 0 else (lambda *_: None)
    lock = rundir.RunLock(run_dir)
    if jax.process_index() == 0:
        _open_run_dir(run_dir, lock, say)
    try:
        sync("run_dir")
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints, step_option="resume_step=N")
        try:
            return _train(config, run_dir, checkpointer, say, progress)
        finally:
            checkpointer.close()  # raises a failed save (again, if a save raised it)
    finally:
        lock.release()  # removes the run directory if this start made it and wrote nothing


def _train(config: TrainConfig, run_dir: pathlib.Path, checkpointer: Checkpointer, say, progress: bool) -> RunResult:
    saved_steps = checkpointer.all_steps()
    resuming = bool(saved_steps)
    if resuming:
        start = _resume_step(config, run_dir, saved_steps)
        if start == config.steps and not _goes_back(config, run_dir, saved_steps):
            return _finished(config, run_dir, say)
    elif config.resume_step:
        raise ValueError(f"resume_step={config.resume_step}, but {run_dir} has no checkpoint yet.")
    job = set_up(config, run_dir, resuming)
    if jax.process_index() == 0:  # a divergence allows changes to the next start only (its checks are done)
        (run_dir / DIVERGED).unlink(missing_ok=True)
    open_interval = None
    if resuming:
        job.state, data_state = _resume(config, checkpointer, job.state, run_dir, say)
        open_interval = data_state.pop(LOG_INTERVAL, None)  # none in checkpoints of older code
        job.batches.set_state(data_state)
        say(f"Resumed {run_dir} at step {int(job.state.step)}.")
    elif config.start_from:
        job.state = load_pretrained(job, say)
    log = metrics_lib.MetricsLog(run_dir, resume_step=int(job.state.step) if resuming else -1, say=say)
    try:
        if not resuming:
            _introduce(job, log, say)
        return train_loop(job, checkpointer, log, say, progress, open_interval)
    finally:
        log.close()


def _introduce(job: Job, log: metrics_lib.MetricsLog, say) -> None:
    """The first lines of a fresh run: what it trains, and the baselines it must beat."""
    num_params = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(job.state.params)))
    say(f"{job.run_dir}: {job.config.task} with {num_params:,} parameters on {job.mesh.devices.size} device(s) "
        f"(mesh {dict(job.mesh.shape)}), {len(job.data.train.dataset):,} training examples.")
    if job.data.baselines:
        log.write(0, "baseline", job.data.baselines)
        say("Baselines to beat: " + ", ".join(f"{name} {value:.4g}" for name, value in job.data.baselines.items()))


def _resume_step(config: TrainConfig, run_dir: pathlib.Path, saved_steps: list[int]) -> int:
    """The checkpoint a run directory resumes from, after checking the config may resume it."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has checkpoints but no config.yaml; it is not a run directory.")
    _check_resumable(config, run_dir)
    start = config.resume_step if _goes_back(config, run_dir, saved_steps) else saved_steps[-1]
    if start not in saved_steps:
        raise ValueError(f"resume_step={start}: no such checkpoint in {run_dir / 'checkpoints'}; saved steps: {saved_steps}.")
    if start > config.steps:
        raise ValueError(
            f"steps={config.steps} is below step {start}, which {run_dir} has already trained; raise steps, "
            f"pass resume_step=N to go back to an earlier checkpoint, or choose a new run_dir."
        )
    return start


def _goes_back(config: TrainConfig, run_dir: pathlib.Path, saved_steps: list[int]) -> bool:
    """Whether this start goes back to `resume_step`: once. The steps saved after a start went
    back to it (recorded in went_back.json) are resumed from, so that the same command, run again
    after a stop or a preemption, goes on."""
    if not config.resume_step:
        return False
    went_back = read_json_object(run_dir / WENT_BACK).get("resume_step") == config.resume_step
    return not (went_back and saved_steps[-1] > config.resume_step)


def _resume(config: TrainConfig, checkpointer: Checkpointer, state, run_dir: pathlib.Path, say):
    """(state, data state) to resume from: `resume_step`'s checkpoint the first time a run goes back
    to it (read before the newer steps are set aside, so that nothing moves if it cannot be read),
    else the newest that restores cleanly."""
    saved_steps = checkpointer.all_steps()
    if not _goes_back(config, run_dir, saved_steps):
        if config.resume_step:
            say(f"resume_step={config.resume_step}: an earlier start went back to it; resuming from the steps "
                f"trained since (delete {run_dir / WENT_BACK} to go back to it again).")
        return _restore(checkpointer, state, run_dir, fall_back=True, say=say)
    restored = checkpointer.restore(state, step=config.resume_step)
    for newer in (s for s in saved_steps if s > config.resume_step):
        say(f"resume_step={config.resume_step}: moved the newer step {newer} to "
            f"{_set_aside(checkpointer, run_dir, newer, 'after-resume-step')}.")
    if jax.process_index() == 0:
        write_atomically(run_dir / WENT_BACK, json.dumps({"resume_step": config.resume_step}))
    return restored


def _has_checkpoints(run_dir: pathlib.Path) -> bool:
    """Whether a run directory holds a started run: its config and a saved step."""
    checkpoints = run_dir / "checkpoints"
    return (run_dir / "config.yaml").is_file() and checkpoints.is_dir() and any(
        path.name.isdigit() for path in checkpoints.iterdir())


def _flat(config: TrainConfig) -> dict[str, Any]:
    """The config's values, the model's fields as model.FIELD."""
    values = to_dict(config)
    model = values.pop("model")
    return {**values, **{f"model.{key}": value for key, value in model.items()}}


def _check_resumable(config: TrainConfig, run_dir: pathlib.Path) -> None:
    """Raises naming the fields (model fields one by one) that differ from the saved run's and may
    not: RESUMABLE_KEYS may, and AFTER_DIVERGENCE_KEYS too when the run diverged."""
    saved = _flat(load_yaml(run_dir / "config.yaml"))
    wanted = _flat(config)
    resumable = RESUMABLE_KEYS | (AFTER_DIVERGENCE_KEYS if (run_dir / DIVERGED).is_file() else frozenset())
    changed = [key for key in wanted if key not in resumable and saved.get(key) != wanted[key]]
    if changed:
        details = "; ".join(f"{key}: saved {saved.get(key)!r}, now {wanted[key]!r}" for key in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ValueError(
            f"{run_dir} holds checkpoints of a run with a different configuration ({details}{more}). Resume it "
            f"with the saved values (see {run_dir / 'config.yaml'}) or choose a new run_dir."
        )


def _open_run_dir(run_dir: pathlib.Path, lock: rundir.RunLock, say) -> None:
    """Creates the run directory and takes its lock (process 0), with one clear line for what stops it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={run_dir} is a file, not a directory; choose another run_dir.")
    try:
        previous = lock.acquire()  # creates the run directory
    except OSError as error:  # read-only, no permission, a file on the way
        raise ValueError(
            f"run_dir={run_dir} is not writable ({error.strerror}: {error.filename}); choose a directory you can write to."
        ) from None
    if previous:
        say(f"{run_dir}: the previous run ({previous}) did not exit cleanly; its lock was stale and is taken over.")


def _finished(config: TrainConfig, run_dir: pathlib.Path, say) -> RunResult:
    """The result of a run that already trained `config.steps` steps, from its log; nothing changes on disk."""
    records, _ = rundir.read_metrics(run_dir / "metrics.jsonl")
    validation = next((r for r in reversed(records) if r["split"] == "validation"), {})
    baselines = next((r for r in records if r["split"] == "baseline"), {})
    values = lambda record: {k: v for k, v in record.items() if k not in ("step", "split", "sample")}
    say(f"{run_dir} has finished its {config.steps} steps; nothing to do (raise steps to train further).")
    return RunResult(run_dir, config.steps, values(validation), validation.get("sample", ""), baselines=values(baselines))


def _set_aside(checkpointer: Checkpointer, run_dir: pathlib.Path, step: int, reason: str) -> pathlib.Path:
    """Moves a checkpoint step out of the way, into run_dir/set_aside/ (never deletes it)."""
    destination = run_dir / "set_aside" / f"step-{step}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpointer.set_aside(step, destination)
    return destination


def _restore(checkpointer: Checkpointer, state, run_dir: pathlib.Path, *, fall_back: bool, say):
    """(state, data state) of the newest checkpoint that restores cleanly.

    With `fall_back`, a damaged step (unreadable, or its files differ from their checksums) is
    set aside and the next older one tried, saying so; without, its error is raised.
    """
    while True:
        try:
            return checkpointer.restore(state)
        except CheckpointUnreadable as error:
            if not fall_back or len(checkpointer.all_steps()) < 2:
                raise
            destination = _set_aside(checkpointer, run_dir, error.step, "damaged")
            say(f"Checkpoint step {error.step} cannot be read ({error.reason}); moved it to {destination} and "
                f"falling back to step {checkpointer.latest_step()}.")


