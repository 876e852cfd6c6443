"""Tokenizer: training fixes the special ids, text round-trips, padding, vocabulary checks, clear errors;
checkpoint tokenizers (vocab.txt, tokenizer.json, vocab.json + merges.txt, spiece.model) load with
the special tokens their files name, and save to a layout that loads back the same.

Every tokenizer here is trained or written under pytest's tmp_path; nothing is downloaded.
"""

import builtins
import dataclasses
import errno
import io
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from synthetic import sentences

from transformer.config import ModelConfig
from transformer.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, SpecialTokens, Tokenizer

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


def test_vocab_file_lists_every_piece_with_its_score(tokenizer):
    """The .vocab is sentencepiece's: a "piece<TAB>score" line per id, in id order, the score as
    sentencepiece writes it (C++'s default float format, %g)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    expected = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    assert tokenizer.path.with_suffix(".vocab").read_bytes() == expected.encode("utf-8")


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


# Texts whose encoding depends on sentencepiece's normalisation: runs of spaces, leading and
# trailing spaces, tabs and line breaks, NFKC's ligatures and full-width letters, unknown characters.
NORMALISED = ["Hello,  world!  Two  spaces.", "  leading and trailing  ", "tab\there\nand a line", "ﬁne ＡＢＣ",
              "café 東京 ½", "multiple    inner     spaces", "   ", "", "end  ", "a [MASK] b [SEP] c"]


def test_a_llama_or_albert_class_save_writes_a_tokenizer_json_that_encodes_as_the_model(tokenizer, tmp_path):
    """transformers' fast Llama and Albert tokenizers read tokenizer.json, else convert the model
    without its normalisation (other ids for the texts above; Albert's ends a text that ends in
    spaces with a "▁"); T5's fast tokenizer keeps it, so T5's class needs none."""
    tokenizer.save(tmp_path / "llama", tokenizer_class="LlamaTokenizer")
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    for text in NORMALISED + held_out():
        assert fast.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), repr(text)
    tokenizer.save(tmp_path / "albert", tokenizer_class="AlbertTokenizer")
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "albert" / "tokenizer.json"))
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    for text in NORMALISED + held_out():
        assert fast.encode(text).ids == [cls, *tokenizer.encode(text), sep], repr(text)
    pair = fast.encode("Ka to", "ri ber")
    assert pair.ids == [cls, *tokenizer.encode("Ka to"), sep, *tokenizer.encode("ri ber"), sep]
    assert pair.type_ids == [0] * (len(tokenizer.encode("Ka to")) + 2) + [1] * (len(tokenizer.encode("ri ber")) + 1)
    tokenizer.save(tmp_path / "t5", tokenizer_class="T5Tokenizer")
    assert not (tmp_path / "t5" / "tokenizer.json").exists()


def test_tokens_added_in_transformers_are_read_from_tokenizer_json(tokenizer, tmp_path):
    """LlamaTokenizerFast saves tokenizer.model and a tokenizer.json that alone holds its added
    tokens (a chat model's end token): the directory loads the json, with them."""
    directory = tokenizer.save(tmp_path / "llama", tokenizer_class="LlamaTokenizer")
    with_added = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    with_added.add_special_tokens(["<|end|>"])
    with_added.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|end|>"}))
    loaded = Tokenizer.load(directory)
    end = tokenizer.vocab_size
    assert (loaded.vocab_size, loaded.eos_id) == (end + 1, end)
    assert loaded.encode("a b <|end|>") == tokenizer.encode("a b") + [end]


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


def test_check_compatible_allows_padding_rows_but_not_missing_ones(tokenizer):
    """A model with extra embedding rows (published checkpoints pad theirs) is accepted; one with
    fewer rows than the tokenizer has ids fails naming both sizes and the fix."""
    for model_vocab in (VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 112):
        tokenizer.check_compatible(ModelConfig.preset("gpt2-tiny", vocab_size=model_vocab))
    for model_vocab in (VOCAB_SIZE - 1, 7):
        with pytest.raises(ValueError) as info:
            tokenizer.check_compatible(ModelConfig.preset("gpt2-tiny", vocab_size=model_vocab))
        message = str(info.value)
        assert f"The tokenizer has {VOCAB_SIZE} pieces but the model's vocab_size is {model_vocab}" in message
        assert f"ids >= {model_vocab} have no embedding" in message
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


class FillsTheDisk:
    """A file being written when the disk fills: a write stores half its data, then fails."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("suffix", [".model", ".vocab"])
def test_train_on_a_full_disk_names_the_file_and_leaves_no_part_of_it(tmp_path, monkeypatch, suffix):
    """A disk that fills while a trained file is written is an OSError naming the file, that no
    space is left and the fix; no part of the file is left behind (the model is written first: a
    full disk at the .vocab leaves a whole model)."""
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(sentences(300, seed=0)) + "\n")
    folder = tmp_path / "out"
    target = folder / f"spm{suffix}"
    real_open = open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        writes_target = isinstance(file, (str, pathlib.Path)) and str(file).startswith(str(target))
        return FillsTheDisk(opened) if writes_target and mode[0] in "wxa" else opened

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(OSError) as info:
        Tokenizer.train([corpus], 100, model_prefix=folder / "spm")
    monkeypatch.undo()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"{target} (No space left on device)" in message
    assert "free some space" in message
    assert sorted(path.name for path in folder.iterdir()) == ([] if suffix == ".model" else ["spm.model"])
    if suffix == ".vocab":
        assert Tokenizer.load(folder / "spm.model").vocab_size == 100


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


# ----------------------------------------------------------------------------- checkpoint tokenizers
# Tiny tokenizers in the layouts of published checkpoints, made here: BERT's vocab.txt, a
# tokenizer.json, GPT-2's vocab.json + merges.txt, T5's spiece.model.

WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat", "##s", "."]
TEXT = "The cats sat on a mat."
TEXT_IDS = [5, 6, 11, 7, 8, 9, 10, 12]  # the cat ##s sat on a mat .
BERT_SPECIALS = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
T5_PIECES = 60  # pad 0, eos 1, unk 2 and no bos, as T5's spiece.model
T5_SPECIALS = SpecialTokens(pad=0, eos=1, unk=2)
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


def write_json(directory: pathlib.Path, name: str, content: dict) -> None:
    (directory / name).write_text(json.dumps(content))


def wordpiece_dir(directory: pathlib.Path) -> pathlib.Path:
    (directory / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n")
    return directory


def tokenizer_json_dir(directory: pathlib.Path) -> pathlib.Path:
    """The WordPiece vocabulary as a tokenizer.json that pads to 16, truncates to 3 and adds [CLS]/[SEP]."""
    bert = tokenizers.implementations.BertWordPieceTokenizer({t: i for i, t in enumerate(WORDPIECE_VOCAB)})
    bert.enable_padding(length=16)
    bert.enable_truncation(max_length=3)
    assert bert.encode("the cat").ids == [2, 5, 3] + [0] * 13  # what the baked-in settings would give
    bert.save(str(directory / "tokenizer.json"))
    return directory


def byte_level_dir(directory: pathlib.Path) -> pathlib.Path:
    """GPT-2's layout: a byte-level BPE with <|endoftext|> as id 0, and no other special token."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    texts = sentences(200, seed=0)
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(directory))
    return directory


@pytest.fixture(scope="module")
def t5_model() -> bytes:
    """A sentencepiece model with T5's ids: pad 0, eos 1, unk 2, no bos."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(300, seed=0)), model_writer=model, vocab_size=T5_PIECES,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return model.getvalue()


def t5_dir(directory: pathlib.Path, model: bytes, **tokenizer_config) -> pathlib.Path:
    (directory / "spiece.model").write_bytes(model)
    write_json(directory, "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", **tokenizer_config})
    return directory


@pytest.fixture(scope="module")
def small_trained(tmp_path_factory) -> Tokenizer:
    """A tokenizer of this library's own (fixed special ids), small enough to train in a moment."""
    folder = tmp_path_factory.mktemp("small")
    (folder / "train.txt").write_text("\n".join(sentences(300, seed=0)) + "\n")
    return Tokenizer.train([folder / "train.txt"], 100, model_prefix=folder / "spm")


@pytest.fixture(params=["wordpiece", "tokenizer.json", "byte-level", "t5", "trained"])
def checkpoint_tokenizer(request, tmp_path, t5_model, small_trained):
    """Each backend in each layout, loaded from its directory."""
    if request.param == "trained":  # a run directory of this library
        shutil.copyfile(small_trained.path, tmp_path / "tokenizer.model")
    else:
        make = {"wordpiece": wordpiece_dir, "tokenizer.json": tokenizer_json_dir, "byte-level": byte_level_dir,
                "t5": lambda d: t5_dir(d, t5_model, extra_ids=3)}[request.param]
        make(tmp_path)
    return Tokenizer.load(tmp_path)


def test_wordpiece_vocab_gives_berts_ids(tmp_path):
    """vocab.txt is lowercased WordPiece; BERT's special tokens are found by their names, never split
    in text, and dropped by decode."""
    bert = Tokenizer.load(wordpiece_dir(tmp_path))
    assert isinstance(bert, HuggingFaceTokenizer) and bert.path == tmp_path / "vocab.txt"
    assert bert.encode(TEXT) == TEXT_IDS
    assert bert.encode("the [MASK] dog") == [5, 4, 1]
    assert bert.decode([2, *TEXT_IDS, 3, 0, 0]) == "the cats sat on a mat."
    assert bert.specials == BERT_SPECIALS and bert.special_ids == frozenset(range(5))
    assert bert.vocab_size == len(WORDPIECE_VOCAB)


def test_wordpiece_keeps_case_when_the_config_says_so(tmp_path):
    write_json(wordpiece_dir(tmp_path), "tokenizer_config.json", {"do_lower_case": False})
    assert Tokenizer.load(tmp_path).encode("The cat") == [1, 6]


@pytest.mark.parametrize("settings, ids", [
    ({}, [10, 8]),  # lowercased, accents stripped: "mat" "on"
    ({"strip_accents": False}, [1, 1]),  # lowercased, accents kept: no such words
    ({"do_lower_case": False}, [1, 1]),  # as cased BERT: accents kept too
    ({"do_lower_case": False, "strip_accents": True}, [10, 8]),
])
def test_wordpiece_strips_accents_as_the_config_says(tmp_path, settings, ids):
    """BertTokenizer's strip_accents follows do_lower_case unless the config sets it."""
    write_json(wordpiece_dir(tmp_path), "tokenizer_config.json", settings)
    assert Tokenizer.load(tmp_path).encode("mát ón") == ids


def test_wordpiece_splits_chinese_characters_unless_the_config_says_not(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB + ["東", "京", "東京"]) + "\n")
    assert Tokenizer.load(tmp_path).encode("東京") == [13, 14]
    write_json(tmp_path, "tokenizer_config.json", {"tokenize_chinese_chars": False})
    assert Tokenizer.load(tmp_path).encode("東京") == [15]


def test_tokenizer_json_padding_truncation_and_specials_are_off(tmp_path):
    """The padding, truncation and [CLS]/[SEP] baked into a tokenizer.json are not applied, whether
    it is loaded from its directory or its file."""
    tokenizer_json_dir(tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.path == tmp_path / "tokenizer.json"
        assert loaded.encode_batch(["the cat", TEXT]) == [[5, 6], TEXT_IDS]
        assert loaded.encode("the cat") == [5, 6]
        assert loaded.specials == BERT_SPECIALS


def test_byte_level_bpe_is_gpt2_like(tmp_path):
    """vocab.json + merges.txt encode as the tokenizers library does; <|endoftext|> is BOS and EOS
    and pads (there is no pad token), stays one token in text and is dropped by decode."""
    gpt2 = Tokenizer.load(byte_level_dir(tmp_path))
    reference = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = held_out(20)
    assert gpt2.encode_batch(texts) == [reference.encode(t).ids for t in texts]
    assert gpt2.specials == SpecialTokens(bos=0, eos=0)
    assert gpt2.pad_id == gpt2.eos_id == 0
    assert gpt2.encode("<|endoftext|>") == [0]
    assert gpt2.decode_batch([gpt2.encode(t) + [0, 0] for t in texts]) == texts
    assert gpt2.vocab_size == 300


def test_sentencepiece_loads_from_directory_and_file(tmp_path, t5_model):
    """spiece.model with T5's tokenizer_config.json: the same tokenizer from the directory or the file."""
    t5_dir(tmp_path, t5_model, extra_ids=0, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    processor = spm.SentencePieceProcessor(model_proto=t5_model)
    texts = held_out(20)
    for path in (tmp_path, tmp_path / "spiece.model"):
        t5 = Tokenizer.load(path)
        assert isinstance(t5, SentencePieceTokenizer) and t5.path == tmp_path / "spiece.model"
        assert t5.specials == T5_SPECIALS and t5.vocab_size == T5_PIECES
        assert t5.encode_batch(texts) == processor.encode(texts)
        assert t5.decode_batch(t5.encode_batch(texts)) == texts


def test_run_directory_tokenizer_model_comes_first(tmp_path, small_trained, t5_model):
    """A directory with tokenizer.model (this library's runs) loads it, before any other file."""
    shutil.copyfile(small_trained.path, tmp_path / "tokenizer.model")
    t5_dir(tmp_path, t5_model)
    wordpiece_dir(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.path == tmp_path / "tokenizer.model"
    assert loaded.specials == SpecialTokens(**{name[:-3]: i for name, i in SPECIAL_IDS.items()})
    assert loaded.encode_batch(held_out()) == small_trained.encode_batch(held_out())


def test_t5_extra_ids_follow_the_pieces_in_reverse(tmp_path, t5_model):
    """As T5Tokenizer numbers them, <extra_id_0> is the last id; they count in vocab_size, are
    special, and decode writes them as text where it drops the other special ids."""
    t5 = Tokenizer.load(t5_dir(tmp_path, t5_model, extra_ids=3))
    assert t5.vocab_size == T5_PIECES + 3
    assert [t5.token_to_id(f"<extra_id_{k}>") for k in range(4)] == [62, 61, 60, None]
    assert t5.token_to_id("<extra_id_0>") == t5.vocab_size - 1
    assert [t5.id_to_token(i) for i in (60, 62)] == ["<extra_id_2>", "<extra_id_0>"]
    assert t5.special_ids == frozenset({0, 1, 2, 60, 61, 62})
    text = held_out(1)[0]
    assert t5.decode([62, *t5.encode(text), 60, 1, 0]) == f"<extra_id_0> {text} <extra_id_2>"


# transformers 4.57.6's AutoTokenizer (T5TokenizerFast; T5Tokenizer gives the same ids) over the t5
# fixture's spiece.model and config.json alone: each text's ids, and T5Tokenizer's decoding of them.
T5_SENTINEL_TEXTS = {
    "Hello <extra_id_0> world": ([3, 137, 21, 22, 69, 249, 3, 92, 17, 65], "Hello <extra_id_0> world"),
    "The <extra_id_0> river<extra_id_1>is quiet.": (
        [3, 145, 23, 249, 121, 60, 72, 248, 3, 26, 3, 96, 21, 10, 7], "The <extra_id_0> river <extra_id_1> is quiet."),
    "x<extra_id_0>y <extra_id_99> b": ([3, 131, 249, 3, 11, 150, 33], "x <extra_id_0> y <extra_id_99> b"),
}
# "<extra_id_100> <extra_id_07>": not sentinels (past the 100, and misspelt), ordinary text.
NOT_SENTINEL_IDS = [3, 2, 43, 10, 17, 18, 2, 60, 8, 2, 3, 2, 43, 10, 17, 18, 2, 60, 8, 2]


def test_t5_sentinels_in_text_encode_to_their_ids(tmp_path):
    """A T5 directory with spiece.model alone has transformers' 100 sentinels: `<extra_id_k>` in a
    text is its id (the spaces around it dropped), and decoding writes it back."""
    for name in ("spiece.model", "config.json"):
        shutil.copyfile(FIXTURES / "t5" / name, tmp_path / name)
    t5 = Tokenizer.load(tmp_path)
    assert t5.vocab_size == 150 + 100
    for text, (ids, decoded) in T5_SENTINEL_TEXTS.items():
        assert t5.encode(text) == ids, text
        assert t5.decode(ids) == decoded, text
    assert t5.encode_batch(T5_SENTINEL_TEXTS) == [ids for ids, _ in T5_SENTINEL_TEXTS.values()]
    assert t5.encode("<extra_id_100> <extra_id_07>") == NOT_SENTINEL_IDS


def test_t5_sentinels_of_a_tokenizer_json_are_decoded_too(tmp_path):
    """T5's tokenizer.json holds the sentinels as special added tokens: decode writes them, as for spiece.model."""
    tokenizer_json_dir(tmp_path)
    built = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    built.add_special_tokens([tokenizers.AddedToken("<extra_id_0>", lstrip=True, rstrip=True)])
    built.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("the cat <extra_id_0> sat") == [5, 6, 13, 7]
    assert loaded.decode([5, 6, 13, 7, 0]) == "the cat <extra_id_0> sat"


@pytest.mark.parametrize(
    "config, extra_ids", [({}, 100), ({"extra_ids": 0}, 0), ({"tokenizer_class": "PreTrainedTokenizer"}, 0)]
)
def test_t5_extra_ids_default_to_100_for_t5_only(tmp_path, t5_model, config, extra_ids):
    t5 = Tokenizer.load(t5_dir(tmp_path, t5_model, **config))
    assert t5.vocab_size == T5_PIECES + extra_ids


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"tokenizer_config.json": {"bos_token": "[CLS]", "eos_token": {"content": "[SEP]"}}}, dict(bos=2, eos=3)),
        ({"special_tokens_map.json": {"bos_token": "[CLS]", "eos_token": "[SEP]"}}, dict(bos=2, eos=3)),
        ({"config.json": {"bos_token_id": 2, "eos_token_id": [3, 4], "pad_token_id": 4}}, dict(bos=2, eos=3, pad=4)),
        ({"tokenizer_config.json": {"pad_token": "[MASK]", "bos_token": None},  # the first file naming a kind wins
          "special_tokens_map.json": {"pad_token": "[SEP]", "bos_token": "[CLS]"},
          "config.json": {"pad_token_id": 1}}, dict(pad=4, bos=2)),
    ],
    ids=["tokenizer_config", "special_tokens_map", "config", "precedence"],
)
def test_huggingface_specials_come_from_the_files(tmp_path, files, expected):
    """Named in tokenizer_config.json, else special_tokens_map.json, else by id in config.json,
    else the well-known names ([PAD], [CLS], ...) in the vocabulary."""
    for name, content in files.items():
        write_json(wordpiece_dir(tmp_path), name, content)
    assert Tokenizer.load(tmp_path).specials == dataclasses.replace(BERT_SPECIALS, **expected)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"tokenizer_config.json": {"bos_token": "</s>", "pad_token": "<extra_id_0>"}}, dict(bos=1, pad=62)),
        ({"config.json": {"bos_token_id": 0, "eos_token_id": 61}}, dict(bos=0, eos=61)),
    ],
    ids=["tokenizer_config", "config"],
)
def test_sentencepiece_specials_come_from_the_files(tmp_path, t5_model, files, expected):
    """The files beside a spiece.model override the ids the model records (pad 0, eos 1, unk 2)."""
    t5_dir(tmp_path, t5_model, extra_ids=3)
    for name, content in files.items():
        config = json.loads((tmp_path / name).read_text()) if (tmp_path / name).exists() else {}
        write_json(tmp_path, name, config | content)
    assert Tokenizer.load(tmp_path).specials == dataclasses.replace(T5_SPECIALS, **expected)


@pytest.mark.parametrize(
    "make, kind, file",
    [(wordpiece_dir, "bos", "vocab.txt"), (byte_level_dir, "cls", "vocab.json"), (None, "bos", "spiece.model")],
    ids=["bert", "gpt2", "t5"],
)
def test_a_missing_special_token_names_the_tokenizer_and_the_fix(tmp_path, t5_model, make, kind, file):
    """BERT has no BOS, GPT-2 no [CLS], T5 no BOS: asking for one says so; loading does not fail."""
    loaded = Tokenizer.load(make(tmp_path) if make else t5_dir(tmp_path, t5_model))
    with pytest.raises(ValueError) as info:
        getattr(loaded, f"{kind}_id")
    message = str(info.value)
    assert f"The tokenizer of {tmp_path / file} has no {kind.upper()} token" in message
    assert f"name one as {kind}_token in the tokenizer_config.json" in message


def test_save_then_load_gives_the_same_tokenizer(checkpoint_tokenizer, tmp_path):
    """save writes Hugging Face's layout; loading it back gives the same ids, specials and size."""
    saved = Tokenizer.load(checkpoint_tokenizer.save(tmp_path / "saved"))
    assert type(saved) is type(checkpoint_tokenizer)
    assert saved.specials == checkpoint_tokenizer.specials
    assert saved.special_ids == checkpoint_tokenizer.special_ids
    assert saved.vocab_size == checkpoint_tokenizer.vocab_size
    texts = held_out() + [TEXT, "<|endoftext|> [MASK] <extra_id_0>"]
    assert saved.encode_batch(texts) == checkpoint_tokenizer.encode_batch(texts)
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    for kind, token_id in dataclasses.asdict(saved.specials).items():
        assert config.get(f"{kind}_token") == (None if token_id is None else saved.id_to_token(token_id))
    if isinstance(saved, SentencePieceTokenizer):
        assert config["tokenizer_class"] == "T5Tokenizer" and config["extra_ids"] == saved.extra_ids
        assert {p.name for p in (tmp_path / "saved").iterdir()} == {"spiece.model", "tokenizer_config.json"}
    else:
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert {p.name for p in (tmp_path / "saved").iterdir()} == {"tokenizer.json", "tokenizer_config.json"}


def test_check_compatible_allows_a_padded_t5_embedding(tmp_path, t5_model):
    """T5 pads its embedding past its ids (32100 ids, 32128 rows); fewer rows than ids fails."""
    t5 = Tokenizer.load(t5_dir(tmp_path, t5_model, extra_ids=4))
    t5.check_compatible(ModelConfig.preset("gpt2-tiny", vocab_size=80))
    with pytest.raises(ValueError, match="The tokenizer has 64 pieces but the model's vocab_size is 60"):
        t5.check_compatible(ModelConfig.preset("gpt2-tiny", vocab_size=T5_PIECES))


@pytest.mark.parametrize("checkpoint", sorted(FIXTURES.glob("*/tokenizer_reference.json")), ids=lambda p: p.parent.name)
def test_checkpoint_fixtures_match_transformers(checkpoint):
    """The tokenizers of the checkpoints in tests/fixtures give the ids, specials and size that
    Hugging Face transformers gave when it wrote them."""
    reference = json.loads(checkpoint.read_text())
    loaded = Tokenizer.load(checkpoint.parent)
    assert loaded.encode_batch(reference["texts"]) == reference["ids"]
    assert dataclasses.asdict(loaded.specials) == reference["special"]
    assert loaded.vocab_size == reference["vocab_size"]


def test_empty_directory_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in ("tokenizer.model", "tokenizer.json", "spiece.model", "vocab.json + merges.txt", "vocab.txt"):
        assert name in message


@pytest.mark.parametrize(
    "name, content",
    [("tokenizer.json", "{not json"), ("tokenizer.json", '{"model": {"type": "Nothing"}}'),
     ("vocab.txt", "the\ncat\n"), ("vocab.txt", b"\xff\xfe\x00")],
    ids=["json-syntax", "json-model", "vocab-without-sep", "vocab-binary"],
)
def test_corrupt_tokenizer_file_names_it(tmp_path, name, content):
    """A tokenizer.json or vocab.txt that the tokenizers library refuses is a ValueError naming it."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.load(tmp_path)


def test_bad_config_files_are_named(tmp_path):
    """An unreadable tokenizer_config.json, one naming a token the vocabulary lacks, or a config.json
    id outside the vocabulary is a ValueError naming the file (and the token)."""
    write_json(wordpiece_dir(tmp_path), "tokenizer_config.json", {"eos_token": "</s>"})
    config = tmp_path / "tokenizer_config.json"
    with pytest.raises(ValueError, match=re.escape(f"{config} names '</s>' as the eos_token")):
        Tokenizer.load(tmp_path)
    config.write_text("{oops")
    with pytest.raises(ValueError, match=re.escape(f"{config} is not valid JSON")):
        Tokenizer.load(tmp_path)
    config.unlink()
    write_json(tmp_path, "config.json", {"pad_token_id": len(WORDPIECE_VOCAB)})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'} sets pad_token_id=13, outside")):
        Tokenizer.load(tmp_path)


def test_a_sentencepiece_tokenizer_that_adds_bos_keeps_it_when_saved(tmp_path, tokenizer):
    """Llama's tokenizer.model starts texts with <s>: saved and loaded again, it still does."""
    trained = tokenizer
    (tmp_path / "llama").mkdir()
    shutil.copyfile(trained.path, tmp_path / "llama" / "tokenizer.model")
    for name in ("LlamaTokenizer", "LlamaTokenizerFast"):
        (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": name}))
        llama = Tokenizer.load(tmp_path / "llama")
        assert llama.adds_bos and not trained.adds_bos, name
    assert Tokenizer.load(llama.save(tmp_path / "saved")).adds_bos


# ----------------------------------------------------------------------------- ALBERT's preprocessing
# AlbertTokenizer changes text before sentencepiece sees it (the options its tokenizer_config.json
# names) and splits the pieces that end in a digit and a comma. A unigram model written by hand
# shows each step: its pieces' scores decide every encoding below.

ALBERT_TEXT = "  Déjà\t VU  ``ok''  "


def albert_model() -> bytes:
    """ALBERT's ids (<pad> 0, <unk> 1, control [CLS] 2, [SEP] 3, [MASK] 4), no normalisation rule,
    words and digit-comma pieces that score above their characters."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto, kinds = model_pb2.ModelProto(), model_pb2.ModelProto.SentencePiece
    proto.trainer_spec.MergeFrom(model_pb2.TrainerSpec(model_type="UNIGRAM", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1))
    proto.normalizer_spec.name = "identity"
    for piece in ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"):
        proto.pieces.add(piece=piece, score=0, type=kinds.UNKNOWN if piece == "<unk>" else kinds.CONTROL)
    for piece in ["▁deja", "▁vu", '▁"', "ok", "▁9,", "9,", "▁9", "▁1"]:
        proto.pieces.add(piece=piece, score=-1)
    for piece in '▁9,1"dejavuokDVUéà':
        proto.pieces.add(piece=piece, score=-5)
    return proto.SerializeToString()


def albert_dir(directory: pathlib.Path, **tokenizer_config) -> pathlib.Path:
    """spiece.model and a tokenizer_config.json for AlbertTokenizer, [CLS] its bos_token as in ALBERT's."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(albert_model())
    config = {"tokenizer_class": "AlbertTokenizer", "bos_token": "[CLS]", "eos_token": "[SEP]", **tokenizer_config}
    write_json(directory, "tokenizer_config.json", config)
    return directory


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


@pytest.mark.parametrize(
    "config, prepared",
    [({}, 'deja vu "ok"'),  # AlbertTokenizer's defaults: lowercased, accents dropped, whitespace folded
     ({"tokenizer_class": "AlbertTokenizerFast"}, 'deja vu "ok"'),
     ({"do_lower_case": False}, 'Deja VU "ok"'),
     ({"keep_accents": True}, 'déjà vu "ok"'),
     ({"remove_space": False}, '  deja\t vu  "ok"  ')],  # sentencepiece still folds the spaces, not the tab
    ids=["defaults", "fast-class", "cased", "accents", "spaces"],
)
def test_an_albert_tokenizer_encodes_the_text_as_albert_prepares_it(tmp_path, config, prepared):
    """The text's ids are those of the text AlbertTokenizer gives sentencepiece; `` and '' are
    always a "."""
    albert = Tokenizer.load(albert_dir(tmp_path / "albert", **config))
    (tmp_path / "plain.model").write_bytes(albert_model())
    plain = Tokenizer.load(tmp_path / "plain.model")  # no tokenizer_config.json beside it: no preprocessing
    assert albert.encode(ALBERT_TEXT) == plain.encode(prepared)
    assert albert.encode_batch([ALBERT_TEXT, prepared]) == [albert.encode(ALBERT_TEXT), albert.encode(prepared)]
    if not config:
        assert pieces(albert, ALBERT_TEXT) == ["▁deja", "▁vu", '▁"', "ok", '"']


def test_an_albert_tokenizer_splits_a_piece_that_ends_in_a_digit_and_a_comma(tmp_path):
    """As AlbertTokenizer: the digits encoded again apart, then the comma, and no "▁" inside a word."""
    albert = Tokenizer.load(albert_dir(tmp_path))
    assert pieces(albert, "9,9") == ["▁9", ",", "9"]  # sentencepiece alone: "▁9,", "9"
    assert pieces(albert, "19,9") == ["▁1", "9", ",", "9"]  # sentencepiece alone: "▁1", "9,", "9"
    assert albert.encode_batch(["9,9", "19,9"]) == [albert.encode("9,9"), albert.encode("19,9")]


@pytest.mark.parametrize("config", [{}, {"do_lower_case": False, "keep_accents": True, "remove_space": False}],
                         ids=["defaults", "least"])
def test_an_albert_tokenizer_saves_its_preprocessing(tmp_path, config):
    """Saved as AlbertTokenizer (the only class it saves as, and its default), the settings are in
    tokenizer_config.json and come back; the tokenizer.json beside them (what the directory
    loads) encodes as the tokenizer, [CLS] first and not taken for a BOS though it is the bos_token."""
    albert = Tokenizer.load(albert_dir(tmp_path / "albert", **config))
    saved = albert.save(tmp_path / "saved", tokenizer_class="AlbertTokenizer")
    settings = json.loads((saved / "tokenizer_config.json").read_text())
    expected = {"do_lower_case": True, "remove_space": True, "keep_accents": False} | config
    assert {name: settings[name] for name in expected} == expected
    assert Tokenizer.load(saved / "spiece.model").preprocessing == albert.preprocessing
    again = Tokenizer.load(saved)
    texts = [ALBERT_TEXT, "9,9 and 19,9", 'deja vu "ok"', "", "   "]
    assert again.encode_batch(texts) == albert.encode_batch(texts)
    assert (again.specials, again.adds_bos, albert.adds_bos) == (albert.specials, False, False)
    default = albert.save(tmp_path / "default") / "tokenizer_config.json"
    assert json.loads(default.read_text())["tokenizer_class"] == "AlbertTokenizer"
    with pytest.raises(ValueError, match="save it as tokenizer_class='AlbertTokenizer'"):
        albert.save(tmp_path / "t5", tokenizer_class="T5Tokenizer")


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level", "wordpiece"])
def test_word_starts_cut_the_ids_into_the_texts_words(kind, tmp_path, small_trained):
    """`word_starts` marks the first piece of each word ("▁" and "Ġ" pieces; the pieces without
    "##"), so the ids cut there decode to the text's words (a text's first piece begins one)."""
    if kind == "wordpiece":
        tok, texts, words = Tokenizer.load(wordpiece_dir(tmp_path)), [TEXT], [["the", "cats", "sat", "on", "a", "mat", "."]]
    else:
        tok = small_trained if kind == "sentencepiece" else Tokenizer.load(byte_level_dir(tmp_path))
        texts = held_out(20)
        words = [text.split() for text in texts]
    assert tok.word_starts.shape == (tok.vocab_size,) and tok.word_starts[list(tok.special_ids)].all()
    for text, expected in zip(texts, words):
        ids = tok.encode(text)
        starts = np.flatnonzero(tok.word_starts[ids][1:]) + 1
        assert [tok.decode(piece).strip() for piece in np.split(ids, starts)] == expected


def test_word_starts_follow_the_model_not_a_stray_piece_and_fail_without_markers(tmp_path):
    """A byte-level BPE whose vocabulary holds "##" pieces (Markdown headings) still begins words at
    "Ġ"; a BPE split on whitespace without markers cannot tell words apart: a clear error."""
    texts = [f"## {text}" for text in sentences(200, seed=0)]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    tok = Tokenizer.load(tmp_path)
    assert tok.token_to_id("##") is not None
    ids = tok.encode("the cats sat")
    assert tok.word_starts[ids].sum() == 2  # "Ġcats" and "Ġsat" ("the", the text's first piece, has no marker)
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    plain.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    plain.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    folder = tmp_path / "plain"
    folder.mkdir()
    plain.save(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="marks no word boundaries in its pieces"):
        Tokenizer.load(folder).word_starts
