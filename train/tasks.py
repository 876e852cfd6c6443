"""How the training job trains each task: its data, its loss and what it is evaluated on.

One `TrainingTask` per `transformer.tasks.Task` (the library's side of a task: which model it
builds). A task here reads its examples (`data`, `fields`), turns them into fixed-shape
features (`features`), minimises its objective (`objective`, from train.objectives), says what
a trained model must beat (`baselines`) and, for the tasks that write text, generates at each
evaluation (`generation`). Adding a task means one entry in `TASKS`.

The set-up functions below (examples, labels, tokenizer, features) run once at the start of a
run, for whatever task it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from train import data as data_lib
from train import datasets, objectives, rundir
from train.config import FileFormat, TrainConfig
from transformer import runs
from transformer.decoding import GenerationConfig, generate
from transformer.files import sha256_file
from transformer.pretrained import CHECKPOINTS, pretrained_checkpoint
from transformer.sampler import Sampler
from transformer.tasks import Task
from transformer.tokenizer import DIRECTORY_FILES, Tokenizer, TrainingFailed


@dataclasses.dataclass(frozen=True)
class Split:
    """The features of one split: a grain dataset, and for masked LM a per-example random map
    (masking drawn per example and epoch) and the text's tokens (what masked positions are drawn
    from); `rows` is the packed stream of a causal LM split."""

    dataset: grain.MapDataset
    random_map: Callable[[int, np.random.Generator], dict] | None = None
    rows: Any = None
    text_tokens: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class TrainingTask:
    data: str  # the kind of data set it reads (train.datasets): "lm", "classification" or "translation"
    fields: tuple[str, ...]  # the fields of an example in a JSONL or TSV file
    objective: objectives.Objective
    features: Callable[[list[dict], Tokenizer, TrainConfig], Split]
    baselines: Callable[[TrainConfig, Split, Split, list[dict]], dict[str, float]]  # (.., train, validation, its examples)
    token_level: bool = True  # loss per token (perplexity is reported); else per example
    generation: Callable | None = None  # (config, model, params, tokenizer, validation examples) -> (metrics, text)


# ----------------------------------------------------------------------------- features


def _packed_lm(examples, tokenizer, config) -> Split:
    rows = data_lib.PackedLM(examples, tokenizer, config.seq_length)
    return Split(grain.MapDataset.source(rows), rows=rows)


def _masked_lm(examples, tokenizer, config) -> Split:
    pairs = (data_lib.Pairs.NEXT_SENTENCE if config.next_sentence_prediction
             else data_lib.Pairs.SENTENCE_ORDER if config.sentence_order_prediction else data_lib.Pairs.NONE)
    mlm = data_lib.MaskedLMExamples(examples, tokenizer, config.seq_length, pairs=pairs,
                                    across_documents=config.full_sentences)
    return Split(grain.MapDataset.range(len(mlm)), random_map=lambda index, rng: mlm.example(int(index), rng),
                 text_tokens=mlm.text_tokens())


def _seq2seq(examples, tokenizer, config) -> Split:
    return Split(grain.MapDataset.source(examples).map(
        lambda e: data_lib.seq2seq_features(e, tokenizer, config.source_length, config.seq_length)
    ))


def _classification(examples, tokenizer, config) -> Split:
    return Split(grain.MapDataset.source(examples).map(
        lambda e: data_lib.classification_features(e, tokenizer, config.seq_length)
    ))


# ----------------------------------------------------------------------------- baselines


def unigram_loss(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the validation tokens under the training tokens' frequencies (add-one
    smoothed): the loss of a model that ignores context, the bar a language model must clear."""
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    return float(-np.log(counts / counts.sum())[validation].mean())


def predicted_tokens(rows: data_lib.PackedLM) -> np.ndarray:
    """The tokens of a packed stream that are targets of weight 1: all but each document's first."""
    return rows.stream[1:][rows.document[1:] == rows.document[:-1]]


def majority_accuracy(validation: list[dict]) -> float:
    """The validation accuracy of the best constant answer: the share of the most common label."""
    return float(np.bincount([e["label"] for e in validation]).max() / len(validation))


def copy_bleu(examples: list[dict]) -> float:
    """Corpus BLEU (sacrebleu) of each source copied as its own translation."""
    import sacrebleu

    return sacrebleu.corpus_bleu([e["source"] for e in examples], [[e["target"] for e in examples]]).score


def _lm_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    loss = unigram_loss(predicted_tokens(train.rows), predicted_tokens(validation.rows), config.model.vocab_size)
    return {"unigram_loss": loss, "unigram_nats_per_char": loss * validation.rows.tokens_per_character}


def _masked_lm_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    """The masked tokens are drawn uniformly from the text: the unigram loss of all its tokens."""
    return {"unigram_loss": unigram_loss(train.text_tokens, validation.text_tokens, config.model.vocab_size)}


def _translation_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    examples = examples[: config.bleu_examples]
    return {"copy_bleu": copy_bleu(examples)} if examples else {}


def _classification_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    return {"majority_accuracy": majority_accuracy(examples)}


# ----------------------------------------------------------------------------- generation at evaluation


def sample_text(config: TrainConfig, model, params, tokenizer: Tokenizer, examples) -> tuple[dict, str]:
    """`sample_prompt` and a short continuation of it (top-k sampling, fixed seed)."""
    prompt_length = len(tokenizer.encode(config.sample_prompt)) or 1
    new_tokens = min(config.sample_tokens, config.model.max_length - prompt_length)
    if new_tokens < 1:
        return {}, ""
    continuation = Sampler(model, params, tokenizer)(
        config.sample_prompt, max_new_tokens=new_tokens, strategy="sample", temperature=0.8, top_k=40, seed=config.seed
    )
    return {}, config.sample_prompt + continuation


def translation_bleu(config: TrainConfig, model, params, tokenizer: Tokenizer, examples) -> tuple[dict, str]:
    """Corpus BLEU (sacrebleu) of the translations of the first `bleu_examples` validation pairs:
    greedy ("bleu") and, with `bleu_beams` > 0, beam search scoring sum(log p) / length**0.6
    ("bleu_beam"; the 2017 recipe's alpha, on this library's length penalty rather than GNMT's);
    and the first pair with its greedy translation."""
    import sacrebleu

    examples = examples[: config.bleu_examples]
    if not examples:
        return {}, ""
    variables = {"params": nn.meta.unbox(params)}
    searches = {"bleu": GenerationConfig(max_new_tokens=config.seq_length)}
    if config.bleu_beams:
        searches["bleu_beam"] = searches["bleu"].replace(strategy="beam", num_beams=config.bleu_beams, length_penalty=0.6)
    references = [[e["target"] for e in examples]]
    sources = [tokenizer.encode(e["source"])[: config.source_length - 1] + [tokenizer.eos_id] for e in examples]
    metrics, translations = {}, {}
    for name, search in searches.items():
        search = search.replace(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, bos_id=tokenizer.decoder_start_id)
        hypotheses = []
        for start in range(0, len(sources), config.batch_size):
            output = generate(model, variables, sources[start : start + config.batch_size], search)
            tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
            hypotheses += [tokenizer.decode(t[:n]) for t, n in zip(tokens, lengths)]
        metrics[name] = sacrebleu.corpus_bleu(hypotheses, references).score
        translations[name] = hypotheses
    return metrics, f"{examples[0]['source']} -> {translations['bleu'][0]}"


TASKS: dict[Task, TrainingTask] = {
    Task.CAUSAL_LM: TrainingTask(
        data="lm", fields=("text",), objective=objectives.causal_lm, features=_packed_lm, baselines=_lm_baselines,
        generation=sample_text,
    ),
    Task.MASKED_LM: TrainingTask(
        data="lm", fields=("text",), objective=objectives.masked_lm, features=_masked_lm,
        baselines=_masked_lm_baselines,
    ),
    Task.SEQ2SEQ: TrainingTask(
        data="translation", fields=("source", "target"), objective=objectives.seq2seq, features=_seq2seq,
        baselines=_translation_baselines, generation=translation_bleu,
    ),
    Task.CLASSIFICATION: TrainingTask(
        data="classification", fields=("text", "label"), objective=objectives.classification,
        features=_classification, baselines=_classification_baselines, token_level=False,
    ),
}


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class TaskData:
    """A run's examples as features, with what a trained model must beat on the validation split:
    unigram_loss (causal LM: context-free token frequencies), majority_accuracy (classification:
    the best constant answer), copy_bleu (seq2seq: the source copied as its translation)."""

    train: Split
    validation: Split | None
    validation_examples: list[dict]
    baselines: dict[str, float]


def load_examples(config: TrainConfig, split: str) -> list[dict]:
    """The examples of one split, from the configured files (`train_files`, `validation_files`) or,
    where the split has none, the named data set."""
    kind, fields = TASKS[config.task].data, TASKS[config.task].fields
    files = config.train_files if split == "train" else config.validation_files
    if files:
        if config.file_format == FileFormat.TEXT and kind == "lm":
            return data_lib.read_text(files)
        if config.file_format == FileFormat.LINES and kind == "lm":
            return data_lib.read_text(files, one_document_per_line=True)
        if config.file_format == FileFormat.JSONL:
            return data_lib.read_jsonl(files, fields)
        if config.file_format == FileFormat.TSV and kind != "lm":
            return data_lib.read_tsv(files, fields)
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


def load_splits(config: TrainConfig) -> tuple[list[dict], list[dict], list[str]]:
    """(training examples, validation examples, label names): labels as ids 0..n-1 for
    classification (names from the data set, or the sorted labels seen), no names otherwise."""
    train = load_examples(config, "train")
    validation = load_examples(config, "validation") if (config.validation_files or not config.train_files) else []
    if "label" not in TASKS[config.task].fields:
        return train, validation, []
    spec = datasets.DATASETS.get(config.dataset) if not config.train_files else None
    train, names = data_lib.encode_labels(train, spec.label_names if spec else None)
    validation, _ = data_lib.encode_labels(validation, names)
    return train, validation, names


def task_data(config: TrainConfig, tokenizer: Tokenizer, train: list[dict], validation: list[dict]) -> TaskData:
    """Turns raw examples into the task's fixed-shape features, and measures the baselines."""
    task = TASKS[config.task]
    train_split = task.features(train, tokenizer, config)
    if not validation:
        return TaskData(train_split, None, validation, {})
    validation_split = task.features(validation, tokenizer, config)
    baselines = task.baselines(config, train_split, validation_split, validation)
    return TaskData(train_split, validation_split, validation, baselines)


def init_source(init_from: str) -> pathlib.Path:
    """The directory `init_from` names: a run directory of this project (config.yaml), a Hugging
    Face checkpoint directory (config.json), or a named published checkpoint
    (`transformer.pretrained.CHECKPOINTS`), fetched on first use."""
    path = pathlib.Path(init_from)
    if (path / "config.yaml").is_file() or (path / "config.json").is_file():
        return path
    if init_from in CHECKPOINTS:
        return pretrained_checkpoint(init_from)
    named = ", ".join(sorted(CHECKPOINTS))
    if len(path.parts) == 1 and not path.exists():  # a bare name, not a folder
        raise ValueError(
            f"init_from={init_from!r} is neither a directory nor a named checkpoint; the named ones are: {named}. "
            "Or point init_from at a run directory (config.yaml) or a Hugging Face checkpoint directory (config.json)."
        )
    raise FileNotFoundError(
        f"init_from={path}: no config.yaml (a run directory) or config.json (a Hugging Face checkpoint) there. "
        f"Point init_from at the run directory of a finished pretraining run (e.g. train bert-tiny-mlm first: "
        f"python -m train bert-tiny-mlm), a Hugging Face checkpoint directory, or a named checkpoint ({named})."
    )


# The files a tokenizer is read from, and the configs beside them that name its special tokens
# (transformer.tokenizer `Tokenizer.load`).
TOKENIZER_MODELS = tuple(name for names, _ in DIRECTORY_FILES for name in names)
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json")


def _tokenizer_source(config: TrainConfig) -> pathlib.Path | None:
    """Where the run's tokenizer comes from: a sentencepiece .model file (copied as it is), a
    directory or tokenizer.json (opened and saved into the run directory), or None (trained)."""
    if config.init_from:
        source = init_source(config.init_from)
        own_model = (source / "config.yaml").is_file() and (source / "tokenizer.model").is_file()
        return source / "tokenizer.model" if own_model else source  # a checkpoint's: with its configs
    return pathlib.Path(config.tokenizer) if config.tokenizer else None


def _tokenizer_digest(source: pathlib.Path) -> str:
    """One digest of the tokenizer files at `source` (a directory, or a file and the configs beside it)."""
    folder, models = (source, TOKENIZER_MODELS) if source.is_dir() else (source.parent, (source.name,))
    digest = hashlib.sha256()
    for name in sorted({*models, *TOKENIZER_CONFIGS}):
        if (folder / name).is_file():
            digest.update(f"{name} {sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()


def _tokenizer_origin(config: TrainConfig, source: pathlib.Path | None, training_data: str) -> dict[str, Any]:
    """What the run's tokenizer is made from: a copied .model file's digest; a checkpoint's
    (`init_from` or `tokenizer` as given) and the digest of its tokenizer files; or the training
    data's digest (`rundir.sha256_json` of the examples) and the settings."""
    if source is not None and source.suffix == ".model":
        Tokenizer.load(source)  # a clear error when it is missing or not a sentencepiece model
        return {"copied_from": sha256_file(source)}
    if source is not None:
        return {"copied_from": config.init_from or config.tokenizer, "files": _tokenizer_digest(source)}
    return {
        "trained_on": training_data, "vocab_size": config.model.vocab_size,
        "model_type": config.tokenizer_model_type, "seed": config.seed,
    }


def prepare_tokenizer(
    config: TrainConfig, run_dir: pathlib.Path, train: list[dict], training_data: str, artefacts: rundir.Artefacts,
    resuming: bool = False,
) -> Tokenizer:
    """The run's tokenizer: already in the run directory (made from the same origin), copied from
    `init_from` or `tokenizer`, or trained on the training texts with model.vocab_size pieces.
    A sentencepiece model is the file tokenizer.model; a checkpoint's tokenizer is saved with
    `Tokenizer.save` (tokenizer.json or spiece.model, and tokenizer_config.json). Either way
    `Tokenizer.load(run_dir)` opens it.

    Process 0 makes it in a temporary folder and records its origin and sha256 before moving
    it into place, so a run killed half-way leaves no tokenizer, and one made from other data or
    settings, or edited since, is refused rather than reused. A run resumed keeps the tokenizer
    it copied from `init_from` (which is not read again, and may be gone).
    """
    if resuming and config.init_from and any((run_dir / n).exists() and n in artefacts.records for n in TOKENIZER_MODELS):
        runs.check_unchanged(run_dir, artefacts.records)
        return Tokenizer.load(run_dir)
    source = _tokenizer_source(config)
    origin = _tokenizer_origin(config, source, training_data)
    for name in TOKENIZER_MODELS:  # one of another kind, left by an earlier attempt, is refused (not shadowed)
        artefacts.check(name, origin)
    if source is not None and source.suffix != ".model":
        _save_tokenizer(Tokenizer.load(source), run_dir, origin, artefacts)
    else:
        _make_sentencepiece(config, source, run_dir, train, origin, artefacts)
    sync("tokenizer")
    tokenizer = Tokenizer.load(run_dir)
    tokenizer.check_compatible(config.model)
    if tokenizer.vocab_size != config.model.vocab_size and not config.init_from:  # only checkpoints pad rows
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{config.model.vocab_size}: the rows past its ids would never be trained. Set "
            f"model.vocab_size={tokenizer.vocab_size} (or use a tokenizer with {config.model.vocab_size} pieces)."
        )
    return tokenizer


def _make_sentencepiece(config, source, run_dir, train, origin, artefacts) -> None:
    """tokenizer.model: the `source` file copied, or trained on the training texts."""
    path = run_dir / "tokenizer.model"
    if artefacts.check(path.name, origin) or jax.process_index() != 0:
        return
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        made = pathlib.Path(tmp) / path.name
        if source is not None:
            shutil.copyfile(source, made)
        else:
            corpus = pathlib.Path(tmp) / "corpus.txt"
            texts = [e[key] for e in train for key in ("text", "source", "target") if key in e]
            corpus.write_text("\n".join(texts), encoding="utf-8")
            try:
                Tokenizer.train(
                    [corpus], config.model.vocab_size, model_prefix=made.with_suffix(""),
                    model_type=config.tokenizer_model_type, seed=config.seed,
                )
            except TrainingFailed as error:  # its message names the temporary corpus: name the run's data
                data = ", ".join(config.train_files) or f"dataset={config.dataset}"
                raise ValueError(
                    f"No {config.model.vocab_size}-piece tokenizer can be trained on the training texts ({data}): "
                    f"{error.reason}. Lower model.vocab_size, or give tokenizer=FILE."
                ) from None
            made.with_suffix(".vocab").replace(path.with_suffix(".vocab"))
        artefacts.record(path.name, origin, made)
        made.replace(path)


def _save_tokenizer(tokenizer: Tokenizer, run_dir: pathlib.Path, origin: dict, artefacts: rundir.Artefacts) -> None:
    """The files `tokenizer.save` writes, each recorded with `origin`, moved into the run directory."""
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        made = tokenizer.save(pathlib.Path(tmp))
        names = sorted(file.name for file in made.iterdir())
        present = [artefacts.check(name, origin) for name in names]  # every one checked: a mismatch is an error
        if all(present) or jax.process_index() != 0:
            return
        for name in names:
            artefacts.record(name, origin, made / name)
        for name in names:
            (made / name).replace(run_dir / name)


def sync(name: str) -> None:
    """A barrier across the processes of a multi-host run (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
