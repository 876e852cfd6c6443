"""Extractive question answering: SQuAD's reader and its errors, the windows over long contexts
and where their answers point, the answer read back, SQuAD's scores against hand computations."""

import json

import numpy as np
import pytest
from synthetic import sentences

from train import squad
from transformer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(sentences(5_000, seed=0)) + "\n")
    return Tokenizer.train([corpus], 400, model_prefix=folder / "spm")


def squad_json(*paragraphs) -> str:
    """SQuAD JSON of one article: paragraphs as (context, [(id, question, [(answer, start)])])."""
    return json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": question,
                                      "answers": [{"text": text, "answer_start": start} for text, start in answers]}
                                     for qid, question, answers in qas]}
        for context, qas in paragraphs]}]})


def test_squad_json_reads_one_example_per_question(tmp_path):
    context = "Denver Broncos beat the Carolina Panthers in 2016."
    path = tmp_path / "dev.json"
    path.write_text(squad_json((context, [("q1", "Who won?", [("Denver Broncos", 0), ("Broncos", 7)]),
                                          ("q2", "When?", [("2016", 45)])])))
    assert squad.read_squad([path]) == [
        {"id": "q1", "question": "Who won?", "context": context,
         "answers": [{"text": "Denver Broncos", "answer_start": 0}, {"text": "Broncos", "answer_start": 7}]},
        {"id": "q2", "question": "When?", "context": context, "answers": [{"text": "2016", "answer_start": 45}]},
    ]


@pytest.mark.parametrize("content, message", [
    (squad_json(("Denver won.", [("q7", "Who?", [("Carolina", 0)])])),
     r"dev.json: question q7: answer 'Carolina' is not at character 0 of its context \(found 'Denver w'\)"),
    (squad_json(("Denver won.", [("q8", "Who?", [])])), "dev.json: question q8 has no answer"),
    ('{"data": [{"title": "t"}]}', r"dev.json: not SQuAD JSON .*KeyError: 'paragraphs'"),
    ("{not json", "dev.json: not SQuAD JSON"),
])
def test_a_bad_squad_file_is_an_error_naming_it_and_the_question(tmp_path, content, message):
    path = tmp_path / "dev.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        squad.read_squad([path])


def long_example(count: int = 12) -> dict:
    """A context of several synthetic sentences, the answer two words in a late one."""
    context = " ".join(sentences(count, seed=3))
    words = context.split()
    answer_word = len(words) - 5
    start = len(" ".join(words[:answer_word])) + 1
    return {"id": "x", "question": "Which words are they?", "context": context,
            "answers": [{"text": " ".join(words[answer_word : answer_word + 2]), "answer_start": start}]}


@pytest.mark.parametrize("doc_stride", [5, 17])
def test_windows_cover_the_context_and_point_at_the_answer_where_they_hold_it(tok, doc_stride):
    """Windows doc_stride pieces apart cover the whole context; [CLS] question [SEP] window [SEP]
    with token types 0 then 1; a window holding the answer points at exactly its pieces, the
    others at [CLS]; each context piece has its most context in exactly one window."""
    example = long_example()
    windows = squad.QuestionWindows([example], tok, 48, doc_stride=doc_stride, max_question_length=8)
    rows = windows.rows
    question = tok.encode(example["question"])[:8]  # max_question_length
    pieces = [p for w in tok.encode_batch(example["context"].split()) for p in w]
    offset = len(question) + 2
    size = 48 - offset - 1
    assert len(windows) == 1 + -(-max(len(pieces) - size, 0) // doc_stride) > 2
    answer = tok.encode(example["answers"][0]["text"])
    seen, holding = np.zeros(len(pieces), int), 0
    marked = np.full(len(pieces), -1)  # the window each piece answers in
    for i in range(len(windows)):
        start = i * doc_stride
        window = pieces[start : start + size]
        ids = [tok.cls_id, *question, tok.sep_id, *window, tok.sep_id]
        assert rows["tokens"][i][: len(ids)].tolist() == ids and (rows["tokens"][i][len(ids):] == tok.pad_id).all()
        assert rows["token_types"][i][: len(ids)].tolist() == [0] * offset + [1] * (len(window) + 1)
        assert rows["context"][i].tolist() == [offset <= j < offset + len(window) for j in range(48)]
        seen[start : start + len(window)] += rows["max_context"][i][offset : offset + len(window)]
        marked[start : start + len(window)][rows["max_context"][i][offset : offset + len(window)]] = i
        a, b = rows["start_positions"][i], rows["end_positions"][i]
        if a:
            holding += 1
            assert rows["tokens"][i][a : b + 1].tolist() == answer
        else:
            assert b == 0
    assert (seen == 1).all() and holding >= 1
    def score(piece, i):  # BERT's: the pieces on the shorter side, plus 0.01 x the window's length
        start, end = i * doc_stride, min(i * doc_stride + size, len(pieces)) - 1
        return min(piece - start, end - piece) + 0.01 * (end - start + 1) if start <= piece <= end else -1.0

    for piece, window in enumerate(marked):  # the first of the best windows, searched by brute force
        scores = [score(piece, i) for i in range(len(windows))]
        assert window == scores.index(max(scores))


def test_an_answer_inside_a_word_is_narrowed_to_its_own_pieces(tok):
    """Where the answer's own pieces lie inside its words' pieces, it points at them alone
    (BERT's `_improve_answer_span`), and a span of them reads back as their characters."""
    words = sentences(1, seed=11)[0].split()
    target = max(words, key=lambda w: len(tok.encode(w)))
    pieces = tok.encode(target)
    assert len(pieces) > 1
    context = " ".join(words)
    start = context.index(target)
    head = tok.decode(pieces[:1]).strip()  # the word's first piece, an answer inside the word
    example = {"id": "n", "question": "q", "context": context, "answers": [{"text": head, "answer_start": start}]}
    windows = squad.QuestionWindows([example], tok, 64, doc_stride=16, max_question_length=4)
    rows = windows.rows
    assert rows["start_positions"][0] == rows["end_positions"][0]
    assert rows["tokens"][0][rows["start_positions"][0]] == pieces[0]
    # and read back as that piece's characters alone, not its whole word
    assert squad.answer_texts(windows, rows["start_positions"], rows["end_positions"], np.zeros(len(windows))) == [head]


def test_answers_are_read_back_as_the_words_of_the_best_window(tok):
    """Of a question's windows the best-scoring span answers, read from the context as the whole
    words its pieces cover; a question with no valid span in any window answers ""."""
    example = long_example()
    other = dict(long_example(3), id="y")
    windows = squad.QuestionWindows([example, other], tok, 48, doc_stride=12, max_question_length=8)
    rows = windows.rows
    first = np.flatnonzero(rows["start_positions"])[0]  # a row of the first question holding its answer
    starts, ends = rows["start_positions"].copy(), rows["end_positions"].copy()
    scores = np.where(rows["example"] == 0, 1.0, -np.inf)
    scores[first] = 5.0
    answers = squad.answer_texts(windows, starts, ends, scores)
    assert answers == [example["answers"][0]["text"], ""]


@pytest.mark.parametrize("prediction, references, exact, f1", [
    ("the Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),  # articles and punctuation aside
    ("Denver", ["Denver Broncos"], 0.0, 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
    ("Broncos beat Panthers", ["Carolina Panthers", "the Broncos"], 0.0, 2 * (1 / 3) * 1.0 / (4 / 3)),
    ("", ["Denver"], 0.0, 0.0),
])
def test_squad_scores_by_hand(prediction, references, exact, f1):
    example = {"answers": [{"text": r, "answer_start": 0} for r in references]}
    assert squad.squad_scores([example], [prediction]) == pytest.approx({"exact_match": exact, "f1": f1})
