"""Extractive question answering as BERT reads SQuAD: the JSON, the windows, the answers, the scores.

Each question is read with a window of its context, [CLS] question [SEP] window [SEP], token
types 0 then 1 (Devlin et al. 2019). A context longer than the window is read in windows
`doc_stride` pieces apart; an answer that a training window does not hold whole points at
[CLS]. At evaluation a question's answer is the best span (start + end logit) over its windows,
its start in the window where that piece has the most context on either side, read back from
the context at its pieces' characters. Exact match and F1 are SQuAD's own
(answers normalised: lower case, no punctuation, articles or extra spaces; the best over the
reference answers).

Contexts split into words at whitespace and each word is encoded alone, as BERT's run_squad.py
does, so that every piece belongs to one word with known character offsets (a piece's own
characters within its word where the word's pieces decode to as many characters as it has; the
whole word where they do not, as "[UNK]" or a split-off punctuation mark).
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from typing import Iterable, Sequence

import numpy as np

from train.data import pad
from transformer.tokenizer import Tokenizer


def read_squad(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """SQuAD JSON files -> one example per question (see `parse_squad`)."""
    examples = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            examples += parse_squad(file.read(), str(path))
    return examples


def parse_squad(text: str, where: str) -> list[dict]:
    """SQuAD JSON -> one example per question: {"id", "question", "context", "answers": [{"text",
    "answer_start"}]}. Malformed JSON, an answer that is not at its `answer_start` in the context
    and SQuAD 2.0's unanswerable question are errors naming `where` and the question."""
    try:
        paragraphs = [paragraph for article in json.loads(text)["data"] for paragraph in article["paragraphs"]]
        examples = [
            {"id": str(qa["id"]), "question": qa["question"], "context": paragraph["context"],
             "answers": [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa.get("answers", [])]}
            for paragraph in paragraphs for qa in paragraph["qas"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: not SQuAD JSON ({{\"data\": [{{\"paragraphs\": [{{\"context\", \"qas\"}}]}}]}}): "
                         f"{type(error).__name__}: {error}") from None
    for example in examples:
        check_answers(example, where)
    return examples


def check_answers(example: dict, where: str) -> None:
    """Each answer must be its context's text at its answer_start, and a question must have one."""
    if not example["answers"]:
        raise ValueError(f"{where}: question {example['id']} has no answer (SQuAD 2.0's unanswerable questions "
                         "are not supported): remove it or give it an answer span.")
    context = example["context"]
    for answer in example["answers"]:
        start, text = answer["answer_start"], answer["text"]
        if not text.strip() or context[start : start + len(text)] != text:
            raise ValueError(
                f"{where}: question {example['id']}: answer {text!r} is not at character {start} of its context "
                f"(found {context[start : start + len(text)]!r}); an answer is a span of its context."
            )


def words_of(context: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The whitespace-separated words of a context and each one's first and past-last character."""
    spans = [match.span() for match in re.finditer(r"\S+", context)]
    return [context[a:b] for a, b in spans], np.array([a for a, _ in spans]), np.array([b for _, b in spans])


class QuestionWindows:
    """Every (question, context window) row of a set of examples, as fixed-length features.

    Row i: `tokens` [T] ([CLS] question [SEP] window [SEP], padding), `token_types`,
    `segment_ids`, `start_positions` / `end_positions` (the first answer's pieces, 0 where the
    window does not hold it whole), `weights`; and for reading answers back: `example` (the
    question's index), `context` [T] (the window's context pieces), `max_context` [T] (the
    pieces this window has the most context around) and `piece` [T] (each context piece's index
    in its context, -1 for the others). The context has token type 1 where the model has two
    (`token_types`), else 0. Stored narrow (rows of a SQuAD-sized set take 1.4 KB each at T =
    128); a row read by index is the model's int32 input.
    """

    def __init__(self, examples: Sequence[dict], tokenizer: Tokenizer, length: int, *, doc_stride: int,
                 max_question_length: int, token_types: bool = True):
        if not 0 < doc_stride <= length - 3 - max_question_length:
            raise ValueError(f"doc_stride={doc_stride} must be in [1, seq_length - max_question_length - 3].")
        self.examples, self.length, self.tokenizer = examples, length, tokenizer
        questions = [ids[:max_question_length] for ids in tokenizer.encode_batch([e["question"] for e in examples])]
        answers = tokenizer.encode_batch([e["answers"][0]["text"] for e in examples])
        self.contexts = _ContextPieces([e["context"] for e in examples], tokenizer)
        rows = collections.defaultdict(list)
        for index, (example, question, answer) in enumerate(zip(examples, questions, answers)):
            pieces, word, starts, ends = self.contexts[example["context"]]
            span = _answer_pieces(example["answers"][0], answer, pieces, word, starts, ends)
            for row in _windows(question, pieces, span, length, doc_stride, tokenizer, int(token_types)):
                rows["example"].append(index)
                for key, value in row.items():
                    rows[key].append(value)
        self.rows = {key: np.stack(values) for key, values in rows.items()}

    def __len__(self) -> int:
        return len(self.rows["example"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        keys = ("tokens", "token_types", "segment_ids", "start_positions", "end_positions", "weights")
        return {key: self.rows[key][index].astype(np.float32 if key == "weights" else np.int32) for key in keys}

    def text(self, context: str, first: int, last: int) -> str:
        """The context's text from piece `first` to piece `last` (indices into its pieces)."""
        return context[self._edge(context, first, start=True) : self._edge(context, last, start=False)]

    def _edge(self, context: str, piece: int, *, start: bool) -> int:
        """The character where a piece starts (or ends): counted within its word by decoding the
        word's pieces before it (or up to it), where they spell the word out; else the word's."""
        pieces, word, starts, ends = self.contexts[context]
        w = word[piece]
        first, past = int(np.searchsorted(word, w)), int(np.searchsorted(word, w, side="right"))
        if len(self.tokenizer.decode(pieces[first:past])) != ends[w] - starts[w]:
            return int(starts[w] if start else ends[w])
        return int(starts[w] + len(self.tokenizer.decode(pieces[first : piece + (not start)])))


class _ContextPieces(dict):
    """Each distinct context -> (its pieces, each piece's word, each word's first and past-last
    character); all their words encoded in one batch (a context has several questions)."""

    def __init__(self, contexts: Sequence[str], tokenizer: Tokenizer):
        super().__init__()
        contexts = list(dict.fromkeys(contexts))
        split = [words_of(context) for context in contexts]
        encoded = iter(tokenizer.encode_batch([word for words, _, _ in split for word in words]))
        for context, (words, starts, ends) in zip(contexts, split):
            pieces = [next(encoded) or [tokenizer.unk_id] for _ in words]
            word = np.repeat(np.arange(len(words)), [len(p) for p in pieces])
            self[context] = [p for w in pieces for p in w], word, starts, ends


def _answer_pieces(answer: dict, own: list[int], pieces: list[int], word: np.ndarray, starts: np.ndarray,
                   ends: np.ndarray) -> tuple[int, int]:
    """An answer's first and last piece in its context: its words' pieces, narrowed to the
    answer's `own` pieces where they appear inside them ("1990" of "1990s"; BERT's
    `_improve_answer_span`)."""
    first_word = int(np.searchsorted(ends, answer["answer_start"], side="right"))
    last_word = int(np.searchsorted(starts, answer["answer_start"] + len(answer["text"]), side="left")) - 1
    first, last = int(np.searchsorted(word, first_word)), int(np.searchsorted(word, last_word, side="right")) - 1
    for a in range(first, last + 1):
        for b in range(last, a - 1, -1):
            if pieces[a : b + 1] == own:
                return a, b
    return first, last


def _windows(question, pieces, answer, length, doc_stride, tokenizer, context_type):
    """The rows of one question: windows over its context's pieces, `doc_stride` apart."""
    offset = len(question) + 2  # [CLS] question [SEP]
    size = length - offset - 1
    starts = [0]
    while starts[-1] + size < len(pieces):
        starts.append(starts[-1] + doc_stride)
    best = _most_context(np.array(starts), size, len(pieces))
    for window_index, start in enumerate(starts):
        window = pieces[start : start + size]
        ids = [tokenizer.cls_id, *question, tokenizer.sep_id, *window, tokenizer.sep_id]
        inside = start <= answer[0] and answer[1] < start + len(window)
        held = slice(offset, offset + len(window))
        context, max_context, index = np.zeros(length, bool), np.zeros(length, bool), np.full(length, -1, np.int32)
        context[held], max_context[held] = True, best[start : start + len(window)] == window_index
        index[held] = np.arange(start, start + len(window))
        yield {
            "tokens": pad(ids, length, tokenizer.pad_id),
            "token_types": pad([0] * offset + [context_type] * (len(ids) - offset), length, dtype=np.int8),
            "segment_ids": pad([1] * len(ids), length, dtype=np.int8),
            "start_positions": np.int32(answer[0] - start + offset if inside else 0),
            "end_positions": np.int32(answer[1] - start + offset if inside else 0),
            "weights": np.float32(1.0), "context": context, "max_context": max_context, "piece": index,
        }


def _most_context(starts: np.ndarray, size: int, count: int) -> np.ndarray:
    """For each of `count` pieces, the window (index into `starts`, each `size` long) with the
    most context around it, by BERT's score (`_check_is_max_context`): the pieces on its shorter
    side plus 0.01 x the window's length; the first window on a tie."""
    piece = np.arange(count)[None, :]
    ends = np.minimum(starts + size, count)[:, None] - 1  # [W, 1]
    score = np.minimum(piece - starts[:, None], ends - piece) + 0.01 * (ends - starts[:, None] + 1)
    held = (starts[:, None] <= piece) & (piece <= ends)
    return np.argmax(np.where(held, score, -np.inf), axis=0)


def answer_texts(windows: QuestionWindows, starts: np.ndarray, ends: np.ndarray, scores: np.ndarray) -> list[str]:
    """The answers of the questions of the first len(scores) rows: each one's best-scoring span
    over its windows (starts, ends, scores [rows], as `transformer.models.best_spans` gives them),
    as the context's text at its pieces ("" where no window has a valid span)."""
    examples = windows.rows["example"][: len(scores)]
    best: dict[int, int] = {}  # question -> its best row
    for row, (example, score) in enumerate(zip(examples, scores)):
        if np.isfinite(score) and (example not in best or score > scores[best[example]]):
            best[example] = row
    texts = []
    for index in range(examples[-1] + 1 if len(examples) else 0):
        example, row = windows.examples[index], best.get(index)
        if row is None:
            texts.append("")
            continue
        piece = windows.rows["piece"][row]
        texts.append(windows.text(example["context"], piece[starts[row]], piece[ends[row]]))
    return texts


# ----------------------------------------------------------------------------- SQuAD's scores


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1: the harmonic mean of token precision and recall, tokens counted with repeats."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(examples: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and F1 (fractions), each question's best over its reference answers."""
    exact = [max(normalize_answer(p) == normalize_answer(a["text"]) for a in e["answers"])
             for e, p in zip(examples, predictions)]
    f1 = [max(answer_f1(p, a["text"]) for a in e["answers"]) for e, p in zip(examples, predictions)]
    return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}


def overlap_sentence_answers(examples: Sequence[dict]) -> list[str]:
    """A baseline: the context sentence sharing the most (normalised) words with the question."""
    answers = []
    for example in examples:
        question = set(normalize_answer(example["question"]).split())
        sentences = re.split(r"(?<=[.!?])\s+", example["context"])
        answers.append(max(sentences, key=lambda s: len(question & set(normalize_answer(s).split()))))
    return answers
