"""Data: sources -> tokenized features -> deterministic, resumable, per-process batches.

Sources give lists of example dicts: {"text"} for documents, {"text", "label"} for
classification, {"source", "target"} for translation. Task pipelines turn them into
fixed-shape numpy features (all int32 unless noted):

    causal LM       tokens, targets, segment_ids, positions, weights (float32)      [T]
    masked LM       tokens, token_types, segment_ids, targets, weights (float32)    [T]
                    (+ nsp_labels [], 0 = B follows A, 1 = B is random)
                    (+ span_boundaries [T, 3] with span masking: before, after, offset)
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
import re
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


IOB2_TAG = re.compile(r"O|[BI]-\S+")  # IOB2: outside, or the beginning or inside of an entity of a type


def parse_conll(lines: Iterable[str], where: str) -> list[dict]:
    """CoNLL column lines -> [{"words", "tags"}] sentences: the first column is the word, the last
    its IOB2 tag (O, B-TYPE, I-TYPE), columns between ignored; a blank line ends a sentence and
    -DOCSTART- lines are skipped (CoNLL-2003). A line of one column or another tag is an error
    naming `where` and the line."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(lines, start=1):
        columns = line.split()
        if columns and columns[0] == "-DOCSTART-":
            continue
        if not columns:
            if words:
                sentences.append({"words": words, "tags": tags})
            words, tags = [], []
            continue
        if len(columns) < 2:
            raise ValueError(f"{where}:{number}: {line.strip()!r} has one column; a CoNLL line is a word, "
                             "optional columns, and its tag.")
        if not IOB2_TAG.fullmatch(columns[-1]):
            raise ValueError(f"{where}:{number}: tag {columns[-1]!r} is not IOB2: use O, B-TYPE or I-TYPE.")
        words.append(columns[0])
        tags.append(columns[-1])
    return sentences + ([{"words": words, "tags": tags}] if words else [])


def read_conll(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """CoNLL column files (see `parse_conll`) -> [{"words", "tags"}], one per sentence."""
    return [sentence for path in paths for sentence in parse_conll(_read_lines(path), str(path))]


def encode_tags(examples: list[dict], tag_names: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Each sentence's tags as ids ("labels") into `tag_names` (by default "O" and the sorted tags
    seen); a tag outside them is an error naming the sentence."""
    if tag_names is None:
        tag_names = ["O", *sorted({t for e in examples for t in e["tags"]} - {"O"})]
    index = {name: i for i, name in enumerate(tag_names)}
    for number, example in enumerate(examples):
        unknown = sorted(set(example["tags"]) - set(index))
        if unknown:
            raise ValueError(f"Sentence {number} ({' '.join(example['words'])[:60]!r}): tag(s) {unknown} never occur "
                             f"in the training data, whose tags are {list(tag_names)}.")
    return [{**e, "labels": [index[t] for t in e["tags"]]} for e in examples], list(tag_names)


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


def pad(values: Sequence[int], length: int, fill: int = 0, dtype=np.int32) -> np.ndarray:
    """`values` then `fill` up to `length` (cut at `length`): one fixed-length feature row."""
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


def span_length_probabilities(p: float = 0.2, max_words: int = 10) -> np.ndarray:
    """SpanBERT's span lengths in words: Geometric(p) clipped at `max_words` (the tail beyond
    it dropped and the rest renormalised; mean 3.8 words at p = 0.2). [max_words], for 1..max_words."""
    probabilities = p * (1 - p) ** np.arange(max_words)
    return probabilities / probabilities.sum()


def mask_spans(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    maskable: np.ndarray,
    word_starts: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    mask_rate: float = 0.15,
    length_probabilities: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SpanBERT's masking: spans of whole words, until `mask_rate` of the maskable tokens are
    covered; each span all [MASK] (80%), all random tokens from `random_ids` (10%) or unchanged.

    A span starts at a random word not yet chosen and takes a length in words from
    `length_probabilities` (default `span_length_probabilities()`), stopping early at an
    unmaskable token, at a chosen word or once the coverage is reached, so the last span may
    pass `mask_rate` by less than one word. tokens, maskable (never the first or last token),
    word_starts (whether each token begins a word): [T]. Returns the corrupted tokens, the loss
    weights [T] (1 on chosen) and the span boundaries [T, 3]: for each chosen token the
    positions of the tokens just before and just after its span and its offset in the span (0
    elsewhere), the inputs of the span boundary objective.
    """
    if maskable[0] or maskable[-1]:
        raise ValueError("mask_spans needs an unmaskable first and last token ([CLS] ... [SEP] or padding): the "
                         "tokens just outside each span are its boundaries.")
    probabilities = span_length_probabilities() if length_probabilities is None else length_probabilities
    length = len(tokens)
    starts = np.flatnonzero(maskable & (word_starts | ~np.concatenate([[False], maskable[:-1]])))
    breaks = np.append(np.flatnonzero(word_starts | ~maskable), length)
    ends = breaks[np.searchsorted(breaks, starts, side="right")]  # one past each word
    budget = max(1, round(mask_rate * int(maskable.sum()))) if maskable.any() else 0  # as mask_tokens
    taken = np.zeros(len(starts), bool)  # per word
    corrupted, weights = tokens.copy(), np.zeros(length, np.float32)
    boundaries = np.zeros((length, 3), np.int32)
    covered = 0
    while covered < budget and not taken.all():
        first = last = int(rng.choice(np.flatnonzero(~taken)))
        words = 1 + int(rng.choice(len(probabilities), p=probabilities))
        covered += ends[first] - starts[first]
        while (last - first + 1 < words and covered < budget and last + 1 < len(starts)
               and not taken[last + 1] and starts[last + 1] == ends[last]):
            last += 1
            covered += ends[last] - starts[last]
        taken[first : last + 1] = True
        span = np.arange(starts[first], ends[last])
        action = rng.random()
        if action < 0.8:
            corrupted[span] = mask_id
        elif action < 0.9:
            corrupted[span] = rng.choice(random_ids, size=len(span))
        weights[span] = 1.0
        boundaries[span] = np.stack([np.full(len(span), span[0] - 1), np.full(len(span), span[-1] + 1), span - span[0]],
                                    axis=1)
    return corrupted, weights, boundaries


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
    or swaps A and B (sentence order). `span_masking` (unpaired rows) masks SpanBERT's spans of
    whole words (`mask_spans`) in place of single tokens, and adds each row's span_boundaries.
    """

    def __init__(self, documents: Sequence[dict], tokenizer: Tokenizer, length: int, *, pairs: Pairs = Pairs.NONE,
                 across_documents: bool = False, span_masking: bool = False):
        self.tokenizer, self.length, self.pairs = tokenizer, length, Pairs(pairs)
        self.paired = self.pairs != Pairs.NONE
        if across_documents and self.paired:
            raise ValueError("Rows packed across documents hold one segment: they cannot be paired "
                             f"({self.pairs.value}).")
        if span_masking and self.paired:
            raise ValueError(f"Span masking (SpanBERT) takes rows of one segment: it cannot be paired ({self.pairs.value}).")
        # span masking: [vocab] whether each piece begins a word (a tokenizer that cannot tell fails here)
        self.word_starts = tokenizer.word_starts if span_masking else None
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

    def _word_starts(self, chunk: int) -> np.ndarray:
        """[length] whether each token of an unpaired row begins a word (a sentence's first does)."""
        sentences = self.sentences[self.chunks[chunk].document][self.chunks[chunk].start : self.chunks[chunk].end]
        starts = [bool(i == 0 or self.word_starts[t]) for ids in sentences for i, t in enumerate(ids)]
        return pad([True, *starts[: self.length - 2], True], self.length, True, bool)

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
        tokens = pad(ids, self.length, tok.pad_id)
        maskable = ~np.isin(tokens, list(tok.special_ids))
        if self.word_starts is not None:
            corrupted, weights, features["span_boundaries"] = mask_spans(
                tokens, rng, maskable=maskable, word_starts=self._word_starts(chunk), mask_id=tok.mask_id,
                random_ids=self.random_ids,
            )
        else:
            corrupted, weights = mask_tokens(
                tokens, rng, maskable=maskable, mask_id=tok.mask_id, random_ids=self.random_ids
            )
        features.update(
            tokens=corrupted,
            token_types=pad(token_types, self.length),
            segment_ids=pad([1] * len(ids), self.length),
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


# ----------------------------------------------------------------------------- span corruption (T5)


def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` text tokens, as T5 rounds them."""
    noise = round(length * noise_density)
    return noise, round(noise / mean_span_length)


def span_corruption_lengths(source_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(text tokens per row, target length) for inputs of exactly `source_length` (T5's
    `random_spans_helper`): the most text whose kept tokens, one sentinel per noise span and
    EOS fit the source; the target holds the noise tokens, a sentinel per span and EOS. A length
    too short for a noise span of at least one token is a clear error."""
    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans = _noise_counts(tokens, noise_density, mean_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = source_length - 1
    while lengths(tokens + 1)[0] <= source_length:
        tokens += 1
    noise, spans = _noise_counts(tokens, noise_density, mean_span_length)
    if spans < 1:
        raise ValueError(
            f"source_length={source_length} is too short for span corruption: {tokens} text tokens at "
            f"noise_density={noise_density} make no span of mean length {mean_span_length}. Raise source_length "
            "or noise_density."
        )
    if spans > tokens - noise:
        raise ValueError(
            f"noise_density={noise_density} leaves {tokens - noise} of {tokens} tokens to keep, too few to keep one "
            f"between each two of {spans} spans: lower noise_density or raise mean_span_length."
        )
    return tokens, lengths(tokens)[1]


def random_spans_mask(length: int, rng: np.random.Generator, noise_density: float,
                      mean_span_length: float) -> np.ndarray:
    """[length] bool, True on noise: T5's spans. The noise tokens and the kept ones are each cut
    into the same number of non-empty runs at uniformly random points, and interleaved starting
    with a kept run, so every noise span sits between kept text (the last one ends the row)."""
    noise, spans = _noise_counts(length, noise_density, mean_span_length)

    def run_lengths(items: int) -> np.ndarray:  # `items` cut into `spans` non-empty runs
        cuts = np.sort(rng.choice(np.arange(1, items), spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [items]]))

    interleaved = np.stack([run_lengths(length - noise), run_lengths(noise)], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), interleaved)


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos_id: int) -> tuple[list, list]:
    """(inputs, targets) of T5's span corruption: in the inputs each noise span becomes one
    sentinel (the k-th span sentinels[k]); the targets are sentinels[k] followed by span k, for
    every span, so replacing each input sentinel by its run of the target gives `tokens` back.
    Both end with EOS."""
    def replace_runs(runs: np.ndarray) -> list[int]:  # each run of `runs` -> its sentinel
        first = runs & ~np.concatenate([[False], runs[:-1]])
        ids = np.where(first, sentinels[np.cumsum(first) - 1], tokens)
        return [*ids[~runs | first].tolist(), eos_id]

    return replace_runs(noise), replace_runs(~noise)  # the k-th kept run precedes the k-th span


class SpanCorruptionExamples:
    """T5's pretraining rows: the documents' tokens as one stream, cut into rows of text that
    `span_corruption_lengths` sizes, each corrupted anew when indexed with an rng (as masked-LM
    rows are masked anew): the source [source_length] holds the kept text with one sentinel
    (<extra_id_k>) per noise span and EOS, filling it exactly; the target [target_length] the
    spans after their sentinels and EOS, filling it exactly too."""

    def __init__(self, documents: Sequence[dict], tokenizer: Tokenizer, source_length: int, *,
                 noise_density: float = 0.15, mean_span_length: float = 3.0):
        self.tokenizer, self.source_length = tokenizer, source_length
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        row, self.target_length = span_corruption_lengths(source_length, noise_density, mean_span_length)
        spans = _noise_counts(row, noise_density, mean_span_length)[1]
        sentinels = [tokenizer.token_to_id(f"<extra_id_{k}>") for k in range(spans)]
        if None in sentinels:
            raise ValueError(
                f"Span corruption of rows of {row} text tokens (source_length={source_length}) needs {spans} sentinels "
                f"<extra_id_0> .. <extra_id_{spans - 1}>, and {tokenizer!r} has {sentinels.index(None)}: set "
                f"tokenizer_extra_ids={spans} or more (a tokenizer trained by the run), or use T5's tokenizer."
            )
        self.sentinels = np.asarray(sentinels, np.int32)
        encoded = tokenizer.encode_batch([d["text"] for d in documents])
        stream = np.concatenate([np.asarray(ids, np.int32) for ids in encoded]) if encoded else np.zeros(0, np.int32)
        if len(stream) < row:
            raise ValueError(
                f"The texts hold {len(stream)} tokens, fewer than one span-corruption row of {row} text tokens "
                f"(source_length={source_length}): give more text, or lower source_length."
            )
        self.rows = stream[: len(stream) // row * row].reshape(-1, row)

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = self.rows[index]
        noise = random_spans_mask(len(tokens), rng, self.noise_density, self.mean_span_length)
        source, target = corrupt_spans(tokens, noise, self.sentinels, self.tokenizer.eos_id)
        return _seq2seq_row(source, target, self.tokenizer, self.source_length, self.target_length)

    def target_tokens(self, seed: int) -> np.ndarray:
        """The targets of every row, each corrupted once with a seeded rng: what a context-free
        model of the targets is measured on."""
        rng = np.random.default_rng(seed)
        return np.concatenate([self.example(i, rng)["targets"] for i in range(len(self))])


def seq2seq_features(
    example: dict, tokenizer: Tokenizer, source_length: int, target_length: int
) -> dict[str, np.ndarray]:
    """Source + EOS; decoder input = the decoder start (BOS, or T5's pad) + target (teacher forcing),
    predicting target + EOS."""
    tok = tokenizer
    source = tok.encode(example["source"])[: source_length - 1] + [tok.eos_id]
    target = tok.encode(example["target"])[: target_length - 1] + [tok.eos_id]
    return _seq2seq_row(source, target, tok, source_length, target_length)


def _seq2seq_row(source: list[int], target: list[int], tok: Tokenizer, source_length: int,
                 target_length: int) -> dict[str, np.ndarray]:
    """The padded features of one (source, target) pair, the target shifted right after the decoder start."""
    target_in = [tok.decoder_start_id] + target[:-1]
    return {
        "source": pad(source, source_length, tok.pad_id),
        "source_segment_ids": pad([1] * len(source), source_length),
        "target_in": pad(target_in, target_length, tok.pad_id),
        "target_segment_ids": pad([1] * len(target), target_length),
        "targets": pad(target, target_length, tok.pad_id),
        "weights": pad([1] * len(target), target_length, dtype=np.float32),
    }


def classification_features(
    example: dict, tokenizer: Tokenizer, length: int, *, decoder: bool = False, token_types: bool = True,
) -> dict[str, np.ndarray]:
    """One text, or a pair of texts (`text_pair`), as a classifier reads it, with its integer label.

    An encoder reads [CLS] A [SEP] (B [SEP]), and a pair's second segment has token type 1
    where the model has two types (BERT; `token_types`). A decoder reads A ([SEP] B) [EOS]: its
    head reads the last token's state, the only one that has seen the whole input (GPT; the
    delimiter is EOS where the tokenizer has no [SEP], as GPT-2's; BOS first where the tokenizer
    adds one, as Llama's, as its prompts have it). Texts longer than `length`
    are cut at their end, the longer one first (Hugging Face's "longest_first").
    """
    tok = tokenizer
    texts = [tok.encode(example["text"])] + ([tok.encode(example["text_pair"])] if "text_pair" in example else [])
    texts = _longest_first(texts, length - len(texts) - (not decoder) - (decoder and tok.adds_bos))  # the specials
    if decoder:
        delimiter = tok.sep_id if tok.specials.sep is not None else tok.eos_id
        segments = [[tok.bos_id] * tok.adds_bos + texts[0] + ([delimiter] + texts[1] if len(texts) > 1 else [])
                    + [tok.eos_id]]
    else:
        segments = [[tok.cls_id, *texts[0], tok.sep_id]] + [[*text, tok.sep_id] for text in texts[1:]]
    ids = [token for segment in segments for token in segment]
    features = {
        "tokens": pad(ids, length, tok.pad_id),
        "segment_ids": pad([1] * len(ids), length),
        "labels": np.int32(example["label"]),
        "weights": np.float32(1.0),
    }
    if len(segments) > 1:
        features["token_types"] = pad([0] * len(segments[0]) + [int(token_types)] * len(segments[1]), length)
    return features


def _longest_first(texts: list[list[int]], budget: int) -> list[list[int]]:
    """Cuts texts at their ends, one token at a time from the longer (the second on a tie), until
    together they hold at most `budget` tokens."""
    lengths = [min(len(text), budget) for text in texts]
    while sum(lengths) > budget:
        longer = int(lengths[-1] >= lengths[0])
        lengths[longer] -= 1
    return [text[:n] for text, n in zip(texts, lengths)]


# ----------------------------------------------------------------------------- batches


def token_classification_features(example: dict, tokenizer: Tokenizer, length: int) -> dict[str, np.ndarray]:
    """[CLS] the words' pieces [SEP], truncated to `length`; each word's label on its first piece
    (weight 1), its other pieces and the specials weight 0. Words are encoded one by one, as
    a tokenizer's pre-split words are."""
    tok = tokenizer
    ids, labels, weights = [tok.cls_id], [0], [0.0]
    for word, label in zip(tok.encode_batch(example["words"]), example["labels"]):
        word = word or [tok.unk_id]
        ids += word
        labels += [label] + [0] * (len(word) - 1)
        weights += [1.0] + [0.0] * (len(word) - 1)
    ids, labels, weights = ids[: length - 1] + [tok.sep_id], labels[: length - 1] + [0], weights[: length - 1] + [0.0]
    return {
        "tokens": pad(ids, length, tok.pad_id),
        "segment_ids": pad([1] * len(ids), length),
        "labels": pad(labels, length),
        "weights": pad(weights, length, dtype=np.float32),
    }


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
