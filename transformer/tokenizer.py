"""Text <-> token ids through one interface, for the tokenizers this library trains and those of
published checkpoints.

`SentencePieceTokenizer` wraps a sentencepiece model: the ones `Tokenizer.train` makes, T5's
spiece.model, Llama's tokenizer.model, ALBERT's spiece.model (with AlbertTokenizer's lowercasing
and accent stripping, `AlbertPreprocessing`). `HuggingFaceTokenizer` wraps a
`tokenizers.Tokenizer`: a checkpoint's tokenizer.json, or one built from vocab.json + merges.txt
(byte-level BPE, GPT-2) or vocab.txt (WordPiece, BERT). `Tokenizer.load` picks the backend from
the files it finds.

The tokenizers this library trains have fixed special ids, read back from the model file (never
assumed) when one is loaded:

    0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS)   4 [CLS]   5 [SEP]   6 [MASK]

A checkpoint's special tokens are the ones its own files name, and some kinds are missing: BERT
has no BOS or EOS, T5 no BOS, GPT-2 no pad (EOS pads instead). Asking for a missing one is a
ValueError. `encode` never adds special tokens: the data pipelines add [CLS]/[SEP]/BOS/EOS.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import io
import json
import os
import pathlib
import re
import unicodedata
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

from transformer.config import ModelConfig
from transformer.files import read_json_object, write_atomically

CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
ENCODER_SYMBOLS = (CLS, SEP, MASK)
T5_CLASSES = ("T5Tokenizer", "T5TokenizerFast")
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
ALBERT_CLASSES = ("AlbertTokenizer", "AlbertTokenizerFast")
T5_DEFAULT_EXTRA_IDS = 100
EXTRA_ID = re.compile(r"<extra_id_(0|[1-9]\d*)>")  # T5's sentinels (no leading zeros: those are not tokens)

# Tokens taken for a kind when no file beside a Hugging Face tokenizer names one.
WELL_KNOWN_TOKENS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>", "<|endoftext|>"),
    "eos": ("</s>", "<|endoftext|>"),
    "cls": (CLS,),
    "sep": (SEP,),
    "mask": (MASK, "<mask>"),
}

TokenToId = Callable[[str], "int | None"]
# What Python's str.split() splits on (no such character lies above U+3000), as a regex class.
PYTHON_WHITESPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace()) + "]"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The ids of a tokenizer's special tokens; None for a kind it does not have."""

    pad: int | None = None
    unk: int | None = None
    bos: int | None = None
    eos: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None

    def ids(self) -> frozenset[int]:
        return frozenset(i for i in dataclasses.astuple(self) if i is not None)


SPECIAL_KINDS = tuple(field.name for field in dataclasses.fields(SpecialTokens))


@dataclasses.dataclass(frozen=True)
class AlbertPreprocessing:
    """What AlbertTokenizer does to text around sentencepiece: its tokenizer_config.json settings
    (AlbertTokenizer's defaults here), applied by `prepare` before encoding, and
    `_split_digit_commas` on the pieces after, whatever the settings."""

    do_lower_case: bool = True
    remove_space: bool = True  # strip the text, and make each run of whitespace one space
    keep_accents: bool = False  # else NFKD, combining characters dropped

    def prepare(self, text: str) -> str:
        """The text as AlbertTokenizer.preprocess_text gives it to sentencepiece."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        text = text.replace("``", '"').replace("''", '"')
        if not self.keep_accents:
            text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        return text.lower() if self.do_lower_case else text


# The settings that make AlbertTokenizer change text least (it still makes `` and '' a " and
# splits digit-comma pieces).
ALBERT_UNCHANGED = AlbertPreprocessing(do_lower_case=False, remove_space=False, keep_accents=True)


class TrainingFailed(ValueError):
    """sentencepiece could not train the vocabulary asked for; `reason` is what it said."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class Tokenizer(abc.ABC):
    """Text <-> token ids. `Tokenizer.load` reads any tokenizer below; `Tokenizer.train` makes one."""

    def __init__(
        self, specials: SpecialTokens, path: str | os.PathLike | None = None,
        other_special_ids: frozenset[int] = frozenset(), *, adds_bos: bool = False,
        sentinel_ids: frozenset[int] = frozenset(),
    ):
        self.specials = specials
        self.path = None if path is None else pathlib.Path(path)
        self._special_ids = specials.ids() | other_special_ids | sentinel_ids
        # T5's <extra_id_k> ids: special (never ordinary text), but written in text as their token.
        self.sentinel_ids = sentinel_ids
        # Whether the checkpoint's own pipeline starts every text with BOS (Llama): a prompt then does too.
        self.adds_bos = adds_bos

    @classmethod
    def train(
        cls, files: Sequence[str | os.PathLike], vocab_size: int, *, model_prefix: str | os.PathLike,
        model_type: str = "bpe", character_coverage: float = 1.0, max_sentences: int = 1_000_000, seed: int = 0,
        extra_ids: int = 0,
    ) -> SentencePieceTokenizer:
        """Trains a sentencepiece model on text files (one sentence per line) and loads it.

        Writes `{model_prefix}.model` and `.vocab` (each whole or not at all; a full disk or a
        read-only folder is an OSError naming the file). `model_type` is "bpe" or "unigram". At
        most `max_sentences` lines are sampled, so a few MB train in seconds. `extra_ids`: T5's
        sentinels, the last of the `vocab_size` ids (the model file holds the pieces before them;
        `save` records them in tokenizer_config.json).
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
        if not 0 <= extra_ids < vocab_size:
            raise ValueError(f"extra_ids={extra_ids} must be in [0, vocab_size={vocab_size}).")
        files = [str(f) for f in files]
        if not files:
            raise ValueError("Tokenizer.train needs at least one text file.")
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Tokenizer training file {path} does not exist.")
            if os.path.getsize(path) == 0:
                raise ValueError(f"Tokenizer training file {path} is empty.")
        pathlib.Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()  # written here, not by sentencepiece, whose failed writes leave a broken file
        try:
            spm.SentencePieceTrainer.train(
                input=files,
                model_writer=model,
                vocab_size=vocab_size - extra_ids,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                user_defined_symbols=list(ENCODER_SYMBOLS),
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise TrainingFailed(
                f"sentencepiece could not train a {vocab_size}-token vocabulary on {len(files)} file(s) "
                f"({files[0]}, ...): {error}. If the vocabulary is too large for the corpus, lower vocab_size.",
                reason=str(error).rpartition("] ")[2].rstrip("."),  # without its source line
            ) from None
        path = pathlib.Path(f"{model_prefix}.model")
        _write_trained(path, model.getvalue())
        return _load_sentencepiece([path], _Configs(tokenizer={"extra_ids": extra_ids}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a sentencepiece `.model` file, a `tokenizer.json`, or a directory holding either.

        A directory is searched in the order of `DIRECTORY_FILES`: tokenizer.model (this library's
        run directories), tokenizer.json, spiece.model, vocab.json + merges.txt, vocab.txt. The
        special tokens are the ones named by tokenizer_config.json, special_tokens_map.json or
        config.json beside the file, else the ones the tokenizer itself records.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            return _load_directory(path)
        if not path.is_file():
            raise FileNotFoundError(f"No tokenizer model at {path}.")
        load_file = _load_tokenizer_json if path.suffix == ".json" else _load_sentencepiece
        return load_file([path], _Configs.read(path.parent))

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """How many ids the tokenizer has, special and extra ones included."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """One string -> its token ids (no special tokens added)."""

    @abc.abstractmethod
    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Many strings -> their token ids, as `encode` gives them."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Token ids, none of them special -> text."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one token (a piece, a special or extra token); None when there is none."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token of one id."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike, *, tokenizer_class: str | None = None) -> pathlib.Path:
        """Writes the tokenizer's files into `directory` (made if missing), in Hugging Face layout,
        so that `Tokenizer.load(directory)` restores the same ids and special tokens. -> directory.

        `tokenizer_class`: the transformers class a sentencepiece file is written for (see
        `SENTENCEPIECE_CLASSES`); a Hugging Face tokenizer is always tokenizer.json."""

    def _special_id(self, kind: str) -> int:
        token_id = getattr(self.specials, kind)
        if token_id is None:
            raise ValueError(
                f"The tokenizer of {self.path or '(in memory)'} has no {kind.upper()} token; name one as "
                f"{kind}_token in the tokenizer_config.json beside it, or use a tokenizer that has one "
                "(Tokenizer.train makes all seven kinds)."
            )
        return token_id

    @property
    def pad_id(self) -> int:
        """The padding id; the EOS id for tokenizers with no pad token (GPT-2 and its like)."""
        if self.specials.pad is None and self.specials.eos is not None:
            return self.specials.eos
        return self._special_id("pad")

    @property
    def unk_id(self) -> int:
        return self._special_id("unk")

    @property
    def bos_id(self) -> int:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos")

    @property
    def decoder_start_id(self) -> int:
        """An encoder-decoder model's first decoder input: BOS where the tokenizer has one (tokenizers
        trained here), else the pad id (T5's `decoder_start_token_id`; its tokenizer has no BOS)."""
        return self.specials.bos if self.specials.bos is not None else self.pad_id

    @property
    def cls_id(self) -> int:
        return self._special_id("cls")

    @property
    def sep_id(self) -> int:
        return self._special_id("sep")

    @property
    def mask_id(self) -> int:
        return self._special_id("mask")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never ordinary text: the special tokens of every kind the tokenizer has, and
        its other special ids (T5's extra ids, a tokenizer.json's added special tokens)."""
        return self._special_ids

    @functools.cached_property
    def word_starts(self) -> np.ndarray:
        """[vocab_size] bool: whether a piece begins a word (whole-word masking), by the marker the
        tokenizer writes (`_word_marker`). Special ids begin one: no word runs across them. A
        tokenizer without such a marker is a ValueError: it cannot tell where words begin."""
        marker = self._word_marker()
        if marker is None:
            raise ValueError(
                f"{self!r} marks no word boundaries in its pieces (neither a continuing prefix such as WordPiece's "
                "'##' nor a word-start mark such as sentencepiece's '▁' or byte-level BPE's 'Ġ'): whole-word "
                "masking cannot find the words. Use such a tokenizer, or mask single tokens (span_masking=False)."
            )
        prefix, begins = marker
        starts = np.array([self.id_to_token(i).startswith(prefix) == begins for i in range(self.vocab_size)])
        starts[list(self.special_ids)] = True
        return starts

    def _word_marker(self) -> tuple[str, bool] | None:
        """(prefix, whether it begins a word): sentencepiece's "▁" begins one."""
        return "▁", True

    def pad(
        self, ids: Sequence[Sequence[int]], length: int, *, truncate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads (and truncates) id lists to `length`. -> ids [N, length] int32, mask [N, length] bool."""
        out = np.full((len(ids), length), self.pad_id, np.int32)
        mask = np.zeros((len(ids), length), bool)
        for row, seq in enumerate(ids):
            if len(seq) > length and not truncate:
                raise ValueError(f"Sequence {row} has {len(seq)} tokens, more than length={length}.")
            seq = seq[:length]
            out[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return out, mask

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Padding and the other special ids (unk too) are dropped; T5's sentinels
        are written as their `<extra_id_k>`."""
        return self._decode([i for i in map(int, ids) if i not in self.special_ids or i in self.sentinel_ids])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def check_compatible(self, config: ModelConfig) -> None:
        """Raises unless the model has an embedding row for every id of this tokenizer.

        A model may have more rows than the tokenizer has ids: published checkpoints pad the
        embedding (T5: 32100 ids, 32128 rows). Generation must then never emit ids >= vocab_size,
        which no text maps to.
        """
        if self.vocab_size > config.vocab_size:
            raise ValueError(
                f"The tokenizer has {self.vocab_size} pieces but the model's vocab_size is {config.vocab_size}: "
                f"ids >= {config.vocab_size} have no embedding. Set model.vocab_size={self.vocab_size} (or use "
                f"a tokenizer with at most {config.vocab_size} pieces)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path or 'in memory'}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. T5's `extra_ids` sentinels follow its pieces in reverse order, as
    Hugging Face's T5Tokenizer numbers them: `<extra_id_0>` is the last id, vocab_size - 1. As in
    T5Tokenizer, `encode` finds them in text and `decode` writes them back. `preprocessing`:
    AlbertTokenizer's handling of the text, for an ALBERT checkpoint's spiece.model; None (the
    tokenizers trained here, T5's, Llama's) encodes the text as given."""

    def __init__(
        self, processor: spm.SentencePieceProcessor, specials: SpecialTokens,
        path: str | os.PathLike | None = None, *, extra_ids: int = 0, adds_bos: bool = False,
        preprocessing: AlbertPreprocessing | None = None,
    ):
        self._sp = processor
        self.extra_ids = extra_ids
        self.preprocessing = preprocessing
        pieces = processor.get_piece_size()
        super().__init__(specials, path, adds_bos=adds_bos, sentinel_ids=frozenset(range(pieces, pieces + extra_ids)))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + self.extra_ids

    def encode(self, text: str) -> list[int]:
        """One string -> its ids; a sentinel's `<extra_id_k>` is its id, the whitespace around it
        dropped and the text on each side encoded apart (T5Tokenizer's legacy encoding)."""
        ids, start = [], 0
        for match in EXTRA_ID.finditer(text):
            if int(match[1]) < self.extra_ids:
                ids += [*self._encode_texts([text[start : match.start()].rstrip()])[0], self.token_to_id(match[0])]
                start = len(text) - len(text[match.end() :].lstrip())
        return ids + self._encode_texts([text[start:]])[0]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Many strings -> their token ids (sentencepiece's multithreaded batch encoding)."""
        texts = list(texts)
        if self.extra_ids and any("<extra_id_" in text for text in texts):
            return [self.encode(text) for text in texts]
        return self._encode_texts(texts)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Texts without sentinels -> their ids, through `preprocessing` where there is one."""
        if self.preprocessing is None:
            return self._sp.encode(texts)
        pieces = self._sp.encode([self.preprocessing.prepare(text) for text in texts], out_type=str)
        return [[self._sp.piece_to_id(piece) for piece in _split_digit_commas(self._sp, row)] for row in pieces]

    def _decode(self, ids: list[int]) -> str:
        """The pieces' text, a sentinel set apart by spaces (as T5Tokenizer decodes it)."""
        parts, run = [], []
        for token_id in ids:
            if token_id in self.sentinel_ids:
                parts += [self._sp.decode(run), self.id_to_token(token_id)]
                run = []
            else:
                run.append(token_id)
        return " ".join(part for part in [*parts, self._sp.decode(run)] if part)

    def token_to_id(self, token: str) -> int | None:
        return _sentencepiece_token_id(self._sp, self.extra_ids, token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"Id {token_id} is outside the vocabulary of {self!r}.")
        if token_id >= self._sp.get_piece_size():
            return f"<extra_id_{self.vocab_size - 1 - token_id}>"
        return self._sp.id_to_piece(token_id)

    def save(self, directory: str | os.PathLike, *, tokenizer_class: str | None = None) -> pathlib.Path:
        """Writes the model file and a tokenizer_config.json with the special tokens, for the
        `transformers` class that encodes as `encode` does: "T5Tokenizer" (spiece.model; it ends a
        text with EOS, as an encoder-decoder source here is), "LlamaTokenizer" (tokenizer.model;
        BOS as `adds_bos` says, no EOS) or "AlbertTokenizer" (spiece.model; [CLS] text [SEP]; the
        only one for a tokenizer with `preprocessing`); by default the one that keeps these. A
        Llama- or Albert-class save of a model that changes text also writes tokenizer.json, which
        `transformers`' fast tokenizer then reads (see `_normalizing_as_tokenizers`)."""
        albert = self.preprocessing is not None
        tokenizer_class = tokenizer_class or (
            "AlbertTokenizer" if albert else "LlamaTokenizer" if self.adds_bos else "T5Tokenizer")
        if albert and tokenizer_class != "AlbertTokenizer":
            raise ValueError(f"{self!r} preprocesses text as AlbertTokenizer does ({self.preprocessing}), which "
                             f"{tokenizer_class} cannot; save it as tokenizer_class='AlbertTokenizer'.")
        settings = SENTENCEPIECE_CLASSES[tokenizer_class](self)
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / ("tokenizer.model" if tokenizer_class == "LlamaTokenizer" else "spiece.model")
        file.write_bytes(self._sp.serialized_model_proto())
        if tokenizer_class != "T5Tokenizer" and (fast := _normalizing_as_tokenizers(self._sp, self.preprocessing)):
            if tokenizer_class == "AlbertTokenizer":
                fast.post_processor = _cls_sep_template(self)
            write_atomically(directory / "tokenizer.json", fast.to_str())
        _write_tokenizer_config(directory, self, tokenizer_class=tokenizer_class, **settings)
        return directory


def _normalizing_as_tokenizers(
    sp: spm.SentencePieceProcessor, preprocessing: AlbertPreprocessing | None = None
) -> tokenizers.Tokenizer | None:
    """A sentencepiece model that normalises text (the NFKC map and whitespace folding that
    `Tokenizer.train` gives it), after any AlbertTokenizer `preprocessing`, as a
    `tokenizers.Tokenizer` that encodes as they do; None for one that changes no text (Llama's
    own) or falls back to bytes.

    Saved as tokenizer.json beside a Llama-class tokenizer.model, it is what `transformers`'
    fast tokenizer loads; converting the model itself, that tokenizer skips the normalisation.
    The rules are `transformers`' for T5's models (the model's character map, trailing spaces
    dropped, runs of spaces one "▁", a "▁" before the first word). Differences remain: the
    control tokens (<s>, </s>) are special there, so text naming them encodes as them; a text
    that starts with a user-defined symbol ([CLS], [SEP], [MASK]) gets no "▁" before it; and
    AlbertTokenizer's split of digit-comma pieces has no counterpart in `tokenizers`, only an
    approximation (see `_as_tokenizers_model`; transformers' own fast ALBERT tokenizer has no more).
    """
    try:  # sentencepiece's generated module needs a protobuf runtime as new as it was made with
        from sentencepiece import sentencepiece_model_pb2
    except Exception as error:  # noqa: BLE001 - an old protobuf: say what is lost, and save the rest
        warnings.warn(f"No tokenizer.json written ({error}): transformers' fast tokenizer will not apply this "
                      "sentencepiece model's normalisation; load it with use_fast=False.", stacklevel=3)
        return None
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    spec = proto.normalizer_spec
    steps = _albert_normalizers(preprocessing)
    if not (steps or spec.precompiled_charsmap or spec.remove_extra_whitespaces) or proto.trainer_spec.byte_fallback:
        return None
    fast = tokenizers.Tokenizer(_as_tokenizers_model(proto, avoid_digit_commas=preprocessing is not None))
    steps += [tokenizers.normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [tokenizers.normalizers.Strip(left=False, right=True),
                  tokenizers.normalizers.Replace(tokenizers.Regex(" {2,}"), "▁")]
    fast.normalizer = tokenizers.normalizers.Sequence(steps)
    # "first" prepends only where the text's first character is still the original's first, which
    # AlbertTokenizer's stripping and `` replacing change: its texts take "always", as in AlbertConverter
    prefix = ("first" if preprocessing is None else "always") if spec.add_dummy_prefix else "never"
    fast.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix)
    fast.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme=prefix)
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    fast.add_special_tokens([tokenizers.AddedToken(piece.piece, normalized=False) for piece in proto.pieces
                             if piece.type in (kinds.CONTROL, kinds.UNKNOWN)])
    fast.add_tokens([tokenizers.AddedToken(piece.piece, normalized=True) for piece in proto.pieces
                     if piece.type == kinds.USER_DEFINED])
    return fast


def _albert_normalizers(preprocessing: AlbertPreprocessing | None) -> list[tokenizers.normalizers.Normalizer]:
    """`preprocessing` as `tokenizers` normalizers: those of transformers' AlbertConverter, and
    remove_space (which it leaves to sentencepiece's whitespace folding) as Python's split does it."""
    if preprocessing is None:
        return []
    replace = tokenizers.normalizers.Replace
    steps = [replace(tokenizers.Regex(rf"\A{PYTHON_WHITESPACE}+|{PYTHON_WHITESPACE}+\z"), ""),
             replace(tokenizers.Regex(f"{PYTHON_WHITESPACE}+"), " ")] if preprocessing.remove_space else []
    steps += [replace("``", '"'), replace("''", '"')]
    if not preprocessing.keep_accents:
        steps += [tokenizers.normalizers.NFKD(), tokenizers.normalizers.StripAccents()]
    if preprocessing.do_lower_case:
        steps.append(tokenizers.normalizers.Lowercase())
    return steps


def _is_digit_comma(piece: str) -> bool:
    """Whether AlbertTokenizer splits the piece: it ends in a digit and a comma ("▁19,")."""
    return len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit()


def _split_digit_commas(sp: spm.SentencePieceProcessor, pieces: list[str]) -> list[str]:
    """AlbertTokenizer's fix-up of a piece that ends in a digit and a comma: its digits encoded
    again on their own, then the comma ("9,9": "▁9,", "9" -> "▁9", ",", "9")."""
    split = []
    for piece in pieces:
        if not _is_digit_comma(piece):
            split.append(piece)
            continue
        again = sp.encode(piece[:-1].replace("▁", ""), out_type=str)
        if piece[0] != "▁" and again[0][0] == "▁":  # no "▁" where the piece had none
            again = again[1:] if len(again[0]) == 1 else [again[0][1:], *again[1:]]
        split += [*again, ","]
    return split


def _as_tokenizers_model(proto: Any, *, avoid_digit_commas: bool) -> tokenizers.models.Model:
    """A sentencepiece ModelProto's unigram or BPE pieces as a `tokenizers` model.

    `avoid_digit_commas` stands in for AlbertTokenizer's `_split_digit_commas`, which `tokenizers`
    cannot do: a unigram model's digit-comma pieces score 100 less (as in transformers'
    AlbertConverter), and no BPE merge makes one. Encodings then use them only where nothing
    else fits, which is close to AlbertTokenizer's split, but not the same ("9,9" can become
    "▁9", ",9" where ",9" is a piece; AlbertTokenizer gives "▁9", ",", "9").
    """
    def avoided(piece: str) -> bool:
        return avoid_digit_commas and _is_digit_comma(piece)

    trainer = proto.trainer_spec
    pieces = [(piece.piece, piece.score - 100 if avoided(piece.piece) else piece.score) for piece in proto.pieces]
    if trainer.model_type == trainer.UNIGRAM:
        return tokenizers.models.Unigram(pieces, trainer.unk_id, False)
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = [pair for pair in _merges(ids) if not avoided("".join(pair))]
    return tokenizers.models.BPE(ids, merges, unk_token=pieces[trainer.unk_id][0], fuse_unk=True)


def _cls_sep_template(tok: SentencePieceTokenizer) -> tokenizers.processors.TemplateProcessing:
    """BERT's [CLS] A [SEP] (B [SEP]), with token types 0 and 1: what AlbertTokenizer adds."""
    if tok.specials.cls is None or tok.specials.sep is None:
        raise ValueError(f"{tok!r} has no [CLS] or no [SEP] token, which AlbertTokenizer adds to every text; "
                         "save it as another tokenizer_class, or train it with BERT's special tokens.")
    cls, sep = tok.id_to_token(tok.cls_id), tok.id_to_token(tok.sep_id)
    return tokenizers.processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)],
    )


def _merges(ids: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges for sentencepiece's pieces (in id order, best first): every split of a piece into
    two pieces, ranked by the piece they make, then by their own ids."""
    merges = []
    for piece in ids:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += sorted(splits, key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    return merges


# What each `transformers` class for a sentencepiece file needs to encode as this library does.
SENTENCEPIECE_CLASSES: dict[str, Callable[[SentencePieceTokenizer], dict[str, Any]]] = {
    "T5Tokenizer": lambda tok: dict(extra_ids=tok.extra_ids),
    "LlamaTokenizer": lambda tok: dict(add_bos_token=tok.adds_bos, add_eos_token=False, legacy=True),
    "AlbertTokenizer": lambda tok: dataclasses.asdict(tok.preprocessing or ALBERT_UNCHANGED),
}


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`, with any padding and truncation baked into it turned off."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, specials: SpecialTokens, path: str | os.PathLike | None = None,
        *, adds_bos: bool = False,
    ):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        added = {i: token for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        sentinels = frozenset(i for i, token in added.items() if EXTRA_ID.fullmatch(token.content))
        super().__init__(specials, path, frozenset(added), adds_bos=adds_bos, sentinel_ids=sentinels)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _word_marker(self) -> tuple[str, bool] | None:
        """WordPiece's continuing prefix ("##") goes on with a word; a byte-level pre-tokenizer's
        "Ġ" and a Metaspace's (or Llama's normalizer's) "▁" begin one; else None."""
        spec = json.loads(self._tokenizer.to_str())
        continuing = spec["model"].get("continuing_subword_prefix") or ("##" if spec["model"]["type"] == "WordPiece" else "")
        if continuing:
            return continuing, False
        text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
        if '"ByteLevel"' in text:
            return "Ġ", True
        return ("▁", True) if "▁" in text else None

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)  # the sentinels are the only ones left

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"Id {token_id} is outside the vocabulary of {self!r}.")
        return token

    def save(self, directory: str | os.PathLike, *, tokenizer_class: str | None = None) -> pathlib.Path:
        """Writes tokenizer.json and a tokenizer_config.json naming PreTrainedTokenizerFast and the
        special tokens (`tokenizer_class` is for sentencepiece files only, and ignored)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / "tokenizer.json", self._tokenizer.to_str())
        _write_tokenizer_config(directory, self, tokenizer_class="PreTrainedTokenizerFast")
        return directory


def _write_trained(path: pathlib.Path, model: bytes) -> None:
    """Writes a trained sentencepiece model to `path` and its vocabulary beside it, as
    sentencepiece would (".vocab": "piece<TAB>score" per id, the score as C++ streams a float),
    each whole or not at all; a failed write (a full disk, a read-only folder) is an OSError
    naming the file and the fix."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size()))
    for target, content, what in ((path, model, "model"), (path.with_suffix(".vocab"), vocab, "vocabulary")):
        try:
            write_atomically(target, content)
        except OSError as error:
            raise OSError(
                error.errno, f"Cannot write the tokenizer {what} {target} ({error.strerror or error}); free some "
                "space there, or give a model_prefix in another (writable) folder"
            ) from error


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class _Configs:
    """The JSON files beside a tokenizer that name its special tokens and options ({} when absent)."""

    directory: pathlib.Path | None = None
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)  # tokenizer_config.json
    special_tokens_map: dict[str, Any] = dataclasses.field(default_factory=dict)  # special_tokens_map.json
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # config.json

    @classmethod
    def read(cls, directory: pathlib.Path) -> _Configs:
        return cls(
            directory, read_json_object(directory / "tokenizer_config.json"),
            read_json_object(directory / "special_tokens_map.json"), read_json_object(directory / "config.json"),
        )

    def named_token(self, kind: str) -> tuple[str, str] | None:
        """(token, file name) of the `{kind}_token` tokenizer_config.json, else
        special_tokens_map.json, names: a string or a dict with "content"."""
        files = {"tokenizer_config.json": self.tokenizer, "special_tokens_map.json": self.special_tokens_map}
        for name, config in files.items():
            token = config.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                return token, name
        return None

    def token_id(self, kind: str) -> int | None:
        """config.json's `{kind}_token_id`; the first of a list (Llama 3.1 lists several EOS ids)."""
        token_id = self.model.get(f"{kind}_token_id")
        if isinstance(token_id, list):
            return token_id[0] if token_id else None
        return token_id

    def extra_ids(self) -> int:
        """T5's sentinel count: tokenizer_config.json's extra_ids, by default 100 for T5 (its
        tokenizer_class, else config.json's model_type, says so) and 0 otherwise."""
        tokenizer_class = self.tokenizer.get("tokenizer_class")
        is_t5 = tokenizer_class in T5_CLASSES or (tokenizer_class is None and self.model.get("model_type") == "t5")
        return self.tokenizer.get("extra_ids", T5_DEFAULT_EXTRA_IDS if is_t5 else 0)

    def albert_preprocessing(self) -> AlbertPreprocessing | None:
        """tokenizer_config.json's settings for an AlbertTokenizer(Fast) (its defaults where absent);
        None for any other class."""
        if self.tokenizer.get("tokenizer_class") not in ALBERT_CLASSES:
            return None
        names = [field.name for field in dataclasses.fields(AlbertPreprocessing)]
        return AlbertPreprocessing(**{name: bool(self.tokenizer[name]) for name in names if name in self.tokenizer})


def _special_tokens(
    configs: _Configs, token_to_id: TokenToId, vocab_size: int, defaults: SpecialTokens
) -> SpecialTokens:
    """Each kind's id: the token tokenizer_config.json or special_tokens_map.json names, else
    config.json's id, else the default."""
    ids = {kind: _special_id(configs, kind, token_to_id, vocab_size) for kind in SPECIAL_KINDS}
    return SpecialTokens(**{kind: getattr(defaults, kind) if i is None else i for kind, i in ids.items()})


def _special_id(configs: _Configs, kind: str, token_to_id: TokenToId, vocab_size: int) -> int | None:
    """The id of the token the files beside the tokenizer name for `kind`; None if they name none."""
    named = configs.named_token(kind)
    if named is not None:
        token, file_name = named
        token_id = token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{configs.directory / file_name} names {token!r} as the {kind}_token, but the tokenizer has no "
                "such token."
            )
        return token_id
    token_id = configs.token_id(kind)
    if token_id is not None and not 0 <= token_id < vocab_size:
        raise ValueError(
            f"{configs.directory / 'config.json'} sets {kind}_token_id={token_id}, outside the tokenizer's "
            f"{vocab_size} ids; name the token as {kind}_token in tokenizer_config.json instead."
        )
    return token_id


def _well_known_specials(token_to_id: TokenToId) -> SpecialTokens:
    """For each kind, the first of its WELL_KNOWN_TOKENS in the vocabulary."""
    ids = {}
    for kind, tokens in WELL_KNOWN_TOKENS.items():
        present = [i for i in map(token_to_id, tokens) if i is not None]
        ids[kind] = present[0] if present else None
    return SpecialTokens(**ids)


def _sentencepiece_token_id(processor: spm.SentencePieceProcessor, extra_ids: int, token: str) -> int | None:
    """A piece's id, or an `<extra_id_k>` sentinel's (counted back from the last id); None if neither."""
    extra = EXTRA_ID.fullmatch(token)
    if extra and int(extra.group(1)) < extra_ids:
        return processor.get_piece_size() + extra_ids - 1 - int(extra.group(1))
    token_id = processor.piece_to_id(token)
    return None if token_id == processor.unk_id() and token != processor.id_to_piece(token_id) else token_id


def _sentencepiece_specials(processor: spm.SentencePieceProcessor) -> SpecialTokens:
    """The ids the model file records (pad, unk, bos, eos; -1 where absent) and the encoder
    symbols [CLS], [SEP], [MASK] where they are pieces."""
    recorded = dict(pad=processor.pad_id(), unk=processor.unk_id(), bos=processor.bos_id(), eos=processor.eos_id())
    symbol_id = functools.partial(_sentencepiece_token_id, processor, 0)
    symbols = {kind: symbol_id(symbol) for kind, symbol in zip(("cls", "sep", "mask"), ENCODER_SYMBOLS)}
    return SpecialTokens(**{kind: None if i < 0 else i for kind, i in recorded.items()}, **symbols)


def _sentencepiece_processor(path: pathlib.Path) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path} is not a valid sentencepiece model: {error}") from None
    return processor


def _load_tokenizer_model(files: list[pathlib.Path], configs: _Configs) -> Tokenizer:
    """Llama's tokenizer.model; the tokenizer.json beside it instead where that holds more tokens
    (tokens added in `transformers`, a chat model's end token, live only there)."""
    (path,) = files
    beside = path.with_name("tokenizer.json")
    if beside.is_file():
        with_added = _parsed([beside], lambda: tokenizers.Tokenizer.from_file(str(beside)))
        if with_added.get_vocab_size(with_added_tokens=True) > _sentencepiece_processor(path).get_piece_size():
            return _huggingface(with_added, beside, configs)
    return _load_sentencepiece(files, configs)


def _load_sentencepiece(files: list[pathlib.Path], configs: _Configs) -> SentencePieceTokenizer:
    (path,) = files
    processor = _sentencepiece_processor(path)
    extra_ids = configs.extra_ids()
    token_to_id = functools.partial(_sentencepiece_token_id, processor, extra_ids)
    vocab_size = processor.get_piece_size() + extra_ids
    specials = _special_tokens(configs, token_to_id, vocab_size, _sentencepiece_specials(processor))
    # transformers' Llama tokenizers start a text with BOS unless told otherwise
    adds_bos = configs.tokenizer.get("add_bos_token", configs.tokenizer.get("tokenizer_class") in LLAMA_CLASSES)
    return SentencePieceTokenizer(processor, specials, path, extra_ids=extra_ids, adds_bos=bool(adds_bos),
                                  preprocessing=configs.albert_preprocessing())


def _parsed(files: list[pathlib.Path], parse: Callable[[], tokenizers.Tokenizer]) -> tokenizers.Tokenizer:
    """`parse()`, its failure a ValueError naming the files."""
    try:
        return parse()
    except Exception as error:  # tokenizers raises plain Exception (and TypeError for a vocab.txt without [SEP])
        names = " + ".join(map(str, files))
        raise ValueError(f"{names} is not a valid tokenizer file: {error}") from None


def _huggingface(tokenizer: tokenizers.Tokenizer, path: pathlib.Path, configs: _Configs) -> HuggingFaceTokenizer:
    """The tokenizer with its special tokens resolved, and marked special so that text never splits them."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    specials = _special_tokens(configs, tokenizer.token_to_id, vocab_size, _well_known_specials(tokenizer.token_to_id))
    tokenizer.add_special_tokens(sorted({tokenizer.id_to_token(i) for i in specials.ids()}))
    bos = None if specials.bos is None else tokenizer.id_to_token(specials.bos)
    # a template that starts with [CLS] adds no BOS, even where [CLS] is also the bos_token (ALBERT)
    starts_with_bos = specials.bos != specials.cls and _template_starts_with(tokenizer, bos)
    adds_bos = configs.tokenizer.get("add_bos_token", starts_with_bos)
    return HuggingFaceTokenizer(tokenizer, specials, path, adds_bos=bool(adds_bos))


def _template_starts_with(tokenizer: tokenizers.Tokenizer, token: str | None) -> bool:
    """Whether the post-processor's template for one text starts with `token` (Llama's <s>)."""
    processor = json.loads(tokenizer.to_str()).get("post_processor") or {}
    processors = processor.get("processors", [processor])  # a Sequence, or one processor
    for step in processors:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return token is not None and first.get("SpecialToken", {}).get("id") == token
    return False


def _load_tokenizer_json(files: list[pathlib.Path], configs: _Configs) -> HuggingFaceTokenizer:
    (path,) = files
    return _huggingface(_parsed(files, lambda: tokenizers.Tokenizer.from_file(str(path))), path, configs)


def _load_byte_level_bpe(files: list[pathlib.Path], configs: _Configs) -> HuggingFaceTokenizer:
    vocab, merges = files
    add_prefix_space = configs.tokenizer.get("add_prefix_space", False)
    built = _parsed(files, lambda: tokenizers.Tokenizer.from_str(
        ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=add_prefix_space).to_str()
    ))
    return _huggingface(built, vocab, configs)


def _load_wordpiece(files: list[pathlib.Path], configs: _Configs) -> HuggingFaceTokenizer:
    """BERT's vocab.txt with the text handling tokenizer_config.json gives BertTokenizer:
    do_lower_case (default true), strip_accents (default: as do_lower_case) and
    tokenize_chinese_chars (default true)."""
    (vocab,) = files
    bert_kinds = ("unk", "sep", "cls", "pad", "mask")
    named = {f"{kind}_token": found[0] for kind in bert_kinds if (found := configs.named_token(kind))}
    settings = configs.tokenizer
    built = _parsed(files, lambda: tokenizers.Tokenizer.from_str(BertWordPieceTokenizer(
        str(vocab), lowercase=settings.get("do_lower_case", True), strip_accents=settings.get("strip_accents"),
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True), **named,
    ).to_str()))
    return _huggingface(built, vocab, configs)


DIRECTORY_FILES = (
    (("tokenizer.model",), _load_tokenizer_model),
    (("tokenizer.json",), _load_tokenizer_json),
    (("spiece.model",), _load_sentencepiece),
    (("vocab.json", "merges.txt"), _load_byte_level_bpe),
    (("vocab.txt",), _load_wordpiece),
)


def _load_directory(directory: pathlib.Path) -> Tokenizer:
    """The tokenizer of the first of DIRECTORY_FILES present in `directory`."""
    configs = _Configs.read(directory)
    for names, load_files in DIRECTORY_FILES:
        files = [directory / name for name in names]
        if all(file.is_file() for file in files):
            return load_files(files, configs)
    looked_for = ", ".join(" + ".join(names) for names, _ in DIRECTORY_FILES)
    raise FileNotFoundError(f"No tokenizer in {directory}: looked for {looked_for}.")


def _write_tokenizer_config(directory: pathlib.Path, tokenizer: Tokenizer, **settings: Any) -> None:
    """tokenizer_config.json: `settings` and the token of each special kind the tokenizer has."""
    tokens = {f"{kind}_token": tokenizer.id_to_token(i) for kind, i in dataclasses.asdict(tokenizer.specials).items()
              if i is not None}
    text = json.dumps(settings | tokens, indent=2, sort_keys=True) + "\n"
    write_atomically(directory / "tokenizer_config.json", text)
