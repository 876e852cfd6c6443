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

import collections
import dataclasses
import functools
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
from train import datasets, objectives, rundir, squad
from train.config import FileFormat, TrainConfig
from transformer import runs
from transformer.decoding import GenerationConfig, generate
from transformer.files import sha256_file
from transformer.models import best_spans
from transformer.pretrained import CHECKPOINTS, pretrained_checkpoint
from transformer.sampler import Sampler
from transformer.tasks import Task
from transformer.tokenizer import DIRECTORY_FILES, Tokenizer, TrainingFailed


@dataclasses.dataclass(frozen=True)
class Split:
    """The features of one split: a grain dataset; for masked LM and span corruption a
    per-example random map (masking drawn per example and epoch) and the tokens a context-free
    model is measured on (masked LM: the text's, whose tokens are masked uniformly; span
    corruption: the targets, each row corrupted once); `rows` is the packed stream of a causal LM split."""

    dataset: grain.MapDataset
    random_map: Callable[[int, np.random.Generator], dict] | None = None
    rows: Any = None
    unigram_tokens: np.ndarray | None = None
    word_tags: dict[str, str] | None = None  # token classification: each word's most frequent tag
    windows: squad.QuestionWindows | None = None  # question answering: its rows, to read answers back from


@dataclasses.dataclass(frozen=True)
class TrainingTask:
    data: str  # the kind of data it reads (train.datasets' task): "lm", "classification", "translation", ...
    fields: tuple[str, ...]  # the fields of an example in a JSONL or TSV file
    objective: objectives.Objective
    features: Callable[[list[dict], Tokenizer, TrainConfig], Split]
    baselines: Callable[[TrainConfig, Split, Split, list[dict]], dict[str, float]]  # (.., train, validation, its examples)
    token_level: bool = True  # loss per token (perplexity is reported); else per example
    generation: Callable | None = None  # (config, model, params, tokenizer, TaskData) -> (metrics, text)


# ----------------------------------------------------------------------------- features


def _packed_lm(examples, tokenizer, config) -> Split:
    rows = data_lib.PackedLM(examples, tokenizer, config.seq_length)
    return Split(grain.MapDataset.source(rows), rows=rows)


def _masked_lm(examples, tokenizer, config) -> Split:
    pairs = (data_lib.Pairs.NEXT_SENTENCE if config.next_sentence_prediction
             else data_lib.Pairs.SENTENCE_ORDER if config.sentence_order_prediction else data_lib.Pairs.NONE)
    mlm = data_lib.MaskedLMExamples(examples, tokenizer, config.seq_length, pairs=pairs,
                                    across_documents=config.full_sentences, span_masking=config.span_masking)
    return Split(grain.MapDataset.range(len(mlm)), random_map=lambda index, rng: mlm.example(int(index), rng),
                 unigram_tokens=mlm.text_tokens())


def _seq2seq(examples, tokenizer, config) -> Split:
    return Split(grain.MapDataset.source(examples).map(
        lambda e: data_lib.seq2seq_features(e, tokenizer, config.source_length, config.seq_length)
    ))


def _span_corruption(examples, tokenizer, config) -> Split:
    rows = data_lib.SpanCorruptionExamples(
        examples, tokenizer, config.source_length, noise_density=config.noise_density,
        mean_span_length=config.mean_span_length,
    )
    return Split(grain.MapDataset.range(len(rows)), random_map=lambda index, rng: rows.example(int(index), rng),
                 unigram_tokens=rows.target_tokens(config.seed))


def _token_classification(examples, tokenizer, config) -> Split:
    counts = collections.defaultdict(collections.Counter)
    for example in examples:
        for word, tag in zip(example["words"], example["tags"]):
            counts[word][tag] += 1
    return Split(grain.MapDataset.source(examples).map(
        lambda e: data_lib.token_classification_features(e, tokenizer, config.seq_length)
    ), word_tags={word: tags.most_common(1)[0][0] for word, tags in counts.items()})


def _question_answering(examples, tokenizer, config) -> Split:
    windows = squad.QuestionWindows(examples, tokenizer, config.seq_length, doc_stride=config.doc_stride,
                                    max_question_length=config.max_question_length,
                                    token_types=config.model.type_vocab_size > 1)
    return Split(grain.MapDataset.source(windows), windows=windows)


def _classification(examples, tokenizer, config) -> Split:
    decoder, token_types = not config.model.num_encoder_layers, config.model.type_vocab_size > 1
    return Split(grain.MapDataset.source(examples).map(
        lambda e: data_lib.classification_features(e, tokenizer, config.seq_length, decoder=decoder,
                                                   token_types=token_types)
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


def majority_accuracy(validation: list[dict], key: str = "label") -> float:
    """The validation accuracy of the best constant answer: the share of the most common value
    of `key` (the label; the target text of a text-to-text task)."""
    return collections.Counter(e[key] for e in validation).most_common(1)[0][1] / len(validation)


def copy_bleu(examples: list[dict]) -> float:
    """Corpus BLEU (sacrebleu) of each source copied as its own translation."""
    import sacrebleu

    return sacrebleu.corpus_bleu([e["source"] for e in examples], [[e["target"] for e in examples]]).score


def _lm_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    loss = unigram_loss(predicted_tokens(train.rows), predicted_tokens(validation.rows), config.model.vocab_size)
    return {"unigram_loss": loss, "unigram_nats_per_char": loss * validation.rows.tokens_per_character}


def _unigram_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    """The unigram loss of the split's `unigram_tokens` (masked LM: the text; span corruption: the targets)."""
    return {"unigram_loss": unigram_loss(train.unigram_tokens, validation.unigram_tokens, config.model.vocab_size)}


def _tagging_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    """The entity F1 of tagging each word with its most frequent training tag (O if unseen): what
    memorising the training entities scores."""
    from seqeval.metrics import f1_score

    guesses = [[train.word_tags.get(word, "O") for word in e["words"]] for e in examples]
    return {"memorised_entity_f1": f1_score([e["tags"] for e in examples], guesses)}


def _text_to_text_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    return {"majority_exact_match": majority_accuracy(examples, key="target")}


def _translation_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    examples = examples[: config.bleu_examples]
    return {"copy_bleu": copy_bleu(examples)} if examples else {}


def _classification_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    return {"majority_accuracy": majority_accuracy(examples)}


def _question_answering_baselines(config, train: Split, validation: Split, examples) -> dict[str, float]:
    """The scores of answering with the context's sentence that shares the most words with the question."""
    scores = squad.squad_scores(examples, squad.overlap_sentence_answers(examples))
    return {f"overlap_sentence_{name}": value for name, value in scores.items()}


# ----------------------------------------------------------------------------- generation at evaluation


def sample_text(config: TrainConfig, model, params, tokenizer: Tokenizer, data: TaskData) -> tuple[dict, str]:
    """`sample_prompt` and a short continuation of it (top-k sampling, fixed seed)."""
    prompt_length = len(tokenizer.encode(config.sample_prompt)) or 1
    new_tokens = min(config.sample_tokens, config.model.max_length - prompt_length)
    if new_tokens < 1:
        return {}, ""
    continuation = Sampler(model, params, tokenizer)(
        config.sample_prompt, max_new_tokens=new_tokens, strategy="sample", temperature=0.8, top_k=40, seed=config.seed
    )
    return {}, config.sample_prompt + continuation


def translation_bleu(config: TrainConfig, model, params, tokenizer: Tokenizer, data: TaskData) -> tuple[dict, str]:
    """Corpus BLEU (sacrebleu) of the translations of the first `bleu_examples` validation pairs:
    greedy ("bleu") and, with `bleu_beams` > 0, beam search scoring sum(log p) / length**0.6
    ("bleu_beam"; the 2017 recipe's alpha, on this library's length penalty rather than GNMT's);
    and the first pair with its greedy translation."""
    import sacrebleu

    examples = data.validation_examples[: config.bleu_examples]
    if not examples:
        return {}, ""
    searches = {"bleu": GenerationConfig(max_new_tokens=config.seq_length)}
    if config.bleu_beams:
        searches["bleu_beam"] = searches["bleu"].replace(strategy="beam", num_beams=config.bleu_beams, length_penalty=0.6)
    references = [[e["target"] for e in examples]]
    translations = {name: _translations(config, model, params, tokenizer, examples, search)
                    for name, search in searches.items()}
    metrics = {name: sacrebleu.corpus_bleu(hypotheses, references).score for name, hypotheses in translations.items()}
    return metrics, f"{examples[0]['source']} -> {translations['bleu'][0]}"


def exact_match(config: TrainConfig, model, params, tokenizer: Tokenizer, data: TaskData) -> tuple[dict, str]:
    """The share of validation examples whose greedy output is their target text (surrounding
    whitespace aside): a text-to-text task's accuracy, over the first `eval_batches` batches of
    them (0: all); and the first example with its output."""
    examples = data.validation_examples[: config.eval_batches * config.batch_size or None]
    outputs = _translations(config, model, params, tokenizer, examples, GenerationConfig(max_new_tokens=config.seq_length))
    matches = [output.strip() == e["target"].strip() for output, e in zip(outputs, examples)]
    return {"exact_match": float(np.mean(matches))}, f"{examples[0]['source']} -> {outputs[0]}"


def entity_scores(config: TrainConfig, model, params, tokenizer: Tokenizer, data: TaskData) -> tuple[dict, str]:
    """Entity-level precision, recall and F1 (seqeval) of every validation sentence's predicted
    tags, each word's the argmax at its first piece (words cut off by seq_length predicted O); and
    the first sentence's predicted entities."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    examples, names = data.validation_examples, data.label_names
    predicted = []
    for start in range(0, len(examples), config.batch_size):
        rows = [data_lib.token_classification_features(e, tokenizer, config.seq_length)
                for e in examples[start : start + config.batch_size]]
        fill = [rows[0]] * (config.batch_size - len(rows))  # one batch shape: one compiled program
        tokens, segment_ids = (np.stack([r[key] for r in rows + fill]) for key in ("tokens", "segment_ids"))
        best = np.asarray(_token_logits(model, nn.meta.unbox(params), tokens, segment_ids)).argmax(-1)
        for row, labels, example in zip(rows, best, examples[start:]):
            tags = [names[i] for i in labels[row["weights"] > 0]]
            predicted.append(tags + ["O"] * (len(example["words"]) - len(tags)))
    gold = [e["tags"] for e in examples]
    metrics = {name: score(gold, predicted, zero_division=0) for name, score in
               (("entity_precision", precision_score), ("entity_recall", recall_score), ("entity_f1", f1_score))}
    words = examples[0]["words"]
    entities = "; ".join(f"{kind} {' '.join(words[a : b + 1])}" for kind, a, b in get_entities(predicted[0]))
    return metrics, f"{' '.join(words)} -> {entities or 'no entities'}"


def squad_answers(config: TrainConfig, model, params, tokenizer: Tokenizer, data: TaskData) -> tuple[dict, str]:
    """SQuAD's exact match and F1 of the validation questions' answers (each the best span over
    its windows, at most `max_answer_length` pieces), over the first `eval_batches` batches of
    questions (0: all); and the first question with its answer."""
    windows = data.validation.windows
    questions = data.validation_examples[: config.eval_batches * config.batch_size or None]
    count, batch = int(np.searchsorted(windows.rows["example"], len(questions))), config.batch_size
    filler = -count % batch  # rows of zeros: one batch shape, one compiled program

    def column(key, dtype):
        values = windows.rows[key][:count].astype(dtype)
        return np.concatenate([values, np.zeros((filler, *values.shape[1:]), dtype)])

    inputs = {key: column(key, dtype) for key, dtype in (("tokens", np.int32), ("token_types", np.int32),
                                                          ("segment_ids", np.int32), ("context", bool),
                                                          ("max_context", bool))}
    spans = [_answer_spans(model, nn.meta.unbox(params), {k: v[i : i + batch] for k, v in inputs.items()},
                           config.max_answer_length) for i in range(0, count + filler, batch)]
    starts, ends, scores = (np.concatenate(parts)[:count] for parts in zip(*spans))
    answers = squad.answer_texts(windows, starts, ends, scores)
    return squad.squad_scores(questions, answers), f"{questions[0]['question']} -> {answers[0]}"


@functools.partial(jax.jit, static_argnums=(0, 3))
def _answer_spans(model, params, inputs, max_length):
    """Each row's best answer span in its context, starting where the row has the most context
    around the start (BERT's rule): start, end [B] and score [B]."""
    start_logits, end_logits = model.apply({"params": params}, inputs["tokens"], token_types=inputs["token_types"],
                                           segment_ids=inputs["segment_ids"])
    return best_spans(start_logits, end_logits, inputs["context"], max_length=max_length, starts=inputs["max_context"])


@functools.partial(jax.jit, static_argnums=0)
def _token_logits(model, params, tokens, segment_ids):
    """A token classifier's logits, compiled once per model (and batch shape) for every evaluation."""
    return model.apply({"params": params}, tokens, segment_ids=segment_ids)


def _translations(config: TrainConfig, model, params, tokenizer: Tokenizer, examples, search) -> list[str]:
    """The decoded outputs of `search` for each example's source (truncated to source_length)."""
    variables = {"params": nn.meta.unbox(params)}
    search = search.replace(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, bos_id=tokenizer.decoder_start_id)
    sources = [tokenizer.encode(e["source"])[: config.source_length - 1] + [tokenizer.eos_id] for e in examples]
    outputs = []
    for start in range(0, len(sources), config.batch_size):
        output = generate(model, variables, sources[start : start + config.batch_size], search)
        tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
        outputs += [tokenizer.decode(t[:n]) for t, n in zip(tokens, lengths)]
    return outputs


TASKS: dict[Task, TrainingTask] = {
    Task.CAUSAL_LM: TrainingTask(
        data="lm", fields=("text",), objective=objectives.causal_lm, features=_packed_lm, baselines=_lm_baselines,
        generation=sample_text,
    ),
    Task.MASKED_LM: TrainingTask(
        data="lm", fields=("text",), objective=objectives.masked_lm, features=_masked_lm,
        baselines=_unigram_baselines,
    ),
    Task.SEQ2SEQ: TrainingTask(
        data="translation", fields=("source", "target"), objective=objectives.seq2seq, features=_seq2seq,
        baselines=_translation_baselines, generation=translation_bleu,
    ),
    Task.CLASSIFICATION: TrainingTask(
        data="classification", fields=("text", "label"), objective=objectives.classification,
        features=_classification, baselines=_classification_baselines, token_level=False,
    ),
    Task.PAIR_CLASSIFICATION: TrainingTask(
        data="pair_classification", fields=("text", "text_pair", "label"), objective=objectives.classification,
        features=_classification, baselines=_classification_baselines, token_level=False,
    ),
    Task.SPAN_CORRUPTION: TrainingTask(
        data="lm", fields=("text",), objective=objectives.seq2seq, features=_span_corruption,
        baselines=_unigram_baselines,
    ),
    Task.TOKEN_CLASSIFICATION: TrainingTask(
        data="token_classification", fields=("words", "tags"), objective=objectives.classification,
        features=_token_classification, baselines=_tagging_baselines, generation=entity_scores,
    ),
    Task.QUESTION_ANSWERING: TrainingTask(
        data="question_answering", fields=("question", "context", "answers"), objective=objectives.question_answering,
        features=_question_answering, baselines=_question_answering_baselines, token_level=False,
        generation=squad_answers,
    ),
    Task.DISTILLATION: TrainingTask(  # the teacher and the loss weights are bound by the job (train.loop)
        data="lm", fields=("text",), objective=objectives.distillation, features=_masked_lm,
        baselines=_unigram_baselines,
    ),
    # Read as classification data: load_splits writes each label as its name, the target text.
    Task.TEXT_TO_TEXT: TrainingTask(
        data="classification", fields=("text", "label"), objective=objectives.seq2seq, features=_seq2seq,
        baselines=_text_to_text_baselines, generation=exact_match,
    ),
}


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class TaskData:
    """A run's examples as features, with what a trained model must beat on the validation split:
    unigram_loss (causal and masked LM, span corruption: context-free token frequencies),
    majority_accuracy and majority_exact_match (classification, text-to-text: the best constant
    answer), copy_bleu (seq2seq: the source copied as its translation), memorised_entity_f1
    (token classification: each word's most frequent training tag); and the label names."""

    train: Split
    validation: Split | None
    validation_examples: list[dict]
    baselines: dict[str, float]
    label_names: list[str] = dataclasses.field(default_factory=list)


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
        if config.file_format == FileFormat.CONLL and kind == "token_classification":
            return data_lib.read_conll(files)
        if config.file_format == FileFormat.SQUAD and kind == "question_answering":
            return squad.read_squad(files)
        if config.file_format == FileFormat.JSONL and kind not in ("token_classification", "question_answering"):
            return data_lib.read_jsonl(files, fields)
        if config.file_format == FileFormat.TSV and kind not in ("lm", "question_answering"):
            return data_lib.read_tsv(files, fields)
        raise ValueError(
            f"file_format={config.file_format} cannot hold {kind} data for task={config.task}: use text, lines or "
            "jsonl for language modelling, tsv or jsonl for classification (text, label; pairs: text, text_pair, "
            "label) and translation (source, target), conll for token classification, squad for question answering."
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
    classification (names from the data set, or the sorted labels seen), each word's tag as an
    id for token classification ("O" and the sorted tags of the training data), no names otherwise."""
    train = load_examples(config, "train")
    validation = load_examples(config, "validation") if (config.validation_files or not config.train_files) else []
    if "tags" in TASKS[config.task].fields:
        train, names = data_lib.encode_tags(train)
        return train, data_lib.encode_tags(validation, names)[0], names
    if "label" not in TASKS[config.task].fields:
        return train, validation, []
    spec = datasets.DATASETS.get(config.dataset) if not config.train_files else None
    train, names = data_lib.encode_labels(train, spec.label_names if spec else None)
    validation, _ = data_lib.encode_labels(validation, names)
    if config.task == Task.TEXT_TO_TEXT:  # the label written as its name: the target text
        train, validation = ([{"source": e["text"], "target": names[e["label"]]} for e in split]
                             for split in (train, validation))
        return train, validation, []
    return train, validation, names


def task_data(
    config: TrainConfig, tokenizer: Tokenizer, train: list[dict], validation: list[dict], label_names: list[str] = (),
) -> TaskData:
    """Turns raw examples into the task's fixed-shape features, and measures the baselines."""
    task = TASKS[config.task]
    train_split = task.features(train, tokenizer, config)
    if not validation:
        return TaskData(train_split, None, validation, {}, list(label_names))
    validation_split = task.features(validation, tokenizer, config)
    baselines = task.baselines(config, train_split, validation_split, validation)
    return TaskData(train_split, validation_split, validation, baselines, list(label_names))


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
    if config.start_from:
        source = init_source(config.start_from)
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
        return {"copied_from": config.start_from or config.tokenizer, "files": _tokenizer_digest(source)}
    sentinels = {"extra_ids": config.tokenizer_extra_ids} if config.tokenizer_extra_ids else {}
    return {
        "trained_on": training_data, "vocab_size": config.model.vocab_size,
        "model_type": config.tokenizer_model_type, "seed": config.seed, **sentinels,
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
    if resuming and config.start_from and any((run_dir / n).exists() and n in artefacts.records for n in TOKENIZER_MODELS):
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
    if tokenizer.vocab_size != config.model.vocab_size and not config.start_from:  # only checkpoints pad rows
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{config.model.vocab_size}: the rows past its ids would never be trained. Set "
            f"model.vocab_size={tokenizer.vocab_size} (or use a tokenizer with {config.model.vocab_size} pieces)."
        )
    return tokenizer


def _make_sentencepiece(config, source, run_dir, train, origin, artefacts) -> None:
    """tokenizer.model: the `source` file copied, or trained on the training texts. One trained
    with sentinels (`tokenizer_extra_ids`) is saved as spiece.model and the tokenizer_config.json
    that records them."""
    name = "spiece.model" if config.tokenizer_extra_ids else "tokenizer.model"
    if artefacts.check(name, origin) or jax.process_index() != 0:
        return
    path = run_dir / name
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        made = pathlib.Path(tmp) / path.name
        if source is not None:
            shutil.copyfile(source, made)
        else:
            trained = _train_sentencepiece(config, train, made)
            if config.tokenizer_extra_ids:
                return _save_tokenizer(trained, run_dir, origin, artefacts)
            made.with_suffix(".vocab").replace(path.with_suffix(".vocab"))
        artefacts.record(path.name, origin, made)
        made.replace(path)


def _train_sentencepiece(config, train, made: pathlib.Path) -> Tokenizer:
    """A tokenizer of model.vocab_size ids (`tokenizer_extra_ids` of them sentinels) trained on
    the training texts, written to `made` (and its .vocab beside it)."""
    corpus = made.with_name("corpus.txt")
    texts = [e[key] for e in train for key in ("text", "text_pair", "source", "target", "question") if key in e]
    texts += dict.fromkeys(e["context"] for e in train if "context" in e)  # once, not once per question
    texts += [" ".join(e["words"]) for e in train if "words" in e]  # encoded word by word: one "▁" each
    corpus.write_text("\n".join(texts), encoding="utf-8")
    try:
        return Tokenizer.train(
            [corpus], config.model.vocab_size, model_prefix=made.with_suffix(""),
            model_type=config.tokenizer_model_type, seed=config.seed, extra_ids=config.tokenizer_extra_ids,
        )
    except TrainingFailed as error:  # its message names the temporary corpus: name the run's data
        data = ", ".join(config.train_files) or f"dataset={config.dataset}"
        raise ValueError(
            f"No {config.model.vocab_size}-piece tokenizer can be trained on the training texts ({data}): "
            f"{error.reason}. Lower model.vocab_size, or give tokenizer=FILE."
        ) from None


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
