"""The configuration of a training run: one frozen dataclass, named experiments, YAML and
`key=value` overrides.

A run is described by a `TrainConfig`. It starts from a named experiment (`EXPERIMENTS`) or a
YAML file, and single keys are overridden on the command line:

    python -m train transformer-tiny-en-fr steps=500 model.num_decoder_layers=3

`model` is the architecture (`transformer.ModelConfig`): in YAML either a model preset name or
a mapping of fields with an optional `preset` key; on the command line `model=NAME` picks a
preset and `model.FIELD=VALUE` changes one field. Values are parsed as YAML scalars
(`true`, `3e-4`, `[a.txt, b.txt]`). Every numeric field has a valid range (`RANGES`), checked
when the config is built, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import pathlib
import re
import types
import typing
from typing import Any

import yaml

from train.data import span_corruption_lengths
from train.optim import Schedule
from transformer import compile_cache
from transformer.files import write_atomically
from transformer.config import MAX_TOKENS, ModelConfig, coerce_scalar
from transformer.tasks import Task


class FileFormat(enum.StrEnum):
    TEXT = "text"  # each file is one document
    LINES = "lines"  # each non-empty line is one document
    JSONL = "jsonl"  # one JSON object per line: "text" (+ "label"), or "source" and "target"
    TSV = "tsv"  # text<TAB>label, or source<TAB>target
    CONLL = "conll"  # a word and its IOB2 tag per line (columns between ignored), a blank line between sentences
    SQUAD = "squad"  # SQuAD's JSON: articles of paragraphs, each a context and its questions with answer spans


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: an interval (finite values only), plus optionally
    one special value outside it, e.g. `Range(1, also=(-1, "the remaining devices"))`."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    also: tuple[int, str] | None = None  # (value, what it means)

    def __contains__(self, value) -> bool:
        if self.also is not None and value == self.also[0]:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return interval if self.also is None else f"{interval}, or {self.also[0]} ({self.also[1]})"


_NON_NEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
_FRACTION = Range(0, 1)  # [0, 1)


def _count(low: int, high: int) -> Range:
    return Range(low, high, high_open=False)


# Counts are bounded far past any real run, so that a typo (zeros too many) is an error here, not
# a hang or a failed allocation later: steps by the int32 step counter; tokens by ModelConfig's
# context; examples at 2**20, 16 times the largest published batch (BERT with LAMB: 65,536);
# devices and processes at 2**20.
_MAX_STEPS, _MAX_EXAMPLES, _MAX_DEVICES = 2**31 - 1, 2**20, 2**20
_STEPS = _count(1, _MAX_STEPS)
_MESH_AXIS = Range(1, _MAX_DEVICES, high_open=False, also=(-1, "the remaining devices"))

# Every int and float field of TrainConfig, checked before anything is built.
RANGES: dict[str, Range] = {
    "seq_length": _count(1, MAX_TOKENS),
    "source_length": _count(1, MAX_TOKENS),
    "steps": _STEPS,
    "batch_size": _count(1, _MAX_EXAMPLES),
    "accumulation": _count(1, _MAX_EXAMPLES),
    "learning_rate": _POSITIVE,
    "warmup_steps": _count(0, _MAX_STEPS),
    "weight_decay": _NON_NEGATIVE,
    "grad_clip": _NON_NEGATIVE,
    "adam_b1": _FRACTION,
    "adam_b2": _FRACTION,
    "adam_eps": _POSITIVE,
    "label_smoothing": _FRACTION,
    "noise_density": Range(0, 1, low_open=True),
    "mean_span_length": Range(1),
    "tokenizer_extra_ids": _count(0, MAX_TOKENS),
    "doc_stride": _count(1, MAX_TOKENS),
    "max_question_length": _count(1, MAX_TOKENS),
    "max_answer_length": _count(1, MAX_TOKENS),
    "student_layers": _count(0, 2**10),
    "distill_temperature": _POSITIVE,
    "distill_kl_weight": _NON_NEGATIVE,
    "distill_mlm_weight": _NON_NEGATIVE,
    "distill_cosine_weight": _NON_NEGATIVE,
    "scheduled_sampling": Range(0, 1, high_open=False),
    "max_nonfinite_steps": _STEPS,
    "seed": Range(0, 2**32 - 2, high_open=False),  # grain seeds with seed + 1 and takes 32 bits
    "mesh_data": _MESH_AXIS,
    "mesh_fsdp": _MESH_AXIS,
    "mesh_tensor": _MESH_AXIS,
    "num_processes": _count(0, _MAX_DEVICES),
    "process_id": _count(-1, _MAX_DEVICES - 1),
    "log_every": _STEPS,
    "eval_every": _STEPS,
    "eval_batches": _count(0, _MAX_STEPS),
    "checkpoint_every": _STEPS,
    "keep_checkpoints": _STEPS,
    "resume_step": _count(0, _MAX_STEPS),
    "sample_tokens": _count(0, MAX_TOKENS),
    "bleu_examples": _count(0, _MAX_EXAMPLES),
    "bleu_beams": _count(0, 2**10),  # each beam is a copy of the decoder's cache
    "peak_flops": _NON_NEGATIVE,
}


def _field(default, help_text: str):
    """A TrainConfig field with the text `python -m train --help` shows for it."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs; the resolved config is saved in the run directory."""

    # What to train.
    task: Task = Task.CAUSAL_LM
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig.preset("gpt2-tiny"))
    init_from: str = _field(
        "", "a run directory, a Hugging Face checkpoint directory or a named checkpoint (all-minilm-l6-v2): "
        "start from its parameters, architecture and tokenizer",
    )

    # Data: a named data set (train.datasets) or your own files.
    dataset: str = "shakespeare"
    train_files: tuple[str, ...] = _field((), "instead of `dataset`")
    validation_files: tuple[str, ...] = _field((), "held-out files; with `dataset`, in place of its validation split")
    file_format: FileFormat = FileFormat.TEXT
    seq_length: int = _field(128, "tokens per example (the target side for seq2seq)")
    source_length: int = _field(128, "seq2seq source tokens")
    next_sentence_prediction: bool = _field(False, "masked LM: pairs of segments with an NSP head")
    sentence_order_prediction: bool = _field(
        False, "masked LM: ALBERT's pairs, two consecutive segments swapped half the time, with the pair head"
    )
    full_sentences: bool = _field(False, "masked LM: RoBERTa's rows, sentences packed across documents")
    span_masking: bool = _field(
        False, "masked LM: SpanBERT's masking, spans of whole words (lengths Geometric(0.2), at most 10 words)"
    )
    span_boundary_objective: bool = _field(
        False, "masked LM: SpanBERT's span boundary head, each masked token predicted from its span's boundaries "
        "(needs span_masking)",
    )
    noise_density: float = _field(0.15, "span corruption: the share of the text's tokens dropped into the target")
    mean_span_length: float = _field(3.0, "span corruption: the mean length of a dropped span")
    doc_stride: int = _field(64, "question answering: context pieces between the starts of a long context's windows")
    max_question_length: int = _field(32, "question answering: a question's pieces kept (the rest cut)")
    max_answer_length: int = _field(30, "question answering: the longest answer picked, in pieces")
    teacher: str = _field(
        "", "distillation: the teacher, a run directory, a Hugging Face checkpoint directory or a named checkpoint; "
        "the student starts from its layers (`student_layers` of them) unless init_from names another",
    )
    student_layers: int = _field(0, "distillation: the student's layers, from every (teacher's / student's)-th "
                                    "teacher layer; 0 = half the teacher's")
    distill_temperature: float = _field(2.0, "distillation: both models' logits are divided by it before the KL term")
    distill_kl_weight: float = _field(5.0, "distillation: weight of KL(teacher || student) x temperature^2 on the "
                                           "masked tokens (0 for a teacher without a masked-LM head)")
    distill_mlm_weight: float = _field(2.0, "distillation: weight of the student's masked-LM cross-entropy")
    distill_cosine_weight: float = _field(1.0, "distillation: weight of 1 - cos(student state, teacher state), "
                                               "averaged over the tokens")
    tokenizer: str = _field(
        "", 'a sentencepiece .model file, a tokenizer.json or a checkpoint directory; "" trains one '
        "(model.vocab_size pieces)",
    )
    tokenizer_model_type: str = _field("bpe", '"bpe" or "unigram" when training one')
    tokenizer_extra_ids: int = _field(
        0, "sentinels <extra_id_k> among the model.vocab_size ids of a tokenizer trained by the run "
        "(span corruption: one per span)",
    )

    # Optimisation.
    steps: int = 1000
    batch_size: int = _field(32, "global batch in examples (split over devices and processes)")
    accumulation: int = _field(1, "microbatches per step (gradient accumulation)")
    learning_rate: float = _field(1e-3, "the peak, reached after warmup")
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = _field(1.0, "global norm; 0 disables clipping")
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    label_smoothing: float = 0.0
    scheduled_sampling: float = _field(0.0, "final probability of feeding the model its own prediction")
    max_nonfinite_steps: int = _field(10, "stop after this many non-finite steps in a row (checked at log steps)")
    seed: int = 0

    # Devices: mesh axis sizes (-1 = the remaining devices) and multi-host start-up.
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    distributed: bool = _field(False, "call jax.distributed.initialize() (arguments auto-detected on clusters)")
    coordinator_address: str = _field("", "host:port of process 0, when not auto-detected")
    num_processes: int = _field(0, "0: auto-detect")
    process_id: int = _field(-1, "-1: auto-detect")

    # Run directory, logging, evaluation and checkpoints.
    run_dir: str = "runs/gpt-tiny"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = _field(
        20, "validation batches per evaluation (a fixed, seeded sample of the split; text-to-text exact match and "
        "SQuAD's scores: the first examples); 0 = all",
    )
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume_step: int = _field(0, "go back to this checkpoint step (once); 0 = the newest that restores cleanly")
    sample_prompt: str = _field("ROMEO:", "causal LM: text continued at every evaluation")
    sample_tokens: int = 64
    bleu_examples: int = _field(100, "seq2seq: validation pairs translated for BLEU; 0 = none")
    bleu_beams: int = _field(4, "seq2seq: beams of a second BLEU, by beam search (score / length**0.6); 0 = none")
    peak_flops: float = _field(0.0, "per-device peak FLOP/s for MFU; 0 = known accelerators only")
    compilation_cache: str = _field(
        compile_cache.DEFAULT_DIR, 'compiled programs kept for later runs (a rerun or resume skips compiling); "" = off'
    )

    def __post_init__(self):
        for name in FIELDS:
            if name != "model":
                object.__setattr__(self, name, _coerce(name, getattr(self, name)))
        self._check()

    def _check(self):
        for name, valid in RANGES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: it must be in {valid}.")
        if self.batch_size % self.accumulation:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by accumulation={self.accumulation}; "
                "each microbatch must hold batch_size / accumulation examples."
            )
        if not self.dataset and not self.train_files:
            raise ValueError("No training data: set dataset=NAME (see train.datasets) or train_files=[...].")
        if self.tokenizer_model_type not in ("bpe", "unigram"):
            raise ValueError(f"tokenizer_model_type must be 'bpe' or 'unigram', got {self.tokenizer_model_type!r}.")
        if self.scheduled_sampling and not self.task.generates:
            raise ValueError(f"scheduled_sampling applies to causal_lm and seq2seq, not {self.task}.")
        masked_lm_options = ("next_sentence_prediction", "sentence_order_prediction", "full_sentences")
        given = [name for name in masked_lm_options if getattr(self, name)]
        spans = [name for name in ("span_masking", "span_boundary_objective") if getattr(self, name)]
        if (given or spans) and self.task != Task.MASKED_LM:
            raise ValueError(f"{(given + spans)[0]} applies to task=masked_lm only.")
        if spans and self.pair_head:
            raise ValueError(f"{spans[0]} (SpanBERT) takes rows of one segment, without {given[0]}: leave one out.")
        if self.span_boundary_objective and not self.span_masking:
            raise ValueError("span_boundary_objective predicts masked spans from their boundaries: set "
                             "span_masking=True.")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} exclude each other: a row holds one kind of pair, or one "
                             "segment packed across documents.")
        stacks = (self.model.num_encoder_layers > 0, self.model.num_decoder_layers > 0)
        if stacks not in self.task.layers:
            needed = " or ".join(STACKS[layers] for layers in self.task.layers)
            raise ValueError(f"task={self.task} needs a model with {needed}; pick a matching model preset.")
        lengths = {"seq_length": self.seq_length}
        if self.task.encoder_decoder:
            lengths["source_length"] = self.source_length
        for name, length in lengths.items():
            if length > self.model.max_length:
                raise ValueError(
                    f"{name}={length} exceeds the model's max_length={self.model.max_length}; "
                    f"lower {name} or raise model.max_length."
                )
        if self.task == Task.SPAN_CORRUPTION:
            self._check_span_corruption()
        elif any(getattr(self, name) != FIELDS[name].default for name in ("noise_density", "mean_span_length")):
            raise ValueError("noise_density and mean_span_length apply to task=span_corruption only.")
        if self.task == Task.QUESTION_ANSWERING:
            self._check_windows()
        elif any(getattr(self, name) != FIELDS[name].default for name in _WINDOW_FIELDS):
            raise ValueError(f"{', '.join(_WINDOW_FIELDS)} apply to task=question_answering only.")
        self._check_distillation()
        if self.tokenizer_extra_ids and (self.tokenizer or self.start_from):
            raise ValueError(
                f"tokenizer_extra_ids={self.tokenizer_extra_ids} adds sentinels to a tokenizer the run trains, and this "
                f"run takes its tokenizer from {self.tokenizer or self.start_from}: leave tokenizer_extra_ids out."
            )
        if self.pair_head and self.model.type_vocab_size < 2:
            raise ValueError(f"{given[0]} needs two token types (segments A and B): set model.type_vocab_size=2.")

    def _check_distillation(self):
        if self.task != Task.DISTILLATION:
            given = [name for name in _DISTILLATION_FIELDS if getattr(self, name) != FIELDS[name].default]
            if given:
                raise ValueError(f"{', '.join(given)} apply to task=distillation only.")
            return
        if not self.teacher:
            raise ValueError("task=distillation needs a teacher: set teacher= a run directory, a Hugging Face "
                             "checkpoint directory or a named checkpoint (all-minilm-l6-v2).")
        if not (self.distill_kl_weight or self.distill_mlm_weight or self.distill_cosine_weight):
            raise ValueError("distill_kl_weight, distill_mlm_weight and distill_cosine_weight are all 0: give at least "
                             "one loss term a weight.")

    def _check_span_corruption(self):
        """Inputs and targets fill source_length and seq_length exactly (T5's length arithmetic)."""
        _, target_length = span_corruption_lengths(self.source_length, self.noise_density, self.mean_span_length)
        if self.seq_length != target_length:
            raise ValueError(
                f"Span corruption of {self.source_length}-token inputs (source_length) at noise_density="
                f"{self.noise_density} and mean_span_length={self.mean_span_length} makes targets of exactly "
                f"{target_length} tokens: set seq_length={target_length}."
            )

    def _check_windows(self):
        """Question answering: a row holds [CLS] question [SEP] context [SEP], and its windows overlap."""
        room = self.seq_length - self.max_question_length - 3  # context pieces after the longest question
        if room < 1:
            raise ValueError(
                f"seq_length={self.seq_length} leaves no context after a question of max_question_length="
                f"{self.max_question_length} and [CLS], [SEP], [SEP]: raise seq_length or lower max_question_length."
            )
        if self.doc_stride > room:
            raise ValueError(
                f"seq_length={self.seq_length} leaves {room} context pieces per window after a question of "
                f"max_question_length={self.max_question_length} and [CLS], [SEP], [SEP]; doc_stride={self.doc_stride} "
                f"must be in [1, {room}]: lower doc_stride, or raise seq_length."
            )

    @property
    def start_from(self) -> str:
        """The checkpoint whose architecture, tokenizer and parameters the run starts from:
        `init_from`, else a distillation's teacher (the student takes some of its layers)."""
        return self.init_from or self.teacher

    @property
    def pair_head(self) -> bool:
        """Whether the masked-LM model has the head that classifies a pair of segments (NSP, SOP)."""
        return self.next_sentence_prediction or self.sentence_order_prediction

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (and validated)."""
        return from_dict({**to_dict(self), **{k: _plain(v) for k, v in changes.items()}}, base=None)

    @property
    def run_path(self) -> pathlib.Path:
        return pathlib.Path(self.run_dir)


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _field_type(field: dataclasses.Field):
    """The class of a field (the first non-None member of `X | None`)."""
    kind = _type_hints()[field.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return typing.get_origin(kind) or kind


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, ModelConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain values (the model as a mapping of all its fields), for YAML."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_WINDOW_FIELDS = ("doc_stride", "max_question_length", "max_answer_length")  # question answering's
_DISTILLATION_FIELDS = ("teacher", "student_layers", "distill_temperature", "distill_kl_weight", "distill_mlm_weight",
                        "distill_cosine_weight")
# A model's stacks (has an encoder, has a decoder) in words, for errors.
STACKS = {(True, False): "an encoder only (num_decoder_layers=0)", (False, True): "a decoder only (num_encoder_layers=0)",
          (True, True): "an encoder and a decoder"}


def _coerce(name: str, value):
    """A YAML value for field `name` in the field's type, or a clear error."""
    kind = _field_type(FIELDS[name])
    if kind is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}.")
        return tuple(str(v) for v in value)
    if kind in (bool, int, float):
        return coerce_scalar(name, kind, value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be text, got {value!r}; quote it in YAML (a colon and a space, "
                             "or a leading dash or bracket, make other things of it).")
        return "" if value is None else str(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            valid = ", ".join(member.value for member in kind)
            raise ValueError(f"{name}={value!r} is not valid; use one of: {valid}.") from None
    raise ValueError(f"{name} must be of type {kind.__name__}, got {value!r}.")


def _model(value, base: ModelConfig | None) -> ModelConfig:
    """A model preset name, or a mapping of fields (with an optional "preset") over `base`."""
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, str):
        return ModelConfig.preset(value)
    if not isinstance(value, dict):
        raise ValueError(f"model must be a preset name or a mapping of ModelConfig fields, got {value!r}.")
    fields = dict(value)
    preset = fields.pop("preset", None)
    if preset is not None:
        return ModelConfig.preset(preset, **fields)
    if base is not None:
        return base.replace(**fields)
    return ModelConfig.from_dict(fields)


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from plain values over `base` (None: every field must be given or defaulted)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(FIELDS)} "
            "(and model.FIELD for the architecture)."
        )
    start = {} if base is None else {f: getattr(base, f) for f in FIELDS}
    for name, value in values.items():
        if name == "model":
            start[name] = _model(value, start.get("model"))
        else:
            start[name] = _coerce(name, value)
    return TrainConfig(**start)


def load_yaml(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    """A config from a YAML file of keys (over `base`, or over the named experiment in its
    `experiment` key, or over the defaults)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"Config file {path} is a directory; pass a YAML file in it (a run's is config.yaml).")
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"Config file {path} is not a text YAML file (it holds bytes that are not UTF-8); "
                         "pass a YAML file of key: value lines.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}.")
    if "experiment" in values:
        base = experiment(values.pop("experiment"))
    return from_dict(values, base if base is not None else TrainConfig())


def save_yaml(config: TrainConfig, path: str | os.PathLike) -> None:
    """Writes the resolved config (readable back with `load_yaml`)."""
    write_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Applies `key=value` strings (`model=NAME`, `model.FIELD=VALUE`) in order."""
    values: dict[str, Any] = {}
    model_fields: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Cannot parse override {item!r}; write key=value (e.g. steps=500).")
        if key in FIELDS and _field_type(FIELDS[key]) is str:
            value = text  # verbatim: YAML reads "ROMEO:" as a mapping, "010" as 8, "yes" as True
        elif re.fullmatch(r"[+-]?0[0-9]+", text):
            value = int(text, 10)  # decimal, where YAML 1.1 reads a leading zero as octal (seed=010 -> 8)
        else:
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError:
                value = text
        if key.startswith("model."):
            model_fields[key.removeprefix("model.")] = value
        else:
            values[key] = value
    if model_fields:  # one model value, so the config is checked once, with its final model
        model = values.get("model")
        values["model"] = {"preset": model, **model_fields} if isinstance(model, str) else {**(model or {}), **model_fields}
    return from_dict(values, config)


# ----------------------------------------------------------------------------- experiments

# The recipes: small models that train in 5-40 minutes on a 2-core CPU (figures in README, Results).
_GPT_QUICK = ModelConfig.preset(
    "gpt2-tiny", vocab_size=1024, d_model=128, num_heads=4, d_ff=512, num_decoder_layers=4, max_length=256,
)
_GPT_TINY = ModelConfig.preset(
    "gpt2-tiny", vocab_size=2048, d_model=256, num_heads=4, d_ff=1024, num_decoder_layers=4, max_length=256,
)
# Rotary positions: with BERT's learned ones the masked-LM loss sits at the unigram plateau for
# hundreds of steps (perplexity 455 after 600 steps against 124 after 500; benchmarks/RESULTS.md).
_BERT_TINY = ModelConfig.preset(
    "bert-tiny", vocab_size=2048, d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2, max_length=128,
    position="rope",
)
# The same width with RoBERTa's one token type; rotary positions, as bert-tiny-mlm's.
_ROBERTA_TINY = _BERT_TINY.replace(type_vocab_size=1, norm_epsilon=1e-5)
# ALBERT's factorised embeddings (E = 64) and one layer shared by 4: a third of the parameters.
_ALBERT_TINY = ModelConfig.preset(
    "albert-tiny", vocab_size=2048, embedding_size=64, d_model=128, num_heads=4, d_ff=512, num_encoder_layers=4,
    max_length=128, position="rope",
)
# T5's block (relative position buckets, RMSNorm, no biases) at bert-tiny's width, 2 + 2 layers.
_T5_TINY = ModelConfig.preset(
    "t5-tiny", vocab_size=2048, d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2, num_decoder_layers=2,
    max_length=128,
)
_TRANSFORMER_SMALL = ModelConfig.preset(
    "transformer-tiny", vocab_size=4096, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
    num_decoder_layers=3, max_length=128,
)
# all-MiniLM-L6-v2's shape, for the experiment's own checks; init_from replaces it with the
# checkpoint's config.json (keeping the dropout).
_MINILM = ModelConfig.preset("bert-base", d_model=384, num_heads=12, d_ff=1536, num_encoder_layers=6)
# Full-size models in bfloat16 for accelerators; vocabularies sized for the bundled corpora.
_ACCELERATOR = dict(dtype="bfloat16")

EXPERIMENTS: dict[str, TrainConfig] = {
    # The default: a first run that shows verse within 5 minutes on a 2-core CPU.
    "gpt-quick": TrainConfig(
        task=Task.CAUSAL_LM, model=_GPT_QUICK, dataset="shakespeare", seq_length=128, batch_size=32,
        steps=700, learning_rate=3e-3, warmup_steps=50, eval_every=350, checkpoint_every=350,
        run_dir="runs/gpt-quick", sample_prompt="ROMEO:",
    ),
    "gpt-tiny": TrainConfig(
        task=Task.CAUSAL_LM, model=_GPT_TINY, dataset="shakespeare", seq_length=128, batch_size=32,
        steps=2000, learning_rate=1e-3, warmup_steps=100, eval_every=500, checkpoint_every=500,
        run_dir="runs/gpt-tiny", sample_prompt="ROMEO:",
    ),
    # Reviews and editorials: documents on distinct topics, as NSP needs (on Shakespeare's plays
    # NSP stays at chance at this size; benchmarks/RESULTS.md)
    "bert-tiny-mlm": TrainConfig(
        task=Task.MASKED_LM, model=_BERT_TINY, dataset="opinions", next_sentence_prediction=True,
        seq_length=128, batch_size=32, steps=3000, learning_rate=1e-3, warmup_steps=50, eval_every=500,
        checkpoint_every=1000, run_dir="runs/bert-tiny-mlm",
    ),
    # RoBERTa's recipe: no pair objective, rows of whole sentences packed across documents,
    # masks drawn anew each time a row is read; a larger batch.
    "roberta-tiny-mlm": TrainConfig(
        task=Task.MASKED_LM, model=_ROBERTA_TINY, dataset="opinions", full_sentences=True, seq_length=128,
        batch_size=64, steps=1500, learning_rate=1e-3, warmup_steps=50, eval_every=500, checkpoint_every=500,
        run_dir="runs/roberta-tiny-mlm",
    ),
    # ALBERT's: one shared layer, factorised embeddings, sentence-order prediction.
    "albert-tiny-sop": TrainConfig(
        task=Task.MASKED_LM, model=_ALBERT_TINY, dataset="opinions", sentence_order_prediction=True,
        seq_length=128, batch_size=32, steps=3000, learning_rate=1e-3, warmup_steps=50, eval_every=500,
        checkpoint_every=1000, run_dir="runs/albert-tiny-sop",
    ),
    # SpanBERT's: spans of whole words masked, the span boundary objective, one segment per row of
    # contiguous text (RoBERTa's rows), no pair objective.
    "spanbert-tiny": TrainConfig(
        task=Task.MASKED_LM, model=_BERT_TINY, dataset="opinions", full_sentences=True, span_masking=True,
        span_boundary_objective=True, seq_length=128, batch_size=64, steps=1500, learning_rate=1e-3, warmup_steps=50,
        eval_every=500, checkpoint_every=500, run_dir="runs/spanbert-tiny",
    ),
    # T5's pretraining: 15% of the text in spans of mean length 3, each span one sentinel in the
    # input; 128 input tokens hold 141 of text, the 29 target tokens the spans (T5's arithmetic).
    "t5-tiny-denoise": TrainConfig(
        task=Task.SPAN_CORRUPTION, model=_T5_TINY, dataset="opinions", tokenizer_extra_ids=100, source_length=128,
        seq_length=29, batch_size=32, steps=3000, learning_rate=1e-3, warmup_steps=50, eval_every=500,
        checkpoint_every=1000, run_dir="runs/t5-tiny-denoise",
    ),
    # T5's text-to-text fine-tune: the sentiment written as "positive" or "negative", scored by exact match.
    "t5-tiny-sentiment": TrainConfig(
        task=Task.TEXT_TO_TEXT, model=_T5_TINY, init_from="runs/t5-tiny-denoise", dataset="rt-polarity",
        source_length=64, seq_length=4, batch_size=32, steps=1500, learning_rate=1e-3, warmup_steps=50,
        eval_every=300, checkpoint_every=500, eval_batches=0, run_dir="runs/t5-tiny-sentiment",
    ),
    # Named entities in Japanese news: a label per word on its first piece, entity F1 (seqeval).
    "bert-tiny-ner": TrainConfig(
        task=Task.TOKEN_CLASSIFICATION, model=_BERT_TINY, dataset="hironsan-ner",
        seq_length=96, batch_size=16, steps=600, learning_rate=1e-3, warmup_steps=50, eval_every=100,
        checkpoint_every=200, eval_batches=0, run_dir="runs/bert-tiny-ner",
    ),
    # The same on CoNLL-2003's English news: people, organisations, places and other names.
    "bert-tiny-conll": TrainConfig(
        task=Task.TOKEN_CLASSIFICATION, model=_BERT_TINY, dataset="conll2003-en",
        seq_length=64, batch_size=32, steps=1500, learning_rate=1e-3, warmup_steps=50, eval_every=500,
        checkpoint_every=500, eval_batches=0, run_dir="runs/bert-tiny-conll",
    ),
    "bert-tiny-sentiment": TrainConfig(
        task=Task.CLASSIFICATION, model=_BERT_TINY, init_from="runs/bert-tiny-mlm", dataset="rt-polarity",
        seq_length=64, batch_size=32, steps=600, learning_rate=5e-4, warmup_steps=50, eval_every=100,
        checkpoint_every=200, eval_batches=0, run_dir="runs/bert-tiny-sentiment",
    ),
    # GPT's classification: the main job's LM, fine-tuned, reads the text and EOS; a head on that last token's state.
    "gpt-quick-sentiment": TrainConfig(
        task=Task.CLASSIFICATION, model=_GPT_QUICK, init_from="runs/gpt-quick", dataset="rt-polarity",
        seq_length=64, batch_size=32, steps=600, learning_rate=5e-4, warmup_steps=50, eval_every=100,
        checkpoint_every=200, eval_batches=0, run_dir="runs/gpt-quick-sentiment",
    ),
    # Text pairs: [CLS] A [SEP] B [SEP], B's token type 1; is the second sentence (roughly) equivalent to the first?
    "minilm-sts": TrainConfig(
        task=Task.PAIR_CLASSIFICATION, model=_MINILM, init_from="all-minilm-l6-v2", dataset="sts-b",
        seq_length=64, batch_size=32, steps=600, learning_rate=5e-5, warmup_steps=60, weight_decay=0.01,
        adam_b2=0.999, adam_eps=1e-6, eval_every=150, checkpoint_every=300, eval_batches=0,
        run_dir="runs/minilm-sts",
    ),
    "minilm-sentiment": TrainConfig(
        task=Task.CLASSIFICATION, model=_MINILM, init_from="all-minilm-l6-v2", dataset="rt-polarity",
        seq_length=64, batch_size=32, steps=900, learning_rate=5e-5, warmup_steps=90, weight_decay=0.01,
        adam_b2=0.999, adam_eps=1e-6, eval_every=150, checkpoint_every=300, eval_batches=0,
        run_dir="runs/minilm-sentiment",
    ),
    # Extractive QA, BERT's recipe: [CLS] question [SEP] a window of the paragraph [SEP], windows 64 pieces
    # apart; one evaluation, on every dev question, at the end.
    "minilm-squad": TrainConfig(
        task=Task.QUESTION_ANSWERING, model=_MINILM, init_from="all-minilm-l6-v2", dataset="squad",
        seq_length=128, doc_stride=64, max_question_length=32, batch_size=32, steps=600, learning_rate=1e-4,
        warmup_steps=60, weight_decay=0.01, adam_b2=0.999, adam_eps=1e-6, eval_every=600, checkpoint_every=200,
        eval_batches=0, run_dir="runs/minilm-squad",
    ),
    # DistilBERT's recipe on the real all-MiniLM-L6-v2: a 3-layer student from its layers 0, 2 and 4, trained
    # to reproduce its last hidden states (cosine) while its masked-LM head learns the text; the teacher has no
    # masked-LM head, so no KL term. At the masked LM's weight of 1 the states drifted from the teacher's
    # (benchmarks/RESULTS.md): 0.1 here.
    "minilm-distil": TrainConfig(
        task=Task.DISTILLATION, model=_MINILM.replace(num_encoder_layers=3), teacher="all-minilm-l6-v2",
        dataset="opinions", distill_kl_weight=0.0, distill_mlm_weight=0.1, distill_cosine_weight=1.0, seq_length=32,
        batch_size=32, steps=400, learning_rate=3e-4, warmup_steps=60, weight_decay=0.01, adam_b2=0.999,
        adam_eps=1e-6, eval_every=200, checkpoint_every=200, run_dir="runs/minilm-distil",
    ),
    # The student fine-tuned as minilm-sentiment fine-tunes its teacher.
    "minilm-distil-sentiment": TrainConfig(
        task=Task.CLASSIFICATION, model=_MINILM.replace(num_encoder_layers=3), init_from="runs/minilm-distil",
        dataset="rt-polarity", seq_length=64, batch_size=32, steps=900, learning_rate=5e-5, warmup_steps=90,
        weight_decay=0.01, adam_b2=0.999, adam_eps=1e-6, eval_every=150, checkpoint_every=300, eval_batches=0,
        run_dir="runs/minilm-distil-sentiment",
    ),
    "transformer-tiny-en-fr": TrainConfig(  # 80 tokens hold 99% of the verses
        task=Task.SEQ2SEQ, model=_TRANSFORMER_SMALL, dataset="bible-en-fr", seq_length=80, source_length=80,
        batch_size=48, steps=2200, schedule=Schedule.INVERSE_SQRT, learning_rate=1.5e-3, warmup_steps=300,
        label_smoothing=0.1, eval_every=550, checkpoint_every=550, bleu_examples=100,
        run_dir="runs/transformer-tiny-en-fr",
    ),
    "gpt2-small": TrainConfig(
        task=Task.CAUSAL_LM, model=ModelConfig.preset("gpt2-small", vocab_size=16384, **_ACCELERATOR),
        dataset="shakespeare", seq_length=1024, batch_size=32, steps=5000, learning_rate=6e-4,
        warmup_steps=200, weight_decay=0.1, adam_b2=0.95, adam_eps=1e-8, eval_every=500,
        checkpoint_every=1000, run_dir="runs/gpt2-small", sample_tokens=128,
    ),
    "bert-base": TrainConfig(
        task=Task.MASKED_LM, model=ModelConfig.preset("bert-base", vocab_size=16384, **_ACCELERATOR),
        dataset="shakespeare", next_sentence_prediction=True, seq_length=128, batch_size=256, steps=10000,
        learning_rate=1e-4, warmup_steps=1000, adam_b2=0.999, adam_eps=1e-6, eval_every=1000,
        checkpoint_every=1000, run_dir="runs/bert-base",
    ),
    "transformer-base": TrainConfig(
        task=Task.SEQ2SEQ, model=ModelConfig.preset("transformer-base", vocab_size=16384, **_ACCELERATOR),
        dataset="bible-en-fr", seq_length=128, source_length=128, batch_size=256, steps=20000,
        schedule=Schedule.INVERSE_SQRT, learning_rate=7e-4, warmup_steps=4000, label_smoothing=0.1,
        eval_every=1000, checkpoint_every=1000, run_dir="runs/transformer-base",
    ),
}
DEFAULT_EXPERIMENT = "gpt-quick"


def experiment(name: str) -> TrainConfig:
    """A named experiment; unknown names are an error listing the valid ones."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}.")
    return EXPERIMENTS[name]


def parse_args(args: list[str]) -> TrainConfig:
    """`[EXPERIMENT | CONFIG.yaml] [key=value ...]` -> the run's config; what neither the YAML file
    (nor the experiment its `experiment:` key names) nor an override sets is the default experiment's."""
    for index, flag in enumerate(args):  # `--steps 10` or `--steps=10`, as other tools take them
        if flag.startswith("--"):
            key, _, value = flag[2:].partition("=")
            given = [a for a in args[index + 1: index + 2] if not value and "=" not in a]
            value = value or (given[0] if given else "VALUE")
            raise ValueError(f"Settings are key=value words: write {key.replace('-', '_')}={value}, "
                             f"not {' '.join([flag, *given])}.")
    config = EXPERIMENTS[DEFAULT_EXPERIMENT]
    if args and "=" not in args[0]:
        first, args = args[0], args[1:]
        config = load_yaml(first, config) if first.endswith((".yaml", ".yml")) else experiment(first)
    return apply_overrides(config, args)
