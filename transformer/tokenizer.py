"""A sentencepiece tokenizer with fixed special ids, shared by training and sampling.

Special ids are the same in every tokenizer this library trains, and are read back from
the model file (never assumed) when one is loaded:

    0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS)   4 [CLS]   5 [SEP]   6 [MASK]
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from transformer.config import ModelConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
ENCODER_SYMBOLS = (CLS, SEP, MASK)


class Tokenizer:
    """Text <-> token ids through a trained sentencepiece model."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | os.PathLike | None = None):
        self._sp = processor
        self.path = None if path is None else pathlib.Path(path)
        for name, token_id in (("pad", self.pad_id), ("eos", self.eos_id), ("bos", self.bos_id)):
            if token_id < 0:
                raise ValueError(
                    f"The sentencepiece model {self.path or ''} has no {name} token; train it with "
                    f"Tokenizer.train (or sentencepiece's {name}_id option) so sequences can be "
                    "padded and terminated."
                )

    @classmethod
    def train(
        cls,
        files: Sequence[str | os.PathLike],
        vocab_size: int,
        *,
        model_prefix: str | os.PathLike,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        max_sentences: int = 1_000_000,
        seed: int = 0,
    ) -> Tokenizer:
        """Trains a sentencepiece model on text files (one sentence per line) and loads it.

        Writes `{model_prefix}.model` and `.vocab`. `model_type` is "bpe" or "unigram". At most
        `max_sentences` lines are sampled, so a few MB train in seconds.
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
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
        try:
            spm.SentencePieceTrainer.train(
                input=files,
                model_prefix=str(model_prefix),
                vocab_size=vocab_size,
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
            raise ValueError(
                f"sentencepiece could not train a {vocab_size}-token vocabulary on {len(files)} file(s) "
                f"({files[0]}, ...): {error}. If the vocabulary is too large for the corpus, lower vocab_size."
            ) from None
        return cls.load(f"{model_prefix}.model")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a sentencepiece `.model` file."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No tokenizer model at {path}.")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a valid sentencepiece model: {error}") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def _symbol_id(self, symbol: str) -> int:
        token_id = self._sp.piece_to_id(symbol)
        if token_id == self.unk_id:
            raise ValueError(f"The tokenizer {self.path or ''} has no {symbol} symbol; train it with Tokenizer.train.")
        return token_id

    @property
    def cls_id(self) -> int:
        return self._symbol_id(CLS)

    @property
    def sep_id(self) -> int:
        return self._symbol_id(SEP)

    @property
    def mask_id(self) -> int:
        return self._symbol_id(MASK)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never ordinary text: pad, unk, bos, eos and the encoder symbols."""
        ids = {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        ids.update(i for i in map(self._sp.piece_to_id, ENCODER_SYMBOLS) if i != self.unk_id)
        return frozenset(ids)

    def encode(self, text: str) -> list[int]:
        """One string -> its token ids (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Many strings -> their token ids (sentencepiece's multithreaded batch encoding)."""
        return self._sp.encode(list(texts))

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
        """Token ids -> text; padding and other control ids are dropped."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def check_compatible(self, config: ModelConfig) -> None:
        """Raises unless the model's vocabulary is exactly this tokenizer's ids.

        A smaller model has no embedding for the highest ids; a larger one has rows no text
        maps to, which generation could still emit and decoding could not turn into text.
        """
        if self.vocab_size != config.vocab_size:
            problem = (
                f"ids >= {config.vocab_size} have no embedding" if self.vocab_size > config.vocab_size
                else f"ids {self.vocab_size}..{config.vocab_size - 1} match no piece, so text generated with them "
                "cannot be decoded"
            )
            raise ValueError(
                f"The tokenizer has {self.vocab_size} pieces but the model's vocab_size is {config.vocab_size}: "
                f"{problem}. Set model.vocab_size={self.vocab_size} (or use a tokenizer with "
                f"{config.vocab_size} pieces)."
            )

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or 'in memory'}, vocab_size={self.vocab_size})"
