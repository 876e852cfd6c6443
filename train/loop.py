"""The training job behind `python -m train`: data, tokenizer, sharded state, the step loop,
evaluation, logging and checkpoints, all in one run directory.

    run_dir/
      config.yaml       the resolved TrainConfig (model fields in full)
      tokenizer.model   the sentencepiece model the run trained or was given
      labels.json       label names (classification)
      checkpoints/      Orbax steps: params, rest of the train state, data iterator state
      metrics.jsonl     one JSON object per log or evaluation (process 0)
      tensorboard/      the same metrics as TensorBoard events
      loss.png          the loss curves, written at the end
      artefacts.json    what made the tokenizer and the checkpoints (see train.rundir)
      .lock             held by the process that trains
      set_aside/        checkpoint steps moved out of the way (damaged, or after resume_step)

A run directory that already holds checkpoints is resumed from its latest step that restores
cleanly: the data iterator and the per-step RNG continue exactly where the checkpoint left
them, so a run killed and restarted ends with the same parameters as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from train import data as data_lib
from train import datasets, rundir
from train.checkpoint import CheckpointUnreadable, Checkpointer
from train.config import FileFormat, TrainConfig, load_yaml, save_yaml, to_dict
from train.objectives import OBJECTIVES, Task
from train.optim import learning_rate_schedule, make_optimizer, nonfinite_counts
from train.step import compile_steps, create_state, global_batch, make_mesh
from transformer.models import CausalLM, MaskedLM, Seq2SeqLM, SequenceClassifier, merge_pretrained
from transformer.sample import Sampler
from transformer.sampling import generate
from transformer.tokenizer import Tokenizer

# Keys that may change when a run directory is resumed; any other difference is an error.
RESUMABLE_KEYS = frozenset({
    "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "sample_prompt",
    "sample_tokens", "bleu_examples", "peak_flops", "distributed", "coordinator_address", "num_processes",
    "process_id", "mesh_data", "mesh_fsdp", "mesh_tensor", "run_dir", "resume_step",
})
# Model fields a fine-tuning run chooses itself; the rest of the architecture comes from `init_from`.
FINE_TUNING_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "dtype", "remat_policy", "attention_implementation")

# Dense bfloat16 peak FLOP/s per device, matched against `jax.Device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}

_DATASET_TASKS = {
    Task.CAUSAL_LM: "lm", Task.MASKED_LM: "lm", Task.CLASSIFICATION: "classification", Task.SEQ2SEQ: "translation",
}
_FILE_FIELDS = {"lm": ("text",), "classification": ("text", "label"), "translation": ("source", "target")}


class TrainingDiverged(RuntimeError):
    """Raised when too many steps in a row had non-finite gradients."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or interrupted) run reports."""

    run_dir: pathlib.Path
    step: int
    validation: dict[str, float]  # the last evaluation (empty without validation data)
    sample: str = ""  # causal LM: the last sample; seq2seq: one translation
    stopped_by_signal: int | None = None  # SIGTERM / SIGINT when the run was interrupted
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)  # what a model must beat (see TaskData)


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


def resolve_init_from(config: TrainConfig) -> TrainConfig:
    """Takes the architecture of the pretrained run in `init_from` (keeping this run's dropout,
    dtype, remat and attention implementation), so its body loads under the new head."""
    if not config.init_from:
        return config
    source = pathlib.Path(config.init_from)
    if not (source / "config.yaml").is_file():
        raise FileNotFoundError(
            f"init_from={source}: no config.yaml there. Point init_from at the run directory of a finished "
            f"pretraining run (e.g. train bert-tiny-mlm first: python -m train bert-tiny-mlm)."
        )
    pretrained = load_yaml(source / "config.yaml").model
    kept = {key: getattr(config.model, key) for key in FINE_TUNING_MODEL_KEYS}
    return dataclasses.replace(config, model=pretrained.replace(**kept))


def load_examples(config: TrainConfig, split: str) -> list[dict]:
    """The examples of one split, from the named data set or the configured files."""
    kind = _DATASET_TASKS[config.task]
    if config.train_files:
        files = config.train_files if split == "train" else config.validation_files
        if config.file_format == FileFormat.TEXT and kind == "lm":
            return data_lib.read_text(files)
        if config.file_format == FileFormat.LINES and kind == "lm":
            return data_lib.read_text(files, one_document_per_line=True)
        if config.file_format == FileFormat.JSONL:
            return data_lib.read_jsonl(files, _FILE_FIELDS[kind])
        if config.file_format == FileFormat.TSV and kind != "lm":
            return data_lib.read_tsv(files, _FILE_FIELDS[kind])
        raise ValueError(
            f"file_format={config.file_format} cannot hold {kind} data for task={config.task}: use text, lines or "
            "jsonl for language modelling, tsv or jsonl for classification and translation."
        )
    spec = datasets.DATASETS.get(config.dataset)
    if spec is not None and spec.task != kind:
        raise ValueError(
            f"Data set {config.dataset!r} holds {spec.task} data, but task={config.task} needs {kind} data; "
            f"pick one of: {', '.join(n for n, s in datasets.DATASETS.items() if s.task == kind)}."
        )
    return datasets.load_dataset(config.dataset, split)


def _tokenizer_texts(examples: list[dict]) -> list[str]:
    return [e[key] for e in examples for key in ("text", "source", "target") if key in e]


def _tokenizer_origin(config: TrainConfig, training_data: str) -> dict[str, Any]:
    """What the run's tokenizer is made from: a copied file's digest, or the training data's
    digest (`rundir.sha256_json` of the examples) and the settings."""
    source = _tokenizer_source(config)
    if source is not None:
        Tokenizer.load(source)  # a clear error when it is missing or not a sentencepiece model
        return {"copied_from": rundir.sha256_file(source)}
    return {
        "trained_on": training_data, "vocab_size": config.model.vocab_size,
        "model_type": config.tokenizer_model_type, "seed": config.seed,
    }


def _tokenizer_source(config: TrainConfig) -> pathlib.Path | None:
    if config.init_from:
        return pathlib.Path(config.init_from) / "tokenizer.model"
    return pathlib.Path(config.tokenizer) if config.tokenizer else None


def prepare_tokenizer(
    config: TrainConfig, run_dir: pathlib.Path, train_examples: list[dict], training_data: str,
    artefacts: rundir.Artefacts,
) -> Tokenizer:
    """The run's tokenizer: already in the run directory (made from the same origin), copied from
    `init_from` or `tokenizer`, or trained on the training texts with model.vocab_size pieces.

    Process 0 makes it in a temporary folder and records its origin before moving it into
    place, so a run killed half-way leaves no tokenizer, and one made from other data or
    settings is refused rather than reused.
    """
    path = run_dir / "tokenizer.model"
    origin = _tokenizer_origin(config, training_data)
    if not artefacts.check(path.name, origin) and jax.process_index() == 0:
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            made = pathlib.Path(tmp) / path.name
            source = _tokenizer_source(config)
            if source is not None:
                shutil.copyfile(source, made)
            else:
                corpus = pathlib.Path(tmp) / "corpus.txt"
                corpus.write_text("\n".join(_tokenizer_texts(train_examples)), encoding="utf-8")
                Tokenizer.train(
                    [corpus], config.model.vocab_size, model_prefix=made.with_suffix(""),
                    model_type=config.tokenizer_model_type, seed=config.seed,
                )
                made.with_suffix(".vocab").replace(path.with_suffix(".vocab"))
            artefacts.record(path.name, origin)
            made.replace(path)
    _sync("tokenizer")
    tokenizer = Tokenizer.load(path)
    tokenizer.check_compatible(config.model)
    return tokenizer


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class TaskData:
    """Features of the training and validation splits, ready for `train.data.batches`."""

    train: grain.MapDataset
    validation: grain.MapDataset | None
    train_map: Any  # masked LM: fn(index, rng) -> features, masking drawn per example and epoch
    validation_map: Any
    validation_examples: list[dict]
    label_names: list[str]
    # The bar a trained model must clear on the validation split: unigram_loss (causal LM: the loss
    # of context-free token frequencies), majority_accuracy (classification: the best constant
    # answer), copy_bleu (seq2seq: the source copied as its translation).
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)


def task_data(config: TrainConfig, tokenizer: Tokenizer, train_examples, validation_examples, label_names) -> TaskData:
    """Turns raw examples into the task's fixed-shape features."""

    packed = {}  # causal LM rows of each split, for the unigram baseline

    def features(examples, split):
        if not examples:
            return None, None
        if config.task == Task.CAUSAL_LM:
            packed[split] = data_lib.PackedLM(examples, tokenizer, config.seq_length)
            return grain.MapDataset.source(packed[split]), None
        if config.task == Task.MASKED_LM:
            mlm = data_lib.MaskedLMExamples(
                examples, tokenizer, config.seq_length, next_sentence=config.next_sentence_prediction
            )
            return grain.MapDataset.range(len(mlm)), lambda index, rng: mlm.example(int(index), rng)
        if config.task == Task.SEQ2SEQ:
            return grain.MapDataset.source(examples).map(
                lambda e: data_lib.seq2seq_features(e, tokenizer, config.source_length, config.seq_length)
            ), None
        return grain.MapDataset.source(examples).map(
            lambda e: data_lib.classification_features(e, tokenizer, config.seq_length)
        ), None

    train, train_map = features(train_examples, "train")
    validation, validation_map = features(validation_examples, "validation")
    baselines = {}
    if len(packed) == 2:
        baselines["unigram_loss"] = unigram_loss(packed["train"], packed["validation"], tokenizer.vocab_size)
    if validation_examples and config.task == Task.CLASSIFICATION:
        baselines["majority_accuracy"] = majority_accuracy(validation_examples)
    if validation_examples and config.task == Task.SEQ2SEQ and config.bleu_examples:
        baselines["copy_bleu"] = copy_bleu(validation_examples[: config.bleu_examples])
    return TaskData(
        train=train, validation=validation, train_map=train_map, validation_map=validation_map,
        validation_examples=validation_examples, label_names=label_names, baselines=baselines,
    )


def unigram_loss(train: data_lib.PackedLM, validation: data_lib.PackedLM, vocab_size: int) -> float:
    """Cross-entropy of the validation tokens under the training tokens' frequencies (add-one
    smoothed): the loss of a model that ignores context, the bar a language model must clear."""
    counts = np.bincount(train.stream, minlength=vocab_size) + 1.0
    return float(-np.log(counts / counts.sum())[validation.stream[1:]].mean())


def majority_accuracy(validation: list[dict]) -> float:
    """The validation accuracy of the best constant answer: the share of the most common label."""
    return float(np.bincount([e["label"] for e in validation]).max() / len(validation))


def copy_bleu(examples: list[dict]) -> float:
    """Corpus BLEU (sacrebleu) of each source copied as its own translation."""
    import sacrebleu

    return sacrebleu.corpus_bleu([e["source"] for e in examples], [[e["target"] for e in examples]]).score


def build_model(config: TrainConfig, num_labels: int = 2) -> nn.Module:
    """The task model for a config."""
    if config.task == Task.CAUSAL_LM:
        return CausalLM(config.model)
    if config.task == Task.MASKED_LM:
        return MaskedLM(config.model, next_sentence_prediction=config.next_sentence_prediction)
    if config.task == Task.SEQ2SEQ:
        return Seq2SeqLM(config.model)
    return SequenceClassifier(config.model, num_labels=num_labels)


def init_inputs(config: TrainConfig) -> tuple:
    """Dummy positional inputs for `model.init` (one row)."""
    tokens = np.ones((1, config.seq_length), np.int32)
    if config.task == Task.SEQ2SEQ:
        return (np.ones((1, config.source_length), np.int32), tokens)
    return (tokens,)


# ----------------------------------------------------------------------------- metrics


def summarize(sums: dict[str, float], task: Task) -> dict[str, float]:
    """Metric sums -> means: loss per weighted token (or example), perplexity, accuracy, NSP."""
    weight = max(sums["weight"], 1e-9)
    out = {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight}
    if task != Task.CLASSIFICATION:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    if "nsp_weight" in sums:
        nsp_weight = max(sums["nsp_weight"], 1e-9)
        out["nsp_loss"] = sums["nsp_loss"] / nsp_weight
        out["nsp_accuracy"] = sums["nsp_correct"] / nsp_weight
    return out


def _add(sums, metrics):
    return metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)


def flops_per_step(config: TrainConfig, num_params: int) -> float:
    """Training FLOPs of one step: 6 per parameter per token (forward and backward) plus the
    attention scores and values, 12 * layers * length * width per token (PaLM, appendix B)."""
    m = config.model
    width = m.num_heads * m.dim_per_head
    source, target = config.source_length, config.seq_length
    if config.task == Task.SEQ2SEQ:
        tokens = source + target
        attention = 12 * width * (m.num_encoder_layers * source**2 + m.num_decoder_layers * (target**2 + target * source))
    else:
        tokens = target
        attention = 12 * width * (m.num_encoder_layers + m.num_decoder_layers) * target**2
    return config.batch_size * (6 * num_params * tokens + attention)


def peak_flops_per_device(config: TrainConfig) -> float | None:
    """The configured peak, or the known bfloat16 peak of this accelerator (None on CPUs)."""
    if config.peak_flops:
        return config.peak_flops
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


class MetricsLog:
    """metrics.jsonl and TensorBoard events (process 0 only; the others write nothing).

    Opening it keeps the records up to `resume_step` (what a killed run logged after its last
    checkpoint goes, so the log reads as if the run never stopped) and drops lines a crash tore.
    """

    def __init__(self, run_dir: pathlib.Path, resume_step: int, say=print):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():
            records, damaged = rundir.read_metrics(self.path)
            if damaged:
                say(f"{self.path}: dropped line(s) {', '.join(map(str, damaged))}, which a crash or a full disk "
                    "cut off.")
            rundir.rewrite(self.path, [r for r in records if r["step"] <= resume_step])
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rundir.append_line(self.path, {"step": step, "split": split, **values})
        for key, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(f"{split}/{key}", value, step)
            else:
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(metrics_path: pathlib.Path, output: pathlib.Path) -> None:
    """loss.png: training loss (per log interval) and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, _ = rundir.read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r]
        if points:
            axes.plot(*zip(*points), style, label=split)
    for r in records:
        if r["split"] == "baseline" and "unigram_loss" in r:
            axes.axhline(r["unigram_loss"], color="gray", linestyle="--", label="unigram baseline")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(output.parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step (a second SIGINT
    interrupts at once). Handlers are only installed from the main thread."""

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
            raise KeyboardInterrupt
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


# ----------------------------------------------------------------------------- the run


def _flat(config: TrainConfig) -> dict[str, Any]:
    """The config's values, the model's fields as model.FIELD."""
    values = to_dict(config)
    model = values.pop("model")
    return {**values, **{f"model.{key}": value for key, value in model.items()}}


def _check_resumable(config: TrainConfig, run_dir: pathlib.Path) -> None:
    """Raises naming the fields (model fields one by one) that differ from the saved run's and may not."""
    saved = _flat(load_yaml(run_dir / "config.yaml"))
    wanted = _flat(config)
    changed = [key for key in wanted if key not in RESUMABLE_KEYS and saved.get(key) != wanted[key]]
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
        run_dir.mkdir(parents=True, exist_ok=True)
        previous = lock.acquire()
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
            say(f"Checkpoint step {error.step} cannot be read; moved it to {destination} and falling back to "
                f"step {checkpointer.latest_step()}. ({error})")


def _label_names(config: TrainConfig, train_examples, validation_examples):
    if config.task != Task.CLASSIFICATION:
        return train_examples, validation_examples, []
    spec = datasets.DATASETS.get(config.dataset) if not config.train_files else None
    train_examples, names = data_lib.encode_labels(train_examples, spec.label_names if spec else None)
    validation_examples, _ = data_lib.encode_labels(validation_examples, names)
    return train_examples, validation_examples, names


def _host(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def run(config: TrainConfig, *, progress: bool = True) -> RunResult:
    """Trains (or resumes) the run described by `config`; returns the last evaluation.

    The run directory is locked while the run trains: a second process on it is refused
    (RunDirectoryBusy). A finished run is not trained again.
    """
    initialize_distributed(config)
    config = resolve_init_from(config)
    run_dir = config.run_path
    say = tqdm.write if jax.process_index() == 0 else (lambda *_: None)
    lock = rundir.RunLock(run_dir)
    if jax.process_index() == 0:
        _open_run_dir(run_dir, lock, say)
    _sync("run_dir")
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    try:
        return _train(config, run_dir, checkpointer, say, progress)
    finally:
        checkpointer.close()
        lock.release()


def _train(config: TrainConfig, run_dir: pathlib.Path, checkpointer: Checkpointer, say, progress: bool) -> RunResult:
    saved_steps = checkpointer.all_steps()
    resuming = bool(saved_steps)
    is_main = jax.process_index() == 0
    if resuming:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} has checkpoints but no config.yaml; it is not a run directory.")
        _check_resumable(config, run_dir)
        start = config.resume_step or saved_steps[-1]
        if start not in saved_steps:
            raise ValueError(f"resume_step={start}: no such checkpoint in {run_dir / 'checkpoints'}; saved steps: {saved_steps}.")
        if start > config.steps:
            raise ValueError(
                f"steps={config.steps} is below step {start}, which {run_dir} has already trained; raise steps, "
                f"pass resume_step=N to go back to an earlier checkpoint, or choose a new run_dir."
            )
        if start == config.steps and not config.resume_step:
            return _finished(config, run_dir, say)
    elif config.resume_step:
        raise ValueError(f"resume_step={config.resume_step}, but {run_dir} has no checkpoint yet.")
    artefacts = rundir.Artefacts(run_dir, writable=is_main)

    train_examples = load_examples(config, "train")
    validation_examples = load_examples(config, "validation") if (config.validation_files or not config.train_files) else []
    train_examples, validation_examples, label_names = _label_names(config, train_examples, validation_examples)
    if is_main and label_names:
        (run_dir / "labels.json").write_text(json.dumps(label_names))
    training_data = rundir.sha256_json(train_examples)
    tokenizer = prepare_tokenizer(config, run_dir, train_examples, training_data, artefacts)
    if resuming:  # the checkpoints continue training on the same data
        artefacts.check("checkpoints", {"training_data": training_data})
    else:
        artefacts.record("checkpoints", {"training_data": training_data})
    if is_main:
        save_yaml(config, run_dir / "config.yaml")
    features = task_data(config, tokenizer, train_examples, validation_examples, label_names)

    model = build_model(config, num_labels=max(len(label_names), 2))
    objective = OBJECTIVES[config.task]
    schedule = learning_rate_schedule(config.schedule, config.learning_rate, config.warmup_steps, config.steps)
    optimizer = make_optimizer(
        schedule, weight_decay=config.weight_decay, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        grad_clip=config.grad_clip or None,
    )
    mesh = make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.batch_size // config.accumulation) % data_shards:
        raise ValueError(
            f"The microbatch of {config.batch_size // config.accumulation} examples cannot be split over "
            f"{data_shards} data-parallel devices; make batch_size / accumulation a multiple of {data_shards}."
        )
    state, shardings = create_state(model, optimizer, init_inputs(config), jax.random.PRNGKey(config.seed), mesh)
    sampling = optax.linear_schedule(0.0, config.scheduled_sampling, config.steps) if config.scheduled_sampling else None
    train_step, eval_step = compile_steps(
        model, objective, optimizer, mesh, shardings, accumulation=config.accumulation,
        label_smoothing=config.label_smoothing, sampling_probability=sampling,
    )
    train_batches = data_lib.batches(
        features.train, global_batch_size=config.batch_size, seed=config.seed, random_map=features.train_map,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )

    if resuming:
        for newer in (s for s in saved_steps if config.resume_step and s > config.resume_step):
            say(f"resume_step={config.resume_step}: moved the newer step {newer} to "
                f"{_set_aside(checkpointer, run_dir, newer, 'after-resume-step')}.")
        state, data_state = _restore(checkpointer, state, run_dir, fall_back=not config.resume_step, say=say)
        train_batches.set_state(data_state)
        say(f"Resumed {run_dir} at step {int(state.step)}.")
    elif config.init_from:
        state = _load_pretrained(config, model, state, shardings, say)
    step = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(state.params)))
    step_flops = flops_per_step(config, num_params)
    step_tokens = config.batch_size * (config.seq_length + (config.source_length if config.task == Task.SEQ2SEQ else 0))
    peak = peak_flops_per_device(config)
    log = MetricsLog(run_dir, resume_step=step if resuming else -1, say=say)  # a fresh run starts a fresh log
    if not resuming:
        say(f"{run_dir}: {config.task} with {num_params:,} parameters on {mesh.devices.size} device(s) "
            f"(mesh {dict(mesh.shape)}), {len(train_examples):,} training examples.")
        if features.baselines:
            log.write(0, "baseline", features.baselines)
            say("Baselines to beat: " + ", ".join(f"{name} {value:.4g}" for name, value in features.baselines.items()))

    def evaluate(params) -> tuple[dict[str, float], str]:
        if features.validation is None:
            return {}, ""
        batches = data_lib.batches(
            features.validation, global_batch_size=config.batch_size, seed=config.seed + 1, shuffle=False,
            num_epochs=1, random_map=features.validation_map, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        sums = None
        for index, batch in enumerate(batches):
            if config.eval_batches and index >= config.eval_batches:
                break
            metrics = eval_step(params, global_batch(batch, mesh))
            sums = _add(sums, metrics)
        result = summarize(_host(sums), config.task)
        text = ""
        if jax.process_count() == 1:  # generation runs on one process's devices
            if config.task == Task.CAUSAL_LM and config.sample_tokens:
                text = _sample_text(config, model, params, tokenizer)
            if config.task == Task.SEQ2SEQ and config.bleu_examples:
                result["bleu"], text = _bleu(config, model, params, tokenizer, features.validation_examples)
        return result, text

    def save(step: int) -> None:
        checkpointer.save(step, state, train_batches.get_state(), force=True)

    base_key = jax.random.PRNGKey(config.seed)  # step s trains with fold_in(base_key, s)
    start_time = time.time()
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and is_main), dynamic_ncols=True, desc="train")
    validation, sample = {}, ""
    interval_sums, interval_start, interval_steps = None, None, 0
    stopped = None
    try:
        with StopSignals() as signals:
            while step < config.steps:
                batch = global_batch(next(train_batches), mesh)
                state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
                step += 1
                bar.update(1)
                if interval_start is None:  # the first step compiles: time from its end
                    jax.block_until_ready(metrics)
                    interval_start = time.time()
                else:
                    interval_sums = _add(interval_sums, metrics)
                    interval_steps += 1
                if step % config.log_every == 0 or step == config.steps:
                    consecutive, total = (int(x) for x in jax.device_get(nonfinite_counts(state.opt_state)))
                    if consecutive >= config.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"Step {step}: the last {consecutive} steps had non-finite gradients ({total} in all) and "
                            f"were skipped; stopping. The checkpoints in {run_dir / 'checkpoints'} hold the last good "
                            "state: lower learning_rate, raise warmup_steps or check the data, then resume."
                        )
                    if interval_sums is not None:
                        elapsed = time.time() - interval_start
                        sums = _host(interval_sums)
                        values = summarize(sums, config.task)
                        values["grad_norm"] = sums["grad_norm"] / interval_steps
                        values["learning_rate"] = float(schedule(step - 1))  # of the update just made
                        values["steps_per_second"] = interval_steps / elapsed
                        values["examples_per_second"] = interval_steps * config.batch_size / elapsed
                        values["tokens_per_second"] = interval_steps * step_tokens / elapsed
                        if peak:
                            values["mfu"] = interval_steps * step_flops / elapsed / (peak * jax.device_count())
                        values["nonfinite_steps"] = total
                        log.write(step, "train", values)
                        postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{values['tokens_per_second']:,.0f}"}
                        if peak:
                            postfix["mfu"] = f"{values['mfu']:.1%}"
                        bar.set_postfix(postfix)
                        interval_sums, interval_start, interval_steps = None, time.time(), 0
                if step % config.eval_every == 0 and step < config.steps:
                    validation, sample = evaluate(state.params)
                    _report(say, log, step, validation, sample, config.task)
                    interval_start = time.time()
                if step % config.checkpoint_every == 0 and step < config.steps:
                    save(step)
                stop_check = jax.process_count() == 1 or step % config.log_every == 0
                stopped = signals.agreed() if stop_check else None
                if stopped:
                    save(step)
                    checkpointer.wait()
                    say(f"Stopped by {signal.Signals(stopped).name} at step {step}; saved {run_dir / 'checkpoints'}. "
                        "Run the same command again to resume.")
                    return RunResult(run_dir, step, validation, sample, stopped, features.baselines)
        validation, sample = evaluate(state.params)
        _report(say, log, step, validation, sample, config.task)
        if checkpointer.latest_step() != step:
            save(step)
        checkpointer.wait()
        if is_main and log.path.exists():
            plot_losses(log.path, run_dir / "loss.png")
        say(f"Done: {step} steps in {time.time() - start_time:.0f} s; run directory {run_dir}.")
        return RunResult(run_dir, step, validation, sample, baselines=features.baselines)
    finally:
        bar.close()
        log.close()


def _report(say, log: MetricsLog, step: int, validation: dict, sample: str, task: Task) -> None:
    if not validation:
        return
    log.write(step, "validation", {**validation, **({"sample": sample} if sample else {})})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in validation.items())
    say(f"step {step} validation: {shown}")
    if sample:
        say(("sample: " if task == Task.CAUSAL_LM else "translation: ") + sample)


def _load_pretrained(config: TrainConfig, model, state, shardings, say):
    """Moves the body of the `init_from` run's latest parameters under this run's (new) head."""
    source = pathlib.Path(config.init_from)
    pretrained_config = load_yaml(source / "config.yaml")
    pretrained_model = build_model(pretrained_config, num_labels=_num_labels(source))
    abstract = jax.eval_shape(lambda: pretrained_model.init(jax.random.PRNGKey(0), *init_inputs(pretrained_config)))
    checkpointer = Checkpointer(source / "checkpoints")
    try:
        pretrained = checkpointer.restore_params(abstract["params"])
    finally:
        checkpointer.close()
    merged, fresh = merge_pretrained(state.params, pretrained)
    boxed = jax.tree.map(
        lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
        state.params, merged, is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    say(f"Loaded the pretrained body of {source}; newly initialised: {', '.join(fresh) or 'nothing'}.")
    return state.replace(params=jax.device_put(boxed, shardings.params))


def _num_labels(run_dir: pathlib.Path) -> int:
    labels = run_dir / "labels.json"
    return len(json.loads(labels.read_text())) if labels.exists() else 2


def _sample_text(config: TrainConfig, model, params, tokenizer: Tokenizer) -> str:
    """`sample_prompt` and a short continuation of it (top-k sampling, fixed seed)."""
    prompt_length = len(tokenizer.encode(config.sample_prompt)) or 1
    new_tokens = min(config.sample_tokens, config.model.max_length - prompt_length)
    if new_tokens < 1:
        return ""
    sampler = Sampler(model, params, tokenizer)
    continuation = sampler(
        config.sample_prompt, max_new_tokens=new_tokens, strategy="sample", temperature=0.8, top_k=40, seed=config.seed
    )
    return config.sample_prompt + continuation


def _bleu(config: TrainConfig, model, params, tokenizer: Tokenizer, examples: list[dict]) -> tuple[float, str]:
    """Corpus BLEU (sacrebleu) of greedy translations of the first `bleu_examples` validation pairs."""
    import sacrebleu

    examples = examples[: config.bleu_examples]
    variables = {"params": nn.meta.unbox(params)}
    hypotheses = []
    for start in range(0, len(examples), config.batch_size):
        chunk = examples[start : start + config.batch_size]
        sources = [tokenizer.encode(e["source"])[: config.source_length - 1] + [tokenizer.eos_id] for e in chunk]
        output = generate(
            model, variables, sources, max_new_tokens=config.seq_length, eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
        )
        tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
        hypotheses += [tokenizer.decode(t[:n]) for t, n in zip(tokens, lengths)]
    bleu = sacrebleu.corpus_bleu(hypotheses, [[e["target"] for e in examples]]).score
    return bleu, f"{examples[0]['source']} -> {hypotheses[0]}"
