"""Data: sources -> tokenized features -> deterministic, resumable, per-process batches.

Sources give lists of example dicts: {"text"} for documents, {"text", "label"} for
classification, {"source", "target"} for translation. Task pipelines turn them into
fixed-shape numpy features (all int32 unless noted):

    causal LM       tokens, targets, segment_ids, positions, weights (float32)      [T]
    masked LM       tokens, token_types, segment_ids, targets, weights (float32)    [T]
                    (+ nsp_labels [], 0 = B follows A, 1 = B is random)
    seq2seq         source, source_segment_ids [S]; target_in, target_segment_ids,
                    targets, weights (float32) [T]
    classification  tokens, segment_ids [T]; labels [], weights (float32) []

Segment ids are 0 on padding; weights are 0 wherever no loss is taken. `batches` shuffles
(reshuffling every epoch), repeats, gives each process its share of every global batch and
returns a grain iterator whose `get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pathlib
from typing import Iterable, Sequence

import grain
import numpy as np

from transformer.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- sources


def _read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 file (without line ends); empty or undecodable files are errors."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"Data file {path} is a directory; list the files in it instead ([{path}/a.txt, ...]).")
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: bytes that are not UTF-8 ({error.reason}); re-encode the file as UTF-8.")
    if not text.strip():
        raise ValueError(f"Data file {path} is empty.")
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # only \n ends a line
    return lines[:-1] if lines[-1] == "" else lines


def read_text(paths: Iterable[str | os.PathLike], *, one_document_per_line: bool = False) -> list[dict]:
    """Plain text files -> [{"text"}]: a document per file, or per non-empty line."""
    examples = []
    for path in paths:
        lines = _read_lines(path)
        if one_document_per_line:
            examples.extend({"text": line} for line in lines if line.strip())
        else:
            examples.append({"text": "\n".join(lines)})
    return examples


def _check_type(value, field: str, where: str) -> None:
    """A JSONL value must be a string; a label may also be an integer (a class id)."""
    if isinstance(value, str) or (field == "label" and isinstance(value, int) and not isinstance(value, bool)):
        return
    expected = "a string or an integer" if field == "label" else "a string"
    raise ValueError(f"{where}: field {field!r} must be {expected}, got {json.dumps(value)[:60]}.")


def read_jsonl(paths: Iterable[str | os.PathLike], fields: Sequence[str] = ("text",)) -> list[dict]:
    """JSON-lines files -> [{field: value}] for the named fields (each present; strings, a label also an int)."""
    examples = []
    for path in paths:
        for number, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {', '.join(map(repr, missing))}.")
            for field in fields:
                _check_type(record[field], field, f"{path}:{number}")
            examples.append({f: record[f] for f in fields})
    return examples


def read_tsv(paths: Iterable[str | os.PathLike], columns: Sequence[str] = ("text", "label")) -> list[dict]:
    """Tab-separated files -> [{column: value}]; every row must have exactly len(columns) fields."""
    examples = []
    for path in paths:
        for number, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            values = line.split("\t")
            if len(values) != len(columns):
                raise ValueError(
                    f"{path}:{number}: {len(values)} tab-separated columns, expected {len(columns)} "
                    f"({', '.join(columns)})."
                )
            examples.append(dict(zip(columns, values)))
    return examples


def encode_labels(examples: list[dict], label_names: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Labels -> ids 0..n-1 and their names.

    With `label_names`, a label is one of the names, or already an id into names that are not
    numbers (0 and 1 for "neg" and "pos"; names "0", "2", "5" take the labels 0, 2, 5 only).
    Without, the sorted set of labels seen defines the names (integers sorted as numbers).
    A label outside the set is an error naming the example.
    """
    if label_names is None:
        seen = {e["label"] for e in examples}
        integers = all(isinstance(v, (int, np.integer)) for v in seen)
        label_names = [str(v) for v in sorted(seen, key=int if integers else str)]
    else:
        label_names = [str(name) for name in label_names]
    index = {name: i for i, name in enumerate(label_names)}
    ids_allowed = not all(name.lstrip("-").isdigit() for name in label_names)
    encoded = []
    for number, example in enumerate(examples):
        label = example["label"]
        if (str(label) not in index and ids_allowed and isinstance(label, (int, np.integer))
                and 0 <= label < len(label_names)):
            encoded.append(example)
            continue
        if str(label) not in index:
            raise ValueError(
                f"Example {number}: label {label!r} is not one of the labels {list(label_names)}."
            )
        encoded.append({**example, "label": index[str(label)]})
    return encoded, list(label_names)


# ----------------------------------------------------------------------------- features


def _pad(values: Sequence[int], length: int, fill: int = 0, dtype=np.int32) -> np.ndarray:
    out = np.full((length,), fill, dtype)
    out[: len(values)] = values[:length]
    return out


class PackedLM:
    """Causal-LM rows: documents joined with EOS (each starting with BOS where the tokenizer adds
    one, as a prompt does: Llama), cut into rows of `length` tokens.

    Row i holds stream[i*length : (i+1)*length] as inputs and the next tokens as targets.
    Each document in a row has its own segment id and positions counting from 0 (a document
    continued from the previous row counts from the row start), so attention never crosses
    documents and positions stay inside the model's position table; the target after a
    document's EOS (the next document's first token) has weight 0. A random-access sequence: `len()` rows, `[i]` a feature dict.
    """

    def __init__(self, documents: Sequence[dict], tokenizer: Tokenizer, length: int):
        if not documents:
            raise ValueError("No documents to pack.")
        encoded = tokenizer.encode_batch([d["text"] for d in documents])
        bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
        pieces = [np.asarray(bos + ids + [tokenizer.eos_id], np.int32) for ids in encoded]
        self.stream = np.concatenate(pieces)
        self.document = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
        self.length = length
        # predicted tokens (all but each document's first) per character of text (each EOS counted
        # as the character that ends a document): the loss per token times this is the loss per
        # character, comparable across tokenizers (each document's first token comes free)
        characters = sum(len(d["text"]) + 1 for d in documents)
        self.tokens_per_character = (len(self.stream) - len(documents)) / characters
        if len(self.stream) < length + 1:
            raise ValueError(f"The documents hold {len(self.stream)} tokens, fewer than one row of {length + 1}.")

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start, end = index * self.length, (index + 1) * self.length
        document = self.document[start:end]
        _, segment_ids = np.unique(document, return_inverse=True)  # 0, 1, ... in order of appearance
        starts = np.flatnonzero(np.diff(segment_ids, prepend=-1))
        positions = np.arange(self.length) - np.repeat(starts, np.diff(starts, append=self.length))
        return {
            "tokens": self.stream[start:end],
            "targets": self.stream[start + 1 : end + 1],
            "segment_ids": (segment_ids + 1).astype(np.int32),
            "positions": positions.astype(np.int32),
            "weights": (self.document[start + 1 : end + 1] == document).astype(np.float32),
        }


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    maskable: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    mask_rate: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: of the maskable tokens, `mask_rate` are chosen as targets; of those 80%
    become [MASK], 10% a random token from `random_ids`, 10% stay unchanged.

    tokens, maskable: [T]. Returns the corrupted tokens and the loss weights [T] (1 on chosen).
    """
    candidates = np.flatnonzero(maskable)
    num_chosen = min(len(candidates), max(1, int(round(mask_rate * len(candidates))))) if len(candidates) else 0
    chosen = rng.choice(candidates, size=num_chosen, replace=False)
    action = rng.random(num_chosen)
    corrupted = tokens.copy()
    corrupted[chosen[action < 0.8]] = mask_id
    randomised = chosen[(action >= 0.8) & (action < 0.9)]
    corrupted[randomised] = rng.choice(random_ids, size=len(randomised))
    weights = np.zeros(tokens.shape, np.float32)
    weights[chosen] = 1.0
    return corrupted, weights


@dataclasses.dataclass(frozen=True)
class _Chunk:
    document: int
    start: int  # first sentence
    end: int  # one past the last sentence


class Pairs(enum.StrEnum):
    """What a masked-LM row holds: one segment, or two and a label for the pair head."""

    NONE = "none"  # [CLS] A [SEP]
    NEXT_SENTENCE = "next_sentence"  # B follows A, or (label 1) comes from another document (BERT)
    SENTENCE_ORDER = "sentence_order"  # A and the chunk after it, swapped (label 1) half the time (ALBERT)


class MaskedLMExamples:
    """Masked-LM pretraining examples: [CLS] A [SEP] (B [SEP]), masked when indexed with an rng
    (so each row is masked anew every time it is read: RoBERTa's dynamic masking).

    Documents are split into sentences (non-empty lines), and sentences are grouped into
    chunks that fill the budget of segment A. Without `pairs` every chunk is a row;
    `across_documents` (RoBERTa's full sentences) packs sentences across document boundaries,
    with a [SEP] between documents. With pairs, the rows are the chunks that have a following
    chunk in their document; B is that chunk, and the label (1 half of the time, so both labels
    are equally likely in every row) replaces it by a chunk of another document (next sentence)
    or swaps A and B (sentence order).
    """

    def __init__(self, documents: Sequence[dict], tokenizer: Tokenizer, length: int, *, pairs: Pairs = Pairs.NONE,
                 across_documents: bool = False):
        self.tokenizer, self.length, self.pairs = tokenizer, length, Pairs(pairs)
        self.paired = self.pairs != Pairs.NONE
        if across_documents and self.paired:
            raise ValueError("Rows packed across documents hold one segment: they cannot be paired "
                             f"({self.pairs.value}).")
        shortest = 5 if self.paired else 3  # a token of text in each segment
        if length < shortest:
            layout = "[CLS] A [SEP] B [SEP]" if self.paired else "[CLS] A [SEP]"
            raise ValueError(f"A masked-LM row of {length} tokens holds no text: {layout} needs seq_length >= "
                             f"{shortest}.")
        self.sentences = _sentences(documents, tokenizer, across_documents)
        self.chunks = _chunks(self.sentences, (length - 3) // 2 if self.paired else length - 2)
        if not self.chunks:
            raise ValueError("No sentences to build masked-LM examples from.")
        if self.pairs == Pairs.NEXT_SENTENCE and len(self.chunks) < 3:
            raise ValueError(
                f"Next-sentence prediction needs at least 3 chunks of text to draw random pairs from, "
                f"got {len(self.chunks)}; use more text or next_sentence_prediction=False."
            )
        self._document_chunks = {}  # document -> (first chunk, one past its last chunk)
        for i, c in enumerate(self.chunks):
            first, _ = self._document_chunks.get(c.document, (i, i))
            self._document_chunks[c.document] = (first, i + 1)
        self.rows = [  # the chunk each row starts with (its segment A)
            i for i in range(len(self.chunks)) if not self.paired or self._has_follower(i)
        ]
        if not self.rows:
            raise ValueError(
                f"Sentence pairs ({self.pairs.value}) need a document of at least two chunks (a following chunk to "
                "pair with); every document here fits in one. Use longer documents, or no pairs."
            )
        special = np.zeros(tokenizer.vocab_size, bool)
        special[list(tokenizer.special_ids)] = True
        self.random_ids = np.flatnonzero(~special).astype(np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def text_tokens(self) -> np.ndarray:
        """Every token of the text (no separators): what the masked positions are drawn from."""
        special = list(self.tokenizer.special_ids)
        tokens = np.asarray([t for doc in self.sentences for ids in doc for t in ids], np.int32)
        return tokens[~np.isin(tokens, special)]

    def _has_follower(self, index: int) -> bool:
        return index + 1 < len(self.chunks) and self.chunks[index + 1].document == self.chunks[index].document

    def _random_chunk(self, index: int, rng: np.random.Generator) -> int:
        """A chunk from another document (as BERT does), or any chunk but A and its follower."""
        document = self.chunks[index].document
        first, last = self._document_chunks[document]
        if last - first < len(self.chunks):  # another document exists: skip this one's chunks
            other = int(rng.integers(len(self.chunks) - (last - first)))
            return other if other < first else other + (last - first)
        excluded = sorted({index, min(index + 1, len(self.chunks) - 1)})
        other = int(rng.integers(len(self.chunks) - len(excluded)))
        for e in excluded:
            other += other >= e
        return other

    def _ids(self, chunk: _Chunk) -> list[int]:
        return [t for ids in self.sentences[chunk.document][chunk.start : chunk.end] for t in ids]

    def _segments(self, chunk: int, rng: np.random.Generator) -> tuple[list[int], list[int], int]:
        """(A, B, label) of a paired row, the longer segment truncated until both fit."""
        label = int(rng.random() < 0.5)
        first, second = self._ids(self.chunks[chunk]), self._ids(self.chunks[chunk + 1])
        if label and self.pairs == Pairs.NEXT_SENTENCE:
            second = self._ids(self.chunks[self._random_chunk(chunk, rng)])
        elif label:
            first, second = second, first
        while len(first) + len(second) > self.length - 3:
            (first if len(first) >= len(second) else second).pop()
        return first, second, label

    def example(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        chunk = self.rows[index]
        features = {}
        if self.paired:
            first, second, label = self._segments(chunk, rng)
            ids = [tok.cls_id, *first, tok.sep_id, *second, tok.sep_id]
            token_types = [0] * (len(first) + 2) + [1] * (len(second) + 1)
            features["nsp_labels"] = np.int32(label)
        else:
            ids = [tok.cls_id, *self._ids(self.chunks[chunk])[: self.length - 2], tok.sep_id]
            token_types = [0] * len(ids)
        tokens = _pad(ids, self.length, tok.pad_id)
        maskable = ~np.isin(tokens, list(tok.special_ids))
        corrupted, weights = mask_tokens(tokens, rng, maskable=maskable, mask_id=tok.mask_id, random_ids=self.random_ids)
        features.update(
            tokens=corrupted,
            token_types=_pad(token_types, self.length),
            segment_ids=_pad([1] * len(ids), self.length),
            targets=tokens,
            weights=weights,
        )
        return features


def _sentences(documents: Sequence[dict], tokenizer: Tokenizer, across_documents: bool) -> list[list[list[int]]]:
    """Each document's sentences (non-empty lines) as token ids; `across_documents`: one document
    of them all, a [SEP] between two documents."""
    lines = [[line for line in d["text"].splitlines() if line.strip()] for d in documents]
    flat = tokenizer.encode_batch([s for doc in lines for s in doc])
    sentences, offset = [], 0
    for doc in lines:
        sentences.append(flat[offset : offset + len(doc)])
        offset += len(doc)
    if not across_documents:
        return sentences
    joined = [ids for doc in sentences for ids in [*doc, [tokenizer.sep_id]] if doc]
    return [joined[:-1]]


def _chunks(sentences: list[list[list[int]]], budget: int) -> list[_Chunk]:
    """Runs of whole sentences of a document, each within `budget` tokens (a longer sentence alone)."""
    chunks = []
    for d, doc in enumerate(sentences):
        start, size = 0, 0
        for i, ids in enumerate(doc):
            if size and size + len(ids) > budget:
                chunks.append(_Chunk(d, start, i))
                start, size = i, 0
            size += len(ids)
        if size:
            chunks.append(_Chunk(d, start, len(doc)))
    return chunks


def seq2seq_features(
    example: dict, tokenizer: Tokenizer, source_length: int, target_length: int
) -> dict[str, np.ndarray]:
    """Source + EOS; decoder input = the decoder start (BOS, or T5's pad) + target (teacher forcing),
    predicting target + EOS."""
    tok = tokenizer
    source = tok.encode(example["source"])[: source_length - 1] + [tok.eos_id]
    target = tok.encode(example["target"])[: target_length - 1] + [tok.eos_id]
    target_in = [tok.decoder_start_id] + target[:-1]
    return {
        "source": _pad(source, source_length, tok.pad_id),
        "source_segment_ids": _pad([1] * len(source), source_length),
        "target_in": _pad(target_in, target_length, tok.pad_id),
        "target_segment_ids": _pad([1] * len(target), target_length),
        "targets": _pad(target, target_length, tok.pad_id),
        "weights": _pad([1] * len(target), target_length, dtype=np.float32),
    }


def classification_features(example: dict, tokenizer: Tokenizer, length: int) -> dict[str, np.ndarray]:
    """[CLS] text [SEP], truncated to `length`, with its integer label."""
    tok = tokenizer
    ids = [tok.cls_id, *tok.encode(example["text"])[: length - 2], tok.sep_id]
    return {
        "tokens": _pad(ids, length, tok.pad_id),
        "segment_ids": _pad([1] * len(ids), length),
        "labels": np.int32(example["label"]),
        "weights": np.float32(1.0),
    }


# ----------------------------------------------------------------------------- batches


def _zeros_like(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in features.items()}


def batches(
    dataset: grain.MapDataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    random_map=None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """A resumable iterator over this process's part of every global batch.

    dataset: random-access features (`grain.MapDataset.source(...)` of a sequence, mapped).
    shuffle: a seeded permutation, different in every epoch; num_epochs None repeats forever.
    random_map: fn(features, np.random.Generator) applied after repetition, seeded per
        element and epoch (e.g. MLM masking: every epoch masks afresh, reproducibly).
    Global batch i is elements [i * global_batch_size, (i + 1) * global_batch_size) of the
    shuffled stream; process p gets every process_count-th of them, starting at p. With a
    finite number of epochs the stream is completed to whole global batches with all-zero
    (weight 0) features, so every process sees the same number of batches.
    The iterator's `get_state()` / `set_state()` resume exactly.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the {process_count} processes."
        )
    if len(dataset) == 0:
        raise ValueError("The data set is empty.")
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    if random_map is not None:
        dataset = dataset.random_map(random_map, seed=seed + 1)
    if num_epochs is not None and len(dataset) % global_batch_size:
        stream, filler = dataset, _zeros_like(dataset[0])
        padded_length = -(-len(stream) // global_batch_size) * global_batch_size
        dataset = grain.MapDataset.range(padded_length).map(lambda i: stream[i] if i < len(stream) else filler)
    local_batch = global_batch_size // process_count
    dataset = dataset[process_index::process_count].batch(local_batch, drop_remainder=True)
    return iter(dataset.to_iter_dataset())
