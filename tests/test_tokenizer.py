"""Tokenizer: training fixes the special ids, text round-trips, padding, vocabulary checks, clear errors.

Every tokenizer here is trained on synthetic sentences written under pytest's tmp_path;
nothing is downloaded.
"""

import re

import numpy as np
import pytest
from synthetic import sentences

from transformer.config import ModelConfig
from transformer.tokenizer import Tokenizer

VOCAB_SIZE = 400
SPECIAL_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, cls_id=4, sep_id=5, mask_id=6)
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 1.2 MB of text, one sentence per line."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(sentences(20_000, seed=0)) + "\n")
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp(request.param) / "nested" / "spm"  # the parent is created
    return Tokenizer.train([corpus], VOCAB_SIZE, model_prefix=prefix, model_type=request.param)


def held_out(count: int = 50) -> list[str]:
    return sentences(count, seed=99)


# ----------------------------------------------------------------------------- training and loading


def test_train_fixes_special_ids(tokenizer):
    """Whatever the model type, pad 0, unk 1, bos 2, eos 3, [CLS] 4, [SEP] 5, [MASK] 6."""
    for name, token_id in SPECIAL_IDS.items():
        assert getattr(tokenizer, name) == token_id, name
    assert tokenizer.special_ids == frozenset(range(7))
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.path.is_file() and tokenizer.path.suffix == ".model"
    assert tokenizer.path.with_suffix(".vocab").is_file()


def test_load_gives_same_ids_and_encodings(tokenizer):
    """The written .model, loaded again, has the same special ids, size and encodings."""
    loaded = Tokenizer.load(tokenizer.path)
    for name in SPECIAL_IDS:
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    assert loaded.vocab_size == tokenizer.vocab_size
    texts = held_out()
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)


def test_text_encodes_to_ordinary_ids(tokenizer):
    """encode adds no BOS/EOS, known text maps only to ordinary in-range ids, an unseen character to unk."""
    for text in held_out():
        ids = tokenizer.encode(text)
        assert ids, text
        assert all(7 <= i < tokenizer.vocab_size for i in ids), (text, ids)
    assert tokenizer.unk_id in tokenizer.encode("Ka % to")  # a character never seen in training


# ----------------------------------------------------------------------------- encode / decode / pad


def test_encode_decode_round_trip(tokenizer):
    """decode(encode(text)) is the text for ordinary text of the training distribution."""
    for text in held_out() + ["Ka to ri.", "Berquin ash ber grim tho."]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_equals_encode(tokenizer):
    """encode_batch(texts) == [encode(t) for t in texts], in order."""
    texts = held_out() + [""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(iter(texts)) == [tokenizer.encode(t) for t in texts]  # any iterable


def test_pad_pads_and_truncates(tokenizer):
    """pad right-pads with pad_id to `length`, truncates longer rows, mask True exactly on kept tokens."""
    ids, mask = tokenizer.pad([[7, 8, 9], [10], [], list(range(11, 20))], 5)
    np.testing.assert_array_equal(
        ids,
        [
            [7, 8, 9, 0, 0],
            [10, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [11, 12, 13, 14, 15],
        ],
    )
    np.testing.assert_array_equal(
        mask,
        [
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
        ],
    )
    assert ids.dtype == np.int32 and mask.dtype == bool


def test_pad_without_truncation_rejects_long_rows(tokenizer):
    """truncate=False raises on a row longer than `length` (naming it), and pads rows that fit."""
    with pytest.raises(ValueError, match=r"Sequence 1 has 6 tokens.*length=5"):
        tokenizer.pad([[7], [7, 8, 9, 10, 11, 12]], 5, truncate=False)
    ids, mask = tokenizer.pad([[7, 8, 9, 10, 11]], 5, truncate=False)
    np.testing.assert_array_equal(ids, [[7, 8, 9, 10, 11]])
    assert mask.all()


def test_decode_drops_padding(tokenizer):
    """Padded rows decode to the original texts: pad ids contribute nothing."""
    texts = held_out(20)
    ids, mask = tokenizer.pad(tokenizer.encode_batch(texts), 64, truncate=False)
    assert (~mask).any(axis=1).all()  # every row really has padding
    assert tokenizer.decode_batch(ids) == texts
    one = tokenizer.encode(texts[0])
    assert tokenizer.decode([tokenizer.pad_id] + one + [tokenizer.pad_id] * 5) == texts[0]


# ----------------------------------------------------------------------------- model compatibility


def test_check_compatible_accepts_only_the_tokenizers_vocabulary(tokenizer):
    """A model with fewer rows than the tokenizer has ids, or with rows no piece maps to (generation
    could emit ids that cannot be decoded), fails naming both sizes and the fix."""
    tokenizer.check_compatible(ModelConfig.preset("gpt2-tiny", vocab_size=VOCAB_SIZE))
    for model_vocab in (VOCAB_SIZE - 1, VOCAB_SIZE + 1, 50_257):
        config = ModelConfig.preset("gpt2-tiny", vocab_size=model_vocab)
        with pytest.raises(ValueError) as info:
            tokenizer.check_compatible(config)
        message = str(info.value)
        assert f"The tokenizer has {VOCAB_SIZE} pieces but the model's vocab_size is {model_vocab}" in message
        assert f"Set model.vocab_size={VOCAB_SIZE}" in message


# ----------------------------------------------------------------------------- errors


def test_train_on_empty_file_names_it(tmp_path):
    """Training on an empty file is a ValueError naming the file, before sentencepiece runs."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        Tokenizer.train([empty], 100, model_prefix=tmp_path / "spm")
    assert not (tmp_path / "spm.model").exists()


def test_train_on_missing_file_names_it(tmp_path, corpus):
    """A missing training file (even beside a good one) is a FileNotFoundError naming it."""
    missing = tmp_path / "no_such_file.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.train([corpus, missing], 100, model_prefix=tmp_path / "spm")


def test_train_rejects_unknown_model_type_and_no_files(tmp_path, corpus):
    """Only "bpe" and "unigram" are accepted, and at least one file is needed."""
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train([corpus], 100, model_prefix=tmp_path / "spm", model_type="wordpiece")
    with pytest.raises(ValueError, match="at least one"):
        Tokenizer.train([], 100, model_prefix=tmp_path / "spm")


def test_train_with_too_large_vocab_is_a_value_error(tmp_path):
    """sentencepiece's failure becomes a ValueError naming the file and suggesting a smaller vocab_size."""
    small = tmp_path / "small.txt"
    small.write_text("\n".join(sentences(20, seed=5)) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(small))) as info:
        Tokenizer.train([small], 5_000, model_prefix=tmp_path / "spm")
    assert "vocab_size" in str(info.value)


def test_load_missing_path_names_it(tmp_path):
    """Loading a model that does not exist (or a directory) is a FileNotFoundError naming the path."""
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(2_000), b""], ids=["random", "empty"])
def test_load_corrupt_file_names_it(tmp_path, content):
    """A file that is not a sentencepiece model is a ValueError naming the path."""
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        Tokenizer.load(corrupt)
