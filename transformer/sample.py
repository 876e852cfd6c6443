"""Text in, text out: a trained run directory as a sampler, and its command line.

    sampler = Sampler.load("runs/gpt-tiny")
    sampler("ROMEO:", max_new_tokens=40, strategy="sample", top_p=0.9)
    for piece in sampler.stream("JULIET:"):
        print(piece, end="", flush=True)

    python -m transformer.sample runs/gpt-tiny --prompt "ROMEO:" --strategy sample --top-k 40
"""

from __future__ import annotations

import argparse
import pathlib
import queue
import sys
import threading
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import yaml

from transformer.config import ModelConfig
from transformer.models import CausalLM, Seq2SeqLM
from transformer.sampling import STRATEGIES, generate, unscanned
from transformer.tokenizer import Tokenizer

_GENERATIVE_TASKS = {"causal_lm": CausalLM, "seq2seq": Seq2SeqLM}


class Sampler:
    """A decoder-only model continues text; an encoder-decoder model translates it.

    Every call is one compiled generation (see `transformer.sampling.generate`); prompts of
    similar length reuse the compiled program.
    """

    def __init__(self, model: CausalLM | Seq2SeqLM, params, tokenizer: Tokenizer):
        tokenizer.check_compatible(model.config)
        self.tokenizer = tokenizer
        # Layers unstacked once here rather than inside every generation.
        self.model, self.variables = unscanned(model, {"params": nn.meta.unbox(params)})

    @classmethod
    def load(cls, run_dir: str | pathlib.Path, *, step: int | None = None) -> Sampler:
        """The model, tokenizer and parameters (latest checkpoint, or `step`) of a training run,
        on this process's first device, whatever mesh the run trained on."""
        from train.checkpoint import Checkpointer  # the run directory's checkpoint format

        run_dir = pathlib.Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a run directory (no config.yaml); train one with `python -m train`."
            )
        values = yaml.safe_load(config_path.read_text())
        task = values.get("task")
        if task not in _GENERATIVE_TASKS:
            raise ValueError(
                f"{run_dir} trained a {task} model, which does not generate text; a Sampler needs a causal_lm "
                "(decoder-only) or seq2seq (encoder-decoder) run."
            )
        model = _GENERATIVE_TASKS[task](ModelConfig.from_dict(values["model"]))
        dummy = (np.ones((1, 1), np.int32),) * (2 if task == "seq2seq" else 1)
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy))["params"]
        checkpointer = Checkpointer(run_dir / "checkpoints")
        try:
            params = checkpointer.restore_params(abstract, step)
        finally:
            checkpointer.close()
        return cls(model, params, Tokenizer.load(run_dir / "tokenizer.model"))

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.model, Seq2SeqLM)

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.is_encoder_decoder:
            return ids + [self.tokenizer.eos_id]
        return ids or [self.tokenizer.bos_id]

    def _generate(self, texts: Sequence[str], *, max_new_tokens, strategy, temperature, top_k, top_p,
                  num_beams, length_penalty, seed, on_tokens=None):
        tok = self.tokenizer
        prompts = [self._prompt_ids(text) for text in texts]
        output = generate(
            self.model, self.variables, prompts, max_new_tokens=max_new_tokens, strategy=strategy,
            temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
            eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id if self.is_encoder_decoder else None,
            rng=jax.random.PRNGKey(seed), on_tokens=on_tokens,
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
        self,
        text: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        seed: int = 0,
    ) -> str | list[str]:
        """The continuation (or translation) of one text, or of each of a batch of texts.

        Options are those of `transformer.sampling.generate`; `seed` fixes sampling.
        """
        texts = _texts(text)
        prompts, generated = self._generate(
            texts, max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature, top_k=top_k,
            top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, seed=seed,
        )
        outputs = [self._text(p, g) for p, g in zip(prompts, generated)]
        return outputs[0] if isinstance(text, str) else outputs

    def stream(
        self,
        text: str,
        *,
        max_new_tokens: int = 64,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> Iterator[str]:
        """Yields the continuation of one text piece by piece while the compiled loop runs;
        the pieces join to what `sampler(text, ...)` returns with the same options."""
        _texts(text, batch=False)
        pieces: queue.Queue = queue.Queue()
        done = object()

        def on_tokens(tokens: np.ndarray) -> None:
            pieces.put(int(tokens[0]))

        def work():
            try:
                self._generate(
                    [text], max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
                    top_k=top_k, top_p=top_p, num_beams=1, length_penalty=1.0, seed=seed, on_tokens=on_tokens,
                )
                pieces.put(done)
            except BaseException as error:  # re-raised in the consuming thread
                pieces.put(error)

        prompt = self._prompt_ids(text)
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        new: list[int] = []
        shown = ""
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if item == self.tokenizer.pad_id:
                continue
            new.append(item)
            current = self._text(prompt, new)
            if current.startswith(shown) and len(current) > len(shown):
                yield current[len(shown):]
                shown = current
            if item == self.tokenizer.eos_id:
                break
        worker.join()


def _texts(text, *, batch: bool = True) -> list[str]:
    """The prompts of a call: a str (or, with `batch`, a list or tuple of str); else a TypeError."""
    if isinstance(text, str):
        return [text]
    if batch and isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    expected = "a str or a list of str" if batch else "a str"
    raise TypeError(f"The prompt must be {expected}, got {type(text).__name__} {text!r:.60}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.sample",
        description="Continue (decoder-only) or translate (encoder-decoder) text with a trained run.",
    )
    parser.add_argument("run_dir", help="a run directory written by `python -m train`")
    parser.add_argument("--prompt", action="append", help="text to continue or translate (repeatable); "
                        "without it, each line of standard input is one prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--strategy", choices=STRATEGIES, default="sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    args = parser.parse_args(argv)
    try:
        sampler = Sampler.load(args.run_dir, step=args.step)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    options = dict(max_new_tokens=args.max_new_tokens, strategy=args.strategy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompts = args.prompt if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    try:
        for prompt in prompts:
            shown = prompt if not sampler.is_encoder_decoder else f"{prompt}\n-> "
            print(shown, end="", flush=True)
            if args.strategy == "beam" or args.no_stream:
                print(sampler(prompt, num_beams=args.num_beams, length_penalty=args.length_penalty, **options))
            else:
                for piece in sampler.stream(prompt, **options):
                    print(piece, end="", flush=True)
                print()
    except ValueError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
