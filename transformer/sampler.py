"""Text in, text out: a trained run directory, or a published checkpoint, as a sampler.

    sampler = Sampler.load("runs/gpt-tiny")          # or a Hugging Face directory: GPT-2, Llama, T5
    sampler("ROMEO:", max_new_tokens=40, strategy="sample", top_p=0.9)
    sampler(["ROMEO:", "JULIET:"], GenerationConfig(max_new_tokens=40, strategy="beam"))
    for piece in sampler.stream("JULIET:"):
        print(piece, end="", flush=True)

Its command line is `python -m transformer.sample` (transformer/sample.py).
"""

from __future__ import annotations

import os
import pathlib
import queue
import threading
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import yaml

from transformer.config import ModelConfig
from transformer.decoding import GenerationConfig, check_arguments, for_decoding, generate, with_options
from transformer.models import CausalLM, Seq2SeqLM
from transformer.pretrained import from_pretrained
from transformer.runs import load_run, read_config
from transformer.tasks import Task
from transformer.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what a decoder gives for the bytes of a character cut short


class Sampler:
    """A decoder-only model continues text; an encoder-decoder model translates it.

    Every call is one compiled generation (see `transformer.decoding.generate`); prompts of
    similar length reuse the compiled program.
    """

    def __init__(
        self, model: CausalLM | Seq2SeqLM, params, tokenizer: Tokenizer, *, token_ids: dict[str, int] | None = None
    ):
        """token_ids: eos_id (one or several), pad_id and bos_id (the decoder start) where they are
        not the tokenizer's (a checkpoint's config.json sets T5's decoder start to its pad id)."""
        tokenizer.check_compatible(model.config)
        self.tokenizer = tokenizer
        # GenerationConfig fields a call leaves None: the token ids, and the ids that may be generated
        # (a checkpoint's embedding may have rows past the tokenizer's pieces).
        padded = model.config.vocab_size > tokenizer.vocab_size
        self.defaults = _tokenizer_ids(tokenizer, isinstance(model, Seq2SeqLM)) | (token_ids or {}) | {
            "vocab_size": tokenizer.vocab_size if padded else None}
        # Layers unstacked once here rather than inside every generation.
        self.model, self.variables = for_decoding(model, {"params": nn.meta.unbox(params)})

    @classmethod
    def load(cls, run_dir: str | os.PathLike, *, step: int | None = None) -> Sampler:
        """The model, tokenizer and parameters (latest checkpoint, or `step`) of a training run,
        on this process's first device, whatever mesh the run trained on; or a Hugging Face
        checkpoint directory of a model that generates text (see `transformer.pretrained`)."""
        if not (pathlib.Path(run_dir) / "config.yaml").is_file():
            if step is not None:
                raise ValueError(f"step={step} names a checkpoint of a training run; {run_dir} is not one.")
            return cls._load_pretrained(run_dir)
        _check_run_config(run_dir)
        run = load_run(run_dir, step=step)
        return cls(run.model, run.params, run.tokenizer)

    @classmethod
    def _load_pretrained(cls, path: str | os.PathLike) -> Sampler:
        loaded = from_pretrained(path)
        if not isinstance(loaded.model, (CausalLM, Seq2SeqLM)):
            raise ValueError(
                f"{path} holds a {loaded.head} model, which does not generate text; a Sampler needs a decoder-only "
                "(GPT-2, Llama) or encoder-decoder (T5) checkpoint."
            )
        if loaded.tokenizer is None:
            raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json, spiece.model, vocab.json, ...).")
        return cls(loaded.model, loaded.params, loaded.tokenizer, token_ids=loaded.generation)

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.model, Seq2SeqLM)

    def _config(self, config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
        """`config` with `options` over it; the token ids it leaves None are the tokenizer's
        (bos_id for an encoder-decoder model only)."""
        config = with_options(config, options)
        return config.replace(**{name: value for name, value in self.defaults.items() if getattr(config, name) is None})

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a text is given to the model as (see `prompt_ids`)."""
        if not self.is_encoder_decoder:
            return prompt_ids(self.tokenizer, text)
        eos_ids = self._config(None, {}).eos_ids  # a source ends with the first
        return prompt_ids(self.tokenizer, text, source_eos_id=eos_ids[0] if eos_ids else None)

    def _generate(self, texts: Sequence[str], config: GenerationConfig, seed: int, on_tokens=None):
        prompts = [self.prompt_ids(text) for text in texts]
        output = generate(
            self.model, self.variables, prompts, config, rng=jax.random.PRNGKey(check_seed(seed)), on_tokens=on_tokens
        )
        tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
        return prompts, [list(row[:n]) for row, n in zip(tokens, lengths)]

    def _text(self, prompt: list[int], new: list[int]) -> str:
        """The generated text alone (a continuation keeps the spacing it has after the prompt)."""
        if self.is_encoder_decoder:
            return self.tokenizer.decode(new)
        before, after = self.tokenizer.decode(prompt), self.tokenizer.decode([*prompt, *new])
        return after[len(before):] if after.startswith(before) else self.tokenizer.decode(new)

    def __call__(
        self, text: str | Sequence[str], config: GenerationConfig | None = None, *, seed: int = 0, **options: Any
    ) -> str | list[str]:
        """The continuation (or translation) of one text, or of each of a batch of texts.

        `config` and `options` (its fields by name) as in `transformer.decoding.generate`;
        `seed` fixes sampling.
        """
        texts = _texts(text)
        config = self._config(config, options)
        prompts, generated = self._generate(texts, config, seed)
        # a final EOS is not text, even where it is an ordinary token (a stop id of the caller's)
        generated = [g[:-1] if g and g[-1] in config.eos_ids else g for g in generated]
        outputs = [self._text(p, g) for p, g in zip(prompts, generated)]
        return outputs[0] if isinstance(text, str) else outputs

    def token_ids(
        self, text: str, config: GenerationConfig | None = None, *, seed: int = 0, **options: Any
    ) -> tuple[list[int], list[int]]:
        """The prompt ids of one text and the ids generated after them (up to and including EOS):
        what `sampler(text, ...)` decodes, for a caller that needs the tokens."""
        _texts(text, batch=False)
        (prompt,), (generated,) = self._generate([text], self._config(config, options), seed)
        return prompt, [int(t) for t in generated]

    def stream(
        self, text: str, config: GenerationConfig | None = None, *, seed: int = 0, **options: Any
    ) -> Iterator[str]:
        """Yields the continuation of one text piece by piece while the compiled loop runs;
        the pieces join to what `sampler(text, ...)` returns with the same options (not beam).
        Bad arguments (a prompt too long for the context, ...) are an error here, before any piece."""
        _texts(text, batch=False)
        config = self._config(config, options)
        prompt = self.prompt_ids(text)
        check_arguments(self.model, [prompt], config, rng=jax.random.PRNGKey(check_seed(seed)), streaming=True)
        return self._pieces(text, prompt, config, seed)

    def _pieces(self, text: str, prompt: list[int], config: GenerationConfig, seed: int) -> Iterator[str]:
        """`stream`'s pieces, of arguments it has checked."""
        pieces: queue.Queue = queue.Queue()
        done = object()

        def on_tokens(tokens: np.ndarray) -> None:
            pieces.put(int(tokens[0]))

        def work():
            try:
                self._generate([text], config, seed, on_tokens)
                pieces.put(done)
            except BaseException as error:  # re-raised in the consuming thread
                pieces.put(error)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        new: list[int] = []
        shown = ""
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if item in config.eos_ids:  # decoded as nothing; checked first, as the pad id may be the same
                break
            if item == config.pad_id:
                continue
            new.append(item)
            # A token may end inside a character's bytes, which decode as U+FFFD until the next
            # token completes them: held back, so that every piece extends the text shown so far.
            current = self._text(prompt, new).rstrip(INCOMPLETE)
            if current.startswith(shown) and len(current) > len(shown):
                yield current[len(shown):]
                shown = current
        worker.join()
        if (final := self._text(prompt, new)).startswith(shown) and len(final) > len(shown):
            yield final[len(shown):]  # bytes that never made a character


def prompt_ids(tokenizer: Tokenizer, text: str, *, source_eos_id: int | None = None) -> list[int]:
    """The ids a text is given to a model as: an encoder-decoder model's source ends with
    `source_eos_id`; a decoder-only prompt starts with BOS where the tokenizer adds one (Llama),
    or is BOS alone when empty."""
    ids = tokenizer.encode(text)
    if source_eos_id is not None:
        return ids + [source_eos_id]
    if tokenizer.adds_bos or not ids:
        return [tokenizer.bos_id, *ids]
    return ids


def _tokenizer_ids(tokenizer: Tokenizer, encoder_decoder: bool) -> dict[str, int | None]:
    """The tokenizer's eos and pad ids and, as bos_id, an encoder-decoder's decoder start; None for
    a token it lacks."""
    names = dict(eos_id="eos_id", pad_id="pad_id") | (dict(bos_id="decoder_start_id") if encoder_decoder else {})
    ids = {}
    for name, attribute in names.items():
        try:
            ids[name] = getattr(tokenizer, attribute)
        except ValueError:  # no such token
            ids[name] = None
    return ids


def _texts(text, *, batch: bool = True) -> list[str]:
    """The prompts of a call: a str (or, with `batch`, a list or tuple of str), else a TypeError;
    a str that is not Unicode text (one a tokenizer cannot encode) is a ValueError."""
    if isinstance(text, str):
        texts = [text]
    elif batch and isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        texts = list(text)
    else:
        expected = "a str or a list of str" if batch else "a str"
        raise TypeError(f"The prompt must be {expected}, got {type(text).__name__} {text!r:.60}.")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"The prompt {t!r:.60} is not text: character {error.start} is {t[error.start]!r}, a lone surrogate "
                "(as Python reads a byte that is not UTF-8); give the prompt as UTF-8 text."
            ) from None
    return texts


def check_seed(seed) -> int:
    """`seed` as an int, if it is a whole number that jax.random.PRNGKey takes (-2**63 <= seed < 2**63);
    else a TypeError or ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a whole number, got {type(seed).__name__} {seed!r}.")
    if not -(2**63) <= int(seed) < 2**63:
        raise ValueError(f"seed must be from -2**63 to 2**63 - 1, got {seed}.")
    return int(seed)


def _check_run_config(run_dir: str | os.PathLike) -> None:
    """Refuses, before any checkpoint is read, a run whose config.yaml cannot be read, whose task
    does not generate text, or whose model fields make no model: a ValueError naming the problem."""
    path = pathlib.Path(run_dir) / "config.yaml"
    try:
        values = read_config(run_dir)
    except UnicodeDecodeError:
        raise ValueError(f"{path} holds bytes that are not UTF-8 text; restore the run's config.yaml.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path} is not valid YAML: {getattr(error, 'problem', error)}{where}; restore the "
                         "run's config.yaml.") from None
    task = Task(values["task"])
    if not task.generates:
        raise ValueError(
            f"{run_dir} trained a {task} model, which does not generate text; a Sampler needs a run of a task that "
            f"does: {', '.join(t for t in Task if t.generates)}."
        )
    try:
        ModelConfig.from_dict(values["model"])
    except (TypeError, ValueError) as error:  # e.g. fields missing
        message = str(error).rstrip(".")
        raise ValueError(f"{path} has no valid model: {message}; restore the run's config.yaml.") from None
