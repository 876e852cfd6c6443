"""Data: readers fail clearly, task features have exact layouts, batches are deterministic and resumable.

All text is synthetic and written under pytest's tmp_path; nothing is downloaded.
"""

import collections
import json
import re
import types

import grain
import numpy as np
import pytest
from processes import ROOT
from synthetic import sentences

from train import data, tasks
from transformer.tokenizer import Tokenizer

def documents(count: int, seed: int, min_sentences: int = 1, max_sentences: int = 6) -> list[dict]:
    """[{"text"}] documents of a varying number of sentences, one per line."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_sentences, max_sentences + 1, size=count)
    pool = iter(sentences(int(sizes.sum()), seed))
    return [{"text": "\n".join(next(pool) for _ in range(size))} for size in sizes]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(sentences(10_000, seed=0)) + "\n")
    return Tokenizer.train([corpus], 400, model_prefix=folder / "spm")


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def at(path, line=None) -> str:
    """A regex matching `path` (and `:line`) in an error message."""
    return re.escape(str(path) if line is None else f"{path}:{line}:")


# ----------------------------------------------------------------------------- sources


def test_read_text_document_per_file(tmp_path):
    """Without one_document_per_line each file is one document holding all its lines."""
    a = write(tmp_path / "a.txt", "First line.\n\nThird line.\n")
    b = write(tmp_path / "b.txt", "Only line")
    assert data.read_text([a, b]) == [{"text": "First line.\n\nThird line."}, {"text": "Only line"}]


def test_read_text_document_per_line(tmp_path):
    """With one_document_per_line every non-blank line is a document, in file order."""
    a = write(tmp_path / "a.txt", "One.\n\n  \nTwo.\r\n")
    b = write(tmp_path / "b.txt", "Three.\n")
    documents = data.read_text([a, b], one_document_per_line=True)
    assert documents == [{"text": "One."}, {"text": "Two."}, {"text": "Three."}]


def test_read_jsonl_keeps_named_fields(tmp_path):
    """read_jsonl returns exactly the named fields of every record, skipping blank lines."""
    records = [{"text": "a", "label": "x", "id": 1}, {"text": "b\tc", "label": "y"}]
    path = write(tmp_path / "d.jsonl", json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert data.read_jsonl([path]) == [{"text": "a"}, {"text": "b\tc"}]
    assert data.read_jsonl([path], fields=("label", "text")) == [
        {"label": "x", "text": "a"},
        {"label": "y", "text": "b\tc"},
    ]


def test_read_jsonl_missing_field_names_file_and_line(tmp_path):
    """A record without a requested field is a ValueError naming file:line and the field."""
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=at(path, 3) + ".*'text'"):
        data.read_jsonl([path])
    not_an_object = write(tmp_path / "e.jsonl", '{"text": "a"}\n["text"]\n')
    with pytest.raises(ValueError, match=at(not_an_object, 2)):
        data.read_jsonl([not_an_object])


def test_read_jsonl_invalid_json_names_file_and_line(tmp_path):
    """A line that is not JSON is a ValueError naming file:line."""
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=at(path, 2) + ".*JSON"):
        data.read_jsonl([path])


@pytest.mark.parametrize("separator", ["\u2028", "\x85"], ids=["U+2028", "NEL"])
@pytest.mark.parametrize("reader", ["jsonl", "tsv"])
def test_unicode_line_separators_inside_values_are_kept(tmp_path, reader, separator):
    """Only newlines end records: a JSONL or TSV value holding U+2028 or NEL is read back unchanged."""
    text = f"before{separator}after"
    if reader == "jsonl":
        path = write(tmp_path / "d.jsonl", json.dumps({"text": text}, ensure_ascii=False) + "\n")
        assert data.read_jsonl([path]) == [{"text": text}]
    else:
        path = write(tmp_path / "d.tsv", f"{text}\tpos\n")
        assert data.read_tsv([path]) == [{"text": text, "label": "pos"}]


def test_read_tsv_columns(tmp_path):
    """read_tsv maps each row's tab-separated values to the named columns, skipping blank lines."""
    path = write(tmp_path / "d.tsv", "good film\tpos\n\nbad film\tneg\n")
    assert data.read_tsv([path]) == [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    assert data.read_tsv([path], columns=("a", "b")) == [{"a": "good film", "b": "pos"}, {"a": "bad film", "b": "neg"}]


@pytest.mark.parametrize("row", ["no tab here", "too\tmany\ttabs"])
def test_read_tsv_wrong_column_count_names_file_and_line(tmp_path, row):
    """A row with the wrong number of columns is a ValueError naming file:line."""
    path = write(tmp_path / "d.tsv", f"ok\tpos\n{row}\n")
    with pytest.raises(ValueError, match=at(path, 2)):
        data.read_tsv([path])


READERS = {
    "text": lambda paths: data.read_text(paths),
    "text_lines": lambda paths: data.read_text(paths, one_document_per_line=True),
    "jsonl": lambda paths: data.read_jsonl(paths),
    "tsv": lambda paths: data.read_tsv(paths),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("content", ["", " \n\n\t\n"], ids=["empty", "blank"])
def test_empty_file_names_it(tmp_path, reader, content):
    """An empty (or whitespace-only) file is a ValueError naming the file, in every reader."""
    path = write(tmp_path / "empty.txt", content)
    with pytest.raises(ValueError, match=at(path) + ".*empty"):
        READERS[reader]([path])


@pytest.mark.parametrize("reader", sorted(READERS))
def test_undecodable_bytes_name_file_and_line(tmp_path, reader):
    """Bytes that are not UTF-8 are a ValueError naming file:line of the bad bytes."""
    path = write(tmp_path / "bad.txt", b"ok\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match=at(path, 2)):
        READERS[reader]([path])


@pytest.mark.parametrize("reader", sorted(READERS))
def test_missing_file_names_it(tmp_path, reader):
    """A missing file is a FileNotFoundError naming it."""
    path = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=at(path)):
        READERS[reader]([path])


@pytest.mark.parametrize("reader", sorted(READERS))
def test_directory_names_it_and_asks_for_its_files(tmp_path, reader):
    """A directory given as a data file is a ValueError saying so (not "does not exist")."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "a.txt", "text\tpos\n")
    with pytest.raises(ValueError) as error:
        READERS[reader]([folder])
    assert str(error.value) == f"Data file {folder} is a directory; list the files in it instead ([{folder}/a.txt, ...])."


@pytest.mark.parametrize(
    "line, fields, message",
    [
        ('{"text": 5}', ("text",), "field 'text' must be a string, got 5."),
        ('{"text": null}', ("text",), "field 'text' must be a string, got null."),
        ('{"source": "a", "target": ["b"]}', ("source", "target"), "field 'target' must be a string, got [\"b\"]."),
        ('{"text": "a", "label": 1.5}', ("text", "label"), "field 'label' must be a string or an integer, got 1.5."),
        ('{"text": "a", "label": true}', ("text", "label"), "field 'label' must be a string or an integer, got true."),
    ],
)
def test_read_jsonl_value_of_the_wrong_type_names_file_line_and_field(tmp_path, line, fields, message):
    """Texts must be strings and a label a string or an integer; anything else names file:line and the field."""
    path = write(tmp_path / "d.jsonl", '{"text": "a", "source": "a", "target": "b", "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError) as error:
        data.read_jsonl([path], fields=fields)
    assert str(error.value) == f"{path}:2: {message}"


def test_read_jsonl_integer_labels_are_kept(tmp_path):
    """An integer label (a class id) is valid."""
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n')
    assert data.read_jsonl([path], fields=("text", "label")) == [{"text": "a", "label": 1}]


# ----------------------------------------------------------------------------- labels


def test_encode_labels_sorted_names():
    """Without label_names the sorted set of string labels names the ids; other fields are kept."""
    examples = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "neutral"}]
    encoded, names = data.encode_labels(examples)
    assert names == ["neg", "neutral", "pos"]
    assert encoded == [{"text": "a", "label": 2}, {"text": "b", "label": 0}, {"text": "c", "label": 1}]
    assert examples[0]["label"] == "pos"  # the input is not modified


def test_encode_labels_explicit_names():
    """Explicit label_names fix the ids in their given order, even for labels not present."""
    examples = [{"label": "pos"}, {"label": "neg"}]
    encoded, names = data.encode_labels(examples, label_names=("pos", "neg", "unsure"))
    assert names == ["pos", "neg", "unsure"]
    assert [e["label"] for e in encoded] == [0, 1]


def test_encode_labels_unknown_label_is_named():
    """A label outside label_names is a ValueError naming the label and the example."""
    with pytest.raises(ValueError, match=r"Example 1: label 'maybe'"):
        data.encode_labels([{"label": "pos"}, {"label": "maybe"}], label_names=["neg", "pos"])


def test_encode_labels_takes_ids_for_names_but_never_a_number_for_another_number():
    """0 and 1 may stand for "neg" and "pos"; but with names "0", "2", "5" from training, a
    validation label 1 is no class (it would have been read as id 1, which means "2")."""
    encoded, _ = data.encode_labels([{"label": 1}, {"label": "neg"}], label_names=["neg", "pos"])
    assert [e["label"] for e in encoded] == [1, 0]
    _, names = data.encode_labels([{"label": 0}, {"label": 2}, {"label": 5}])
    assert data.encode_labels([{"label": 5}], label_names=names)[0] == [{"label": 2}]
    with pytest.raises(ValueError, match=r"Example 0: label 1 is not one of the labels \['0', '2', '5'\]"):
        data.encode_labels([{"label": 1}], label_names=names)


def test_encode_labels_integer_labels_keep_their_meaning():
    """With 11 integer classes, names[encoded label] is the original label for every example."""
    examples = [{"label": i} for i in range(11)]
    encoded, names = data.encode_labels(examples)
    assert [names[e["label"]] for e in encoded] == [str(i) for i in range(11)]


# ----------------------------------------------------------------------------- causal LM packing


def test_packed_lm_rows(tok):
    """Rows are full, targets are the next stream token, and no token's context crosses a document.

    Within a row: positions start at 0 (a document continued from the previous row counts
    from the row start, so positions stay below the row length and inside the model's
    position table) and restart at 0 exactly where the segment id changes, the segment id
    grows by 1 at each document boundary, and the weight is 0 exactly where the target is the
    next document's first token (the input is a document's EOS). Rows concatenate to the stream.
    """
    docs = documents(120, seed=1, max_sentences=2)
    length = 32
    packed = data.PackedLM(docs, tok, length)

    pieces = [tok.encode(d["text"]) + [tok.eos_id] for d in docs]
    stream = np.concatenate(pieces)
    document = np.concatenate([np.full(len(p), i) for i, p in enumerate(pieces)])
    assert len(packed) == (len(stream) - 1) // length

    boundaries = 0
    for index in range(len(packed)):
        row = packed[index]
        start = index * length
        assert {k: v.shape for k, v in row.items()} == {
            k: (length,) for k in ("tokens", "targets", "segment_ids", "positions", "weights")
        }
        np.testing.assert_array_equal(row["tokens"], stream[start : start + length])
        np.testing.assert_array_equal(row["targets"], stream[start + 1 : start + length + 1])
        assert (row["segment_ids"] > 0).all()  # no padding anywhere
        segments, positions = row["segment_ids"], row["positions"]
        assert segments[0] == 1 and positions[0] == 0
        np.testing.assert_array_equal(np.diff(positions)[np.diff(segments) == 0], 1)
        step = np.diff(segments)
        assert set(step.tolist()) <= {0, 1}
        changes = np.flatnonzero(step) + 1
        np.testing.assert_array_equal(changes, np.flatnonzero(positions[1:] == 0) + 1)
        np.testing.assert_array_equal(changes, np.flatnonzero(row["tokens"][:-1] == tok.eos_id) + 1)
        # same segment <=> same document: attention masked by segment never crosses documents
        same_segment = segments[:, None] == segments[None, :]
        same_document = document[start : start + length][:, None] == document[start : start + length][None, :]
        np.testing.assert_array_equal(same_segment, same_document)

        np.testing.assert_array_equal(row["weights"], (row["tokens"] != tok.eos_id).astype(np.float32))
        np.testing.assert_array_equal(
            row["weights"] == 0, document[start + 1 : start + length + 1] != document[start : start + length]
        )
        boundaries += len(changes)
    assert boundaries > len(packed)  # the check saw many boundaries, several per row

    tokens = np.concatenate([packed[i]["tokens"] for i in range(len(packed))])
    np.testing.assert_array_equal(tokens, stream[: len(tokens)])


def test_packed_documents_start_as_prompts_do():
    """A tokenizer that adds BOS (Llama's) trains on documents that start with it, as the
    sampler's prompts do; BOS is never a target of weight 1."""
    from transformer.sampler import prompt_ids

    llama = Tokenizer.load(ROOT / "tests" / "fixtures" / "pretrained" / "llama")
    assert llama.adds_bos
    docs = [{"text": "the dog barked"}, {"text": "few birds ate fish"}, {"text": "clouds came"}]
    packed = data.PackedLM(docs, llama, 4)
    starts = np.flatnonzero(np.diff(packed.document, prepend=-1))
    for doc, start, end in zip(docs, starts, [*starts[1:], len(packed.stream)]):
        np.testing.assert_array_equal(packed.stream[start:end], prompt_ids(llama, doc["text"]) + [llama.eos_id])
    rows = [packed[i] for i in range(len(packed))]
    targets, weights = np.concatenate([r["targets"] for r in rows]), np.concatenate([r["weights"] for r in rows])
    assert (targets == llama.bos_id).any() and not weights[targets == llama.bos_id].any()


def test_unigram_loss_scores_only_the_tokens_a_model_predicts():
    """Add-one smoothed frequencies of the training targets, averaged over exactly the weighted
    validation targets: every token but each document's first (hand computation)."""
    train_rows = types.SimpleNamespace(stream=np.array([3, 1, 1, 2, 0]), document=np.array([0, 1, 1, 1, 1]))
    # targets 1, 2, 0 (not 3 or the first 1): counts + 1 = [2, 2, 2, 1] / 7
    validation = types.SimpleNamespace(stream=np.array([2, 0, 1, 3, 0]), document=np.array([0, 0, 1, 1, 1]))
    expected = -(np.log(2 / 7) + np.log(1 / 7) + np.log(2 / 7)) / 3  # targets 0, 3, 0 (not 2 or 1)
    predicted = tasks.predicted_tokens(train_rows), tasks.predicted_tokens(validation)
    assert tasks.unigram_loss(*predicted, vocab_size=4) == pytest.approx(expected)


def test_packed_lm_too_little_text(tok):
    """Documents holding fewer tokens than one row (+1) are a ValueError, as is no document."""
    with pytest.raises(ValueError, match="fewer than one row"):
        data.PackedLM([{"text": "Ka to."}], tok, 64)
    with pytest.raises(ValueError):
        data.PackedLM([], tok, 64)


# ----------------------------------------------------------------------------- masking


def test_mask_tokens_statistics():
    """BERT masking over 2000x128 tokens: 15% of maskable chosen; of those 80/10/10 mask/random/kept;
    special tokens never chosen or changed; random replacements only from random_ids."""
    rng = np.random.default_rng(0)
    mask_id = 6
    random_ids = np.arange(7, 27)  # 20 ids, a strict subset of the ids in the text
    tokens = rng.integers(7, 47, size=(2000, 128)).astype(np.int32)
    special = rng.random(tokens.shape) < 0.1
    tokens[special] = rng.integers(0, 6, size=special.sum())  # pad, unk, bos, eos, cls, sep
    maskable = ~special

    masking_rng = np.random.default_rng(1)
    results = [
        data.mask_tokens(t, masking_rng, maskable=m, mask_id=mask_id, random_ids=random_ids)
        for t, m in zip(tokens.copy(), maskable)
    ]
    corrupted = np.stack([c for c, _ in results])
    weights = np.stack([w for _, w in results])
    chosen = weights == 1
    assert set(np.unique(weights).tolist()) == {0.0, 1.0}

    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
    assert not chosen[special].any()
    np.testing.assert_array_equal(corrupted[~chosen], tokens[~chosen])  # only chosen tokens change

    masked = chosen & (corrupted == mask_id)
    changed = chosen & (corrupted != mask_id) & (corrupted != tokens)
    kept = chosen & (corrupted == tokens)
    assert (masked | changed | kept)[chosen].all()
    assert np.isin(corrupted[changed], random_ids).all()
    # a random replacement equals the original with probability 1/len(random_ids) when it is one of them
    same_by_chance = 0.1 * np.isin(tokens[chosen], random_ids).mean() / len(random_ids)
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(changed.sum() / n - (0.1 - same_by_chance)) < 0.01
    assert abs(kept.sum() / n - (0.1 + same_by_chance)) < 0.01


def test_mask_tokens_without_maskable_tokens_changes_nothing():
    """A sequence of special tokens only comes back unchanged with zero weights."""
    tokens = np.array([4, 9, 9, 5, 0, 0], np.int32)
    corrupted, weights = data.mask_tokens(
        tokens, np.random.default_rng(0), maskable=np.zeros(6, bool), mask_id=6, random_ids=np.arange(7, 20)
    )
    np.testing.assert_array_equal(corrupted, tokens)
    assert not weights.any()


def test_span_length_probabilities_are_a_clipped_geometric():
    """SpanBERT's lengths: p(l) proportional to 0.2 * 0.8^(l - 1) for l = 1..10, mean 3.8 words."""
    probabilities = data.span_length_probabilities()
    assert len(probabilities) == 10 and abs(probabilities.sum() - 1) < 1e-12
    np.testing.assert_allclose(probabilities[1:] / probabilities[:-1], 0.8)
    # sum of l q^(l-1) for l <= n is (1 - (n+1) q^n + n q^(n+1)) / (1 - q)^2
    mean = 0.2 * (1 - 11 * 0.8**10 + 10 * 0.8**11) / 0.2**2 / (1 - 0.8**10)
    assert abs(probabilities @ np.arange(1, 11) - mean) < 1e-12 and round(mean, 1) == 3.8


def span_rows(count, length, rng, word_lengths=(1, 2, 3), special_rate=0.05):
    """Random rows of words of 1-3 pieces with special tokens (ids 0-5) among them: tokens,
    maskable, word_starts."""
    tokens = rng.integers(7, 47, size=(count, length)).astype(np.int32)
    word_starts = np.zeros((count, length), bool)
    for row in word_starts:
        row[np.cumsum(rng.choice(word_lengths, size=length)) % length] = True
    word_starts[:, 0] = True
    special = rng.random(tokens.shape) < special_rate
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    tokens[special] = rng.integers(0, 6, size=special.sum())
    return tokens, ~special, word_starts | special


def spans_of(weights, boundaries):
    """The spans (first, one past the last) that `mask_spans` chose, read from the boundaries."""
    chosen = np.flatnonzero(weights)
    return sorted({(int(b[0]) + 1, int(b[1])) for b in boundaries[chosen]})


def test_mask_spans_are_whole_words_until_the_coverage():
    """SpanBERT masking: every span is contiguous whole words inside one run of maskable tokens,
    the boundaries name the tokens just outside it and the offsets count from its start; spans
    are taken until 15% of the maskable tokens are covered, passing it by less than one word."""
    rng = np.random.default_rng(0)
    tokens, maskable, word_starts = span_rows(300, 128, rng)
    coverage = []
    for t, m, w in zip(tokens, maskable, word_starts):
        corrupted, weights, boundaries = data.mask_spans(
            t, rng, maskable=m, word_starts=w, mask_id=6, random_ids=np.arange(7, 47)
        )
        chosen = weights == 1
        assert not chosen[~m].any() and (boundaries[~chosen] == 0).all()
        np.testing.assert_array_equal(corrupted[~chosen], t[~chosen])
        covered, budget = chosen.sum(), round(0.15 * m.sum())
        assert budget <= covered < budget + 3  # words have at most 3 pieces
        coverage.append(covered / m.sum())
        spans = spans_of(weights, boundaries)
        assert sum(end - start for start, end in spans) == covered  # the spans do not overlap
        for start, end in spans:
            assert m[start:end].all() and chosen[start:end].all()
            assert (w[start] or not m[start - 1]) and (end == len(t) or w[end])  # whole words (a special ends one)
            np.testing.assert_array_equal(boundaries[start:end, 2], np.arange(end - start))
    assert abs(np.mean(coverage) - 0.15) < 0.01
    with pytest.raises(ValueError, match="needs an unmaskable first and last token"):  # no boundary before a span
        data.mask_spans(t, rng, maskable=np.ones_like(m), word_starts=w, mask_id=6, random_ids=np.arange(7, 47))


def test_mask_spans_lengths_and_the_80_10_10_rule_per_span():
    """On long rows of one-piece words, span lengths follow the clipped geometric distribution
    (spans cut short by a chosen neighbour or the coverage are few), and each span is masked,
    randomised or kept as a whole, 80/10/10."""
    rng = np.random.default_rng(1)
    tokens, maskable, word_starts = span_rows(40, 2048, rng, word_lengths=(1,), special_rate=0.0)
    lengths, actions = [], collections.Counter()
    for t, m, w in zip(tokens, maskable, word_starts):
        corrupted, weights, boundaries = data.mask_spans(
            t, rng, maskable=m, word_starts=w, mask_id=6, random_ids=np.arange(100, 140)
        )
        for start, end in spans_of(weights, boundaries):
            lengths.append(end - start)
            span = corrupted[start:end]
            kind = "mask" if (span == 6).all() else "kept" if (span == t[start:end]).all() else "random"
            assert kind != "random" or (span >= 100).all()  # never a mix
            actions[kind] += 1
    histogram = np.bincount(lengths, minlength=11)[1:11] / len(lengths)
    assert np.abs(histogram - data.span_length_probabilities()).max() < 0.03
    total = sum(actions.values())
    assert abs(actions["mask"] / total - 0.8) < 0.03 and abs(actions["random"] / total - 0.1) < 0.02


# ----------------------------------------------------------------------------- masked LM examples

MLM_LENGTH = 64


@pytest.fixture(scope="module")
def mlm_docs():
    return documents(30, seed=2, min_sentences=6, max_sentences=20)


@pytest.fixture(scope="module")
def nsp_examples(mlm_docs, tok):
    return data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, pairs=data.Pairs.NEXT_SENTENCE)


def chunk_ids(docs, tok, chunk) -> list[int]:
    """The token ids of a chunk, recomputed from its document's lines."""
    lines = [line for line in docs[chunk.document]["text"].splitlines() if line.strip()]
    return [t for line in lines[chunk.start : chunk.end] for t in tok.encode(line)]


def split_pair(example, tok):
    """[CLS] A [SEP] B [SEP] PAD... -> (A, B, number of real tokens), checking the layout."""
    targets = example["targets"]
    seps = np.flatnonzero(targets == tok.sep_id)
    assert targets[0] == tok.cls_id and len(seps) == 2
    first, second = seps
    return targets[1:first].tolist(), targets[first + 1 : second].tolist(), second + 1


def has_follower(examples, index) -> bool:
    chunks = examples.chunks
    return index + 1 < len(chunks) and chunks[index + 1].document == chunks[index].document


def test_masked_lm_pair_layout(nsp_examples, tok):
    """[CLS] A [SEP] B [SEP] then padding; token types 0 on [CLS] A [SEP], 1 on B [SEP]; segment ids
    1 on real tokens; weights 0 on CLS/SEP/PAD; tokens equal targets wherever the weight is 0."""
    special = list(tok.special_ids)
    for index in range(len(nsp_examples)):
        example = nsp_examples.example(index, np.random.default_rng(index))
        assert set(example) == {"tokens", "token_types", "segment_ids", "targets", "weights", "nsp_labels"}
        first, second, real = split_pair(example, tok)
        assert first and second
        expected_types = [0] * (len(first) + 2) + [1] * (len(second) + 1) + [0] * (MLM_LENGTH - real)
        np.testing.assert_array_equal(example["token_types"], expected_types)
        np.testing.assert_array_equal(example["segment_ids"], np.arange(MLM_LENGTH) < real)
        assert (example["targets"][real:] == tok.pad_id).all()
        assert not example["weights"][np.isin(example["targets"], special)].any()
        unweighted = example["weights"] == 0
        np.testing.assert_array_equal(example["tokens"][unweighted], example["targets"][unweighted])
        assert example["weights"].sum() >= 1


def test_masked_lm_next_sentence_labels(nsp_examples, mlm_docs, tok):
    """Every row starts with a chunk that has a follower in its document. Label 0: B is that
    following chunk. Label 1: B starts a chunk of another document. Over all rows, both labels
    are equally likely (the last chunk of a document is not a row, so it cannot skew them)."""
    chunks = nsp_examples.chunks
    rows_with_follower = [i for i in range(len(chunks)) if has_follower(nsp_examples, i)]
    assert nsp_examples.rows == rows_with_follower and len(nsp_examples) == len(rows_with_follower)
    starts = {}  # the first tokens of every chunk -> its document
    for chunk in chunks:
        starts.setdefault(tuple(chunk_ids(mlm_docs, tok, chunk)[:8]), set()).add(chunk.document)
    labels = []
    for seed in range(8):
        for index in range(len(nsp_examples)):
            example = nsp_examples.example(index, np.random.default_rng([seed, index]))
            first, second, _ = split_pair(example, tok)
            chunk = chunks[nsp_examples.rows[index]]
            assert chunk_ids(mlm_docs, tok, chunk)[: len(first)] == first
            labels.append(int(example["nsp_labels"]))
            if example["nsp_labels"] == 0:
                following = chunks[nsp_examples.rows[index] + 1]
                assert following.start == chunk.end
                assert chunk_ids(mlm_docs, tok, following)[: len(second)] == second
            else:
                assert chunk.document not in starts[tuple(second[:8])]
    assert len(labels) > 1000
    assert abs(np.mean(labels) - 0.5) < 3 * 0.5 / np.sqrt(len(labels))  # three standard deviations


def test_masked_lm_needs_a_document_with_two_chunks(tok):
    docs = [{"text": line} for line in sentences(6, seed=3)]  # one short sentence per document
    with pytest.raises(ValueError, match="at least two chunks"):
        data.MaskedLMExamples(docs, tok, MLM_LENGTH, pairs=data.Pairs.NEXT_SENTENCE)
    assert len(data.MaskedLMExamples(docs, tok, MLM_LENGTH, pairs=data.Pairs.NONE)) == 6


def test_masked_lm_rows_too_short_for_text_are_clear_errors(mlm_docs, tok):
    with pytest.raises(ValueError, match=r"\[CLS\] A \[SEP\] B \[SEP\] needs seq_length >= 5"):
        data.MaskedLMExamples(mlm_docs, tok, 4, pairs=data.Pairs.NEXT_SENTENCE)
    with pytest.raises(ValueError, match=r"\[CLS\] A \[SEP\] needs seq_length >= 3"):
        data.MaskedLMExamples(mlm_docs, tok, 2, pairs=data.Pairs.NONE)
    assert len(data.MaskedLMExamples(mlm_docs, tok, 5, pairs=data.Pairs.NEXT_SENTENCE)) > 0


def test_masked_lm_random_pair_is_not_the_next_chunk_in_a_small_corpus(tok):
    """In a one-document corpus, a label-1 example never pairs A with its true following chunk;
    a corpus too small to draw random pairs from is a clear error."""
    docs = [{"text": "\n".join(sentences(3, seed=7))}]
    with pytest.raises(ValueError, match="at least 3 chunks"):
        data.MaskedLMExamples(docs, tok, MLM_LENGTH, pairs=data.Pairs.NEXT_SENTENCE)
    docs = [{"text": "\n".join(sentences(12, seed=7))}]
    examples = data.MaskedLMExamples(docs, tok, MLM_LENGTH, pairs=data.Pairs.NEXT_SENTENCE)
    assert len(examples) >= 2 and examples.rows[0] == 0 and has_follower(examples, 0)
    following = chunk_ids(docs, tok, examples.chunks[1])
    for seed in range(50):
        example = examples.example(0, np.random.default_rng(seed))
        _, second, _ = split_pair(example, tok)
        if example["nsp_labels"] == 1:
            assert following[: len(second)] != second


def test_masked_lm_is_deterministic_per_rng_seed(nsp_examples):
    """The same (index, rng seed) gives identical examples; other seeds mask differently."""
    for index in (0, len(nsp_examples) // 2, len(nsp_examples) - 1):
        a = nsp_examples.example(index, np.random.default_rng(5))
        b = nsp_examples.example(index, np.random.default_rng(5))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        others = [nsp_examples.example(index, np.random.default_rng(s))["tokens"] for s in range(6, 10)]
        assert any(not np.array_equal(a["tokens"], o) for o in others)


def test_masked_lm_single_segment(mlm_docs, tok):
    """Without next_sentence: [CLS] text [SEP] PAD..., token types all 0, no nsp_labels; the text is
    the start of its chunk; special tokens are never masked."""
    examples = data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, pairs=data.Pairs.NONE)
    for index in range(len(examples)):
        example = examples.example(index, np.random.default_rng(index))
        assert "nsp_labels" not in example
        targets = example["targets"]
        seps = np.flatnonzero(targets == tok.sep_id)
        assert targets[0] == tok.cls_id and len(seps) == 1
        real = seps[0] + 1
        assert targets[1 : real - 1].tolist() == chunk_ids(mlm_docs, tok, examples.chunks[index])[: real - 2]
        assert (targets[real:] == tok.pad_id).all()
        assert not example["token_types"].any()
        np.testing.assert_array_equal(example["segment_ids"], np.arange(MLM_LENGTH) < real)
        assert not example["weights"][np.isin(targets, list(tok.special_ids))].any()
        unweighted = example["weights"] == 0
        np.testing.assert_array_equal(example["tokens"][unweighted], targets[unweighted])


# ----------------------------------------------------------------------------- seq2seq and classification


@pytest.mark.parametrize("lengths", [(48, 40), (8, 6)], ids=["fits", "truncated"])
def test_seq2seq_features(tok, lengths):
    """Source = text + EOS; targets = text + EOS; target_in = [BOS] + targets[:-1] (exact shift);
    weights and segment ids 1 exactly on real tokens; long texts truncated to the lengths."""
    source_length, target_length = lengths
    source_text, target_text = sentences(2, seed=3)
    features = data.seq2seq_features({"source": source_text, "target": target_text}, tok, source_length, target_length)
    source_ids, target_ids = tok.encode(source_text), tok.encode(target_text)
    assert len(source_ids) > 8 and len(target_ids) > 6

    source = source_ids[: source_length - 1] + [tok.eos_id]
    targets = target_ids[: target_length - 1] + [tok.eos_id]
    m, n = len(source), len(targets)
    assert features["source"].shape == (source_length,) and features["targets"].shape == (target_length,)
    assert features["source"][:m].tolist() == source and (features["source"][m:] == tok.pad_id).all()
    assert features["targets"][:n].tolist() == targets and (features["targets"][n:] == tok.pad_id).all()
    assert features["target_in"][:n].tolist() == [tok.bos_id] + features["targets"][: n - 1].tolist()
    assert (features["target_in"][n:] == tok.pad_id).all()
    np.testing.assert_array_equal(features["source_segment_ids"], np.arange(source_length) < m)
    np.testing.assert_array_equal(features["target_segment_ids"], np.arange(target_length) < n)
    np.testing.assert_array_equal(features["weights"], np.arange(target_length) < n)
    assert features["weights"].dtype == np.float32
    if lengths == (8, 6):
        assert m == source_length and n == target_length


@pytest.mark.parametrize("length", [64, 6], ids=["fits", "truncated"])
def test_classification_features(tok, length):
    """[CLS] text [SEP] PAD..., truncated to length, segment ids on real tokens, label kept."""
    text = sentences(1, seed=4)[0]
    features = data.classification_features({"text": text, "label": 3}, tok, length)
    ids = [tok.cls_id, *tok.encode(text)[: length - 2], tok.sep_id]
    assert len(ids) == (6 if length == 6 else len(tok.encode(text)) + 2)
    assert features["tokens"][: len(ids)].tolist() == ids
    assert (features["tokens"][len(ids) :] == tok.pad_id).all()
    np.testing.assert_array_equal(features["segment_ids"], np.arange(length) < len(ids))
    assert features["labels"] == 3 and features["labels"].dtype == np.int32
    assert features["weights"] == 1.0


def _cut_longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Hugging Face's "longest_first", written out: drop the last token of the longer text
    (of the second on a tie) until the two fit."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b


@pytest.mark.parametrize("length", [64, 12, 7], ids=["fits", "cut", "both-cut"])
def test_pair_features_for_an_encoder_and_a_decoder(tok, length):
    """An encoder reads [CLS] A [SEP] B [SEP] with token type 1 on B's segment (0 where the model
    has one type); a decoder A [SEP] B [EOS], whose last real token is the one its head reads.
    Too long, the longer text is cut first (the reference loop above), so B is never lost to A."""
    first, second = sentences(2, seed=9)
    first = first + " " + first  # the longer one
    example = {"text": first, "text_pair": second, "label": 1}
    a, b = _cut_longest_first(tok.encode(first), tok.encode(second), length - 3)
    features = data.classification_features(example, tok, length)
    ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
    assert features["tokens"][: len(ids)].tolist() == ids and (features["tokens"][len(ids):] == tok.pad_id).all()
    np.testing.assert_array_equal(features["token_types"], [0] * (len(a) + 2) + [1] * (len(b) + 1)
                                  + [0] * (length - len(ids)))
    np.testing.assert_array_equal(features["segment_ids"], np.arange(length) < len(ids))
    assert not data.classification_features(example, tok, length, token_types=False)["token_types"].any()
    if length < 64:
        assert len(ids) == length and b  # B keeps its place
    a, b = _cut_longest_first(tok.encode(first), tok.encode(second), length - 2)
    decoded = data.classification_features(example, tok, length, decoder=True)
    ids = [*a, tok.sep_id, *b, tok.eos_id]
    assert decoded["tokens"][: len(ids)].tolist() == ids and "token_types" not in decoded
    np.testing.assert_array_equal(decoded["segment_ids"], np.arange(length) < len(ids))
    single = data.classification_features({"text": second, "label": 0}, tok, length, decoder=True)
    ids = [*tok.encode(second)[: length - 1], tok.eos_id]
    assert single["tokens"][: len(ids)].tolist() == ids and "token_types" not in single


def test_a_decoder_without_a_separator_delimits_a_pair_with_eos():
    """GPT-2's vocabulary has no [SEP]: its end-of-text token delimits the pair (and ends it); a
    tokenizer that adds BOS to prompts (Llama's) has it first."""
    gpt2 = Tokenizer.load(ROOT / "tests" / "fixtures" / "pretrained" / "gpt2")
    assert gpt2.specials.sep is None
    features = data.classification_features({"text": "a b", "text_pair": "c", "label": 0}, gpt2, 16, decoder=True)
    ids = [*gpt2.encode("a b"), gpt2.eos_id, *gpt2.encode("c"), gpt2.eos_id]
    assert features["tokens"][: len(ids)].tolist() == ids
    llama = Tokenizer.load(ROOT / "tests" / "fixtures" / "pretrained" / "llama")  # adds BOS to its prompts: here too
    features = data.classification_features({"text": "a b", "label": 0}, llama, 16, decoder=True)
    ids = [llama.bos_id, *llama.encode("a b"), llama.eos_id]
    assert llama.adds_bos and features["tokens"][: len(ids)].tolist() == ids and features["segment_ids"].sum() == len(ids)


# ----------------------------------------------------------------------------- batches


def indexed(count: int) -> grain.MapDataset:
    """Example i has index i + 1 (0 marks filler), a small token row and weight 1."""
    return grain.MapDataset.source(list(range(count))).map(
        lambda i: {"index": np.int32(i + 1), "tokens": np.arange(3, dtype=np.int32) + 10 * i, "weights": np.float32(1)}
    )


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_deterministic_for_a_seed():
    """Two iterators with the same seed give identical batches; another seed gives other batches."""
    first = take(data.batches(indexed(50), global_batch_size=8, seed=3), 15)
    again = take(data.batches(indexed(50), global_batch_size=8, seed=3), 15)
    other = take(data.batches(indexed(50), global_batch_size=8, seed=4), 15)
    for a, b in zip(first, again):
        assert_same_batch(a, b)
    assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(first, other))
    assert first[0]["tokens"].shape == (8, 3)


def test_batches_every_epoch_is_a_new_permutation():
    """Each epoch visits every example exactly once, in a different order from the other epochs."""
    batches = list(data.batches(indexed(50), global_batch_size=10, seed=0, num_epochs=3))
    assert len(batches) == 15
    order = np.concatenate([b["index"] for b in batches]).reshape(3, 50)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(1, 51))
    assert len({tuple(epoch) for epoch in order}) == 3
    assert order[0].tolist() != list(range(1, 51))  # shuffled


def test_batches_without_shuffle_keep_order():
    """shuffle=False yields the data set in order, epoch after epoch."""
    batches = take(data.batches(indexed(6), global_batch_size=4, shuffle=False), 3)
    assert np.concatenate([b["index"] for b in batches]).tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("k", [2, 8])  # 8 batches of 8 cross the epoch boundary of 50 examples
def test_batches_state_round_trip(k):
    """After k batches, get_state() restored into a fresh iterator gives the same following batches."""
    iterator = data.batches(indexed(50), global_batch_size=8, seed=1)
    take(iterator, k)
    state = iterator.get_state()
    expected = take(iterator, 3)
    fresh = data.batches(indexed(50), global_batch_size=8, seed=1)
    fresh.set_state(state)
    for a, b in zip(expected, take(fresh, 3)):
        assert_same_batch(a, b)


def test_batches_state_round_trip_with_random_masking(nsp_examples):
    """With MLM masking as random_map, a restored iterator reproduces the masks of the next batch."""
    dataset = grain.MapDataset.range(len(nsp_examples))
    mask = nsp_examples.example
    steps_per_epoch = len(nsp_examples) // 8
    iterator = data.batches(dataset, global_batch_size=8, seed=2, random_map=mask)
    take(iterator, steps_per_epoch)
    state = iterator.get_state()
    expected = take(iterator, 2)
    fresh = data.batches(dataset, global_batch_size=8, seed=2, random_map=mask)
    fresh.set_state(state)
    for a, b in zip(expected, take(fresh, 2)):
        assert_same_batch(a, b)


def test_batches_random_map_masks_afresh_every_epoch(nsp_examples):
    """random_map is seeded per element and epoch: the same example is masked differently next epoch."""
    dataset = grain.MapDataset.range(len(nsp_examples))
    size = len(nsp_examples)
    batches = list(
        data.batches(
            dataset, global_batch_size=size, shuffle=False, num_epochs=2,
            random_map=lambda i, rng: nsp_examples.example(i, rng),
        )
    )
    assert len(batches) == 2
    first, second = batches
    different = [not np.array_equal(first["weights"][i], second["weights"][i]) for i in range(size)]
    assert np.mean(different) > 0.9


@pytest.mark.parametrize("process_count", [2, 3])
def test_batches_split_over_processes(process_count):
    """With num_epochs=1 every example appears exactly once over all processes; every process yields
    the same number of batches; at step i the processes' rows are exactly global batch i; filler
    rows are all zero with weight 0."""
    global_batch_size, count = 6, 50
    single = list(data.batches(indexed(count), global_batch_size=global_batch_size, seed=5, num_epochs=1))
    per_process = [
        list(
            data.batches(
                indexed(count), global_batch_size=global_batch_size, seed=5, num_epochs=1,
                process_index=p, process_count=process_count,
            )
        )
        for p in range(process_count)
    ]
    assert len(single) == -(-count // global_batch_size)
    assert [len(b) for b in per_process] == [len(single)] * process_count

    seen = []
    for step, global_batch in enumerate(single):
        rows = {key: np.concatenate([b[step][key] for b in per_process]) for key in global_batch}
        assert all(b[step]["index"].shape == (global_batch_size // process_count,) for b in per_process)
        order, global_order = np.argsort(rows["index"], kind="stable"), np.argsort(global_batch["index"], kind="stable")
        for key in global_batch:
            np.testing.assert_array_equal(rows[key][order], global_batch[key][global_order], err_msg=key)
        filler = rows["index"] == 0
        assert not rows["tokens"][filler].any() and not rows["weights"][filler].any()
        assert (rows["weights"][~filler] == 1).all()
        seen.extend(rows["index"][~filler].tolist())
    assert sorted(seen) == list(range(1, count + 1))


def test_batches_global_batch_must_divide_over_processes():
    """A global batch size not divisible by process_count is a ValueError naming both."""
    with pytest.raises(ValueError, match=r"global_batch_size=7.*2 processes"):
        data.batches(indexed(10), global_batch_size=7, process_count=2)


def test_sentence_order_pairs_are_two_consecutive_chunks_swapped_half_the_time(mlm_docs, tok):
    """ALBERT's pairs: label 0 is A and the chunk after it, label 1 the same two chunks in the
    other order (never a chunk of another document); labels are 50/50."""
    examples = data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, pairs=data.Pairs.SENTENCE_ORDER)
    chunks = examples.chunks
    assert examples.rows == [i for i in range(len(chunks)) if has_follower(examples, i)]
    labels = []
    for seed in range(8):
        for index in range(len(examples)):
            example = examples.example(index, np.random.default_rng([seed, index]))
            first, second, _ = split_pair(example, tok)
            this, following = (chunk_ids(mlm_docs, tok, chunks[examples.rows[index] + k]) for k in (0, 1))
            label = int(example["nsp_labels"])
            before, after = (following, this) if label else (this, following)
            assert before[: len(first)] == first and after[: len(second)] == second  # only cut at the end
            labels.append(label)
    assert len(labels) > 1000
    assert abs(np.mean(labels) - 0.5) < 3 * 0.5 / np.sqrt(len(labels))


def test_full_sentences_pack_across_documents(mlm_docs, tok):
    """RoBERTa's rows: whole sentences in order, a row running on into the next document after a
    [SEP]; together the rows hold the whole text once, and [SEP] is never masked."""
    examples = data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, across_documents=True)
    per_document = data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH)
    assert len(examples) < len(per_document)  # fuller rows
    text = [t for d in mlm_docs for line in d["text"].splitlines() if line.strip() for t in tok.encode(line)]
    rows, crossing = [], 0
    for index in range(len(examples)):
        example = examples.example(index, np.random.default_rng(index))
        real = example["segment_ids"].sum()
        inner = example["targets"][1 : real - 1]
        assert example["targets"][0] == tok.cls_id and example["targets"][real - 1] == tok.sep_id
        assert not example["weights"][example["targets"] == tok.sep_id].any()
        crossing += (inner == tok.sep_id).any()
        rows += [t for t in inner.tolist() if t != tok.sep_id]
    assert rows == text and crossing > 0
    np.testing.assert_array_equal(examples.text_tokens(), text)
    with pytest.raises(ValueError, match="cannot be paired"):
        data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, pairs=data.Pairs.NEXT_SENTENCE, across_documents=True)


def test_span_masked_rows_mask_whole_words_of_the_text(mlm_docs, tok):
    """With span_masking every span starts at a word's first piece ("▁") and ends before the next
    word's or a special token; rows hold span_boundaries; pairs are refused."""
    examples = data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, across_documents=True, span_masking=True)
    spans = 0
    for index in range(len(examples)):
        example = examples.example(index, np.random.default_rng(index))
        targets, weights = example["targets"], example["weights"]
        real = int(example["segment_ids"].sum())
        assert abs(weights.sum() - 0.15 * (real - 2)) < 5  # [CLS] and [SEP] are never masked
        for start, end in spans_of(weights, example["span_boundaries"]):
            assert tok.id_to_token(int(targets[start])).startswith("\u2581")
            assert int(targets[end]) in tok.special_ids or tok.id_to_token(int(targets[end])).startswith("\u2581")
            spans += 1
    assert spans > 2 * len(examples)
    with pytest.raises(ValueError, match="cannot be paired"):
        data.MaskedLMExamples(mlm_docs, tok, MLM_LENGTH, pairs=data.Pairs.SENTENCE_ORDER, span_masking=True)


# ----------------------------------------------------------------------------- span corruption (T5)


@pytest.fixture(scope="module")
def t5_tok(tmp_path_factory):
    """A tokenizer trained with 20 sentinels among its 400 ids."""
    folder = tmp_path_factory.mktemp("t5-tokenizer")
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(sentences(3_000, seed=0)) + "\n")
    return Tokenizer.train([corpus], 400, model_prefix=folder / "spm", extra_ids=20)


def test_tokenizer_trained_with_sentinels_ends_with_them(t5_tok, tmp_path):
    """The sentinels are the last of the vocab_size ids, <extra_id_0> the very last (T5's
    numbering); text names them, decoding writes them, and saving and loading keeps them."""
    assert t5_tok.vocab_size == 400
    assert [t5_tok.token_to_id(f"<extra_id_{k}>") for k in (0, 19, 20)] == [399, 380, None]
    loaded = Tokenizer.load(t5_tok.save(tmp_path))
    assert loaded.vocab_size == 400 and loaded.sentinel_ids == t5_tok.sentinel_ids == frozenset(range(380, 400))
    ids = loaded.encode("Ba <extra_id_3> ko")
    assert 396 in ids and loaded.decode(ids) == t5_tok.decode(ids) == "Ba <extra_id_3> ko"


@pytest.mark.parametrize("source_length, expected", [(512, (568, 114)), (128, (141, 29)), (10, (10, 4))])
def test_span_corruption_lengths_are_t5s(source_length, expected):
    """T5's length arithmetic: 512 input tokens take 568 tokens of text and make 114 target
    tokens (T5's own figures for its C4 pretraining)."""
    assert data.span_corruption_lengths(source_length, 0.15, 3.0) == expected


def _spans_of(target: list[int], sentinel_of: dict[int, int]) -> dict[int, list[int]]:
    """{k: the tokens after sentinel k} of a span-corruption target (EOS dropped)."""
    spans, current = {}, None
    for token in target[:-1]:
        if token in sentinel_of:
            current = sentinel_of[token]
            spans[current] = []
        else:
            spans[current].append(token)
    return spans


@pytest.mark.parametrize("source_length", [10, 32, 128])
def test_span_corruption_inputs_and_targets_reassemble_the_text(t5_tok, source_length):
    """Each row's input fills source_length and its target target_length exactly (EOS last, no
    padding); the target lists sentinels 0, 1, ... in order, each before a non-empty span; each
    input sentinel replaced by its span gives the row's text back; round(15%) of the text is
    dropped in round(noise / 3) spans; the rows are the text's tokens in order."""
    rows = data.SpanCorruptionExamples(documents(60, seed=4), t5_tok, source_length)
    text_length, target_length = data.span_corruption_lengths(source_length, 0.15, 3.0)
    assert rows.target_length == target_length and rows.rows.shape[1] == text_length
    stream = [t for d in documents(60, seed=4) for t in t5_tok.encode(d["text"])]
    assert rows.rows.reshape(-1).tolist() == stream[: rows.rows.size]
    sentinel_of = {int(s): k for k, s in enumerate(rows.sentinels)}
    rng = np.random.default_rng(0)
    for index in range(min(len(rows), 12)):
        features = rows.example(index, rng)
        source, target = features["source"].tolist(), features["targets"].tolist()
        assert len(source) == source_length and len(target) == target_length
        assert source[-1] == target[-1] == t5_tok.eos_id and t5_tok.pad_id not in source + target
        assert features["target_in"].tolist() == [t5_tok.decoder_start_id, *target[:-1]]
        assert features["weights"].tolist() == [1.0] * target_length
        spans = _spans_of(target, sentinel_of)
        assert list(spans) == list(range(len(spans))) and all(spans.values())
        rebuilt = [t for s in source[:-1] for t in (spans[sentinel_of[s]] if s in sentinel_of else [s])]
        assert rebuilt == rows.rows[index].tolist()
        noise = round(0.15 * text_length)
        assert sum(map(len, spans.values())) == noise and len(spans) == round(noise / 3)


def test_span_corruption_draws_new_spans_anywhere_but_the_first_token(t5_tok):
    """Spans are drawn anew at every read: over many draws every token but the first (a kept run
    opens every row) is dropped sometimes, at 15% on average; the same rng seed, the same row."""
    length = 141
    masks = np.stack([data.random_spans_mask(length, np.random.default_rng(seed), 0.15, 3.0) for seed in range(400)])
    assert not masks[:, 0].any() and masks[:, 1:].any(axis=0).all()
    assert masks.mean() == pytest.approx(21 / 141)
    rows = data.SpanCorruptionExamples(documents(60, seed=4), t5_tok, 32)
    first, again = (rows.example(0, np.random.default_rng(7))["source"] for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert any((rows.example(0, np.random.default_rng(s))["source"] != first).any() for s in range(1, 4))


def test_span_corruption_bad_input_is_a_clear_error(t5_tok, tok):
    """Too short a source, too few sentinels, too little text and too dense noise name the setting."""
    with pytest.raises(ValueError, match=r"source_length=8 is too short for span corruption"):
        data.span_corruption_lengths(8, 0.15, 3.0)
    with pytest.raises(ValueError, match=r"leaves .* too few to keep one between"):
        data.span_corruption_lengths(64, 0.9, 1.0)
    with pytest.raises(ValueError, match=r"needs 2 sentinels .* has 0: set tokenizer_extra_ids=2"):
        data.SpanCorruptionExamples(documents(10, seed=1), tok, 32)
    with pytest.raises(ValueError, match=r"needs 28 sentinels .* has 20: set tokenizer_extra_ids=28"):
        data.SpanCorruptionExamples(documents(10, seed=1), t5_tok, 512)
    with pytest.raises(ValueError, match=r"fewer than one span-corruption row of 141 text tokens \(source_length=128\)"):
        data.SpanCorruptionExamples([{"text": "Ba ko."}], t5_tok, 128)


# ----------------------------------------------------------------------------- token classification (named entities)


def test_read_conll_sentences_words_and_tags(tmp_path):
    """The first column is the word, the last its tag (columns between ignored); blank lines end
    sentences, -DOCSTART- lines are skipped, a file's last sentence needs no blank line."""
    path = write(tmp_path / "a.conll", "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\n"
                 "Blackburn NNP I-PER")
    assert data.read_conll([path]) == [
        {"words": ["EU", "rejects"], "tags": ["B-ORG", "O"]}, {"words": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]


@pytest.mark.parametrize("line, message", [("lonely\n", "has one column"), ("word NN B_LOC\n", "tag 'B_LOC' is not IOB2")])
def test_read_conll_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "a.conll", "EU B-ORG\n\n" + line)
    with pytest.raises(ValueError, match=at(path, 3) + ".*" + re.escape(message)):
        data.read_conll([path])


def test_encode_tags_ids_and_unknown_tags():
    """Tags become ids into "O" and the sorted training tags; a validation tag the training data
    never has is an error naming the sentence and the tag."""
    train = [{"words": ["a", "b"], "tags": ["B-PER", "O"]}, {"words": ["c"], "tags": ["B-LOC"]}]
    encoded, names = data.encode_tags(train)
    assert names == ["O", "B-LOC", "B-PER"] and [e["labels"] for e in encoded] == [[2, 0], [1]]
    with pytest.raises(ValueError, match=r"Sentence 0 \('x y'\): tag\(s\) \['I-LOC'\] never occur in the training"):
        data.encode_tags([{"words": ["x", "y"], "tags": ["B-LOC", "I-LOC"]}], names)


def test_token_classification_labels_sit_on_each_words_first_piece(tok):
    """[CLS] pieces [SEP]: a word's label (weight 1) on its first piece, its other pieces and the
    specials weight 0; truncation keeps [SEP] and the labels of the words that fit."""
    words = ["Bakolu", "ka", "Imafetuno"]
    example = {"words": words, "labels": [3, 0, 5]}
    pieces = [tok.encode(w) for w in words]
    assert len(pieces[0]) > 1 and len(pieces[2]) > 1  # several pieces: the alignment shows
    features = data.token_classification_features(example, tok, 32)
    ids = [tok.cls_id, *[p for word in pieces for p in word], tok.sep_id]
    first = np.cumsum([1, *map(len, pieces[:-1])])  # each word's first piece, after [CLS]
    assert features["tokens"][: len(ids)].tolist() == ids
    assert np.flatnonzero(features["weights"]).tolist() == first.tolist()
    assert features["labels"][first].tolist() == [3, 0, 5] and features["labels"].sum() == 8
    short = data.token_classification_features(example, tok, len(pieces[0]) + 3)
    assert short["tokens"][-1] == tok.sep_id and np.flatnonzero(short["weights"]).tolist() == first[:2].tolist()
