"""The command line of the Sampler: continue or translate text with a trained run.

    python -m transformer.sample runs/gpt-tiny --prompt "ROMEO:" --strategy sample --top-k 40
    python -m transformer.sample runs/transformer-tiny-en-fr --strategy beam < sources.txt
    python -m transformer.sample path/to/gpt2 --prompt "Hello" --strategy greedy   # a Hugging Face directory
"""

from __future__ import annotations

import argparse
import sys

from transformer.compile_cache import DEFAULT_DIR, use_compilation_cache
from transformer.decoding import LENGTH_PENALTY_FORMS, STRATEGIES, GenerationConfig
from transformer.sampler import Sampler, check_seed


SAMPLE_TEMPERATURE = 0.8  # the command line samples a little sharper than GenerationConfig's 1.0
# The GenerationConfig options of one strategy each, passed where given: an error with another strategy.
STRATEGY_OPTIONS = (
    "temperature", "top_k", "top_k_uniform", "top_p", "num_beams", "length_penalty", "length_penalty_form"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.sample",
        description="Continue (decoder-only) or translate (encoder-decoder) text with a trained run "
        "or a published checkpoint.",
    )
    parser.add_argument("run_dir", help="a run directory written by `python -m train`, or a Hugging Face "
                        "checkpoint directory (config.json + model.safetensors: GPT-2, Llama, T5)")
    parser.add_argument("--prompt", action="append", help="text to continue or translate (repeatable); "
                        "without it, each line of standard input is one prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default %(default)s")
    parser.add_argument("--strategy", choices=STRATEGIES, default="sample", help="default %(default)s")
    parser.add_argument("--temperature", type=float, help=f"sample only; default {SAMPLE_TEMPERATURE}")
    parser.add_argument("--top-k", type=int, help="sample only: the k most likely tokens; default all")
    parser.add_argument("--top-k-uniform", action="store_true", default=None,
                        help="sample only: pick uniformly among the --top-k tokens (no --temperature or --top-p)")
    parser.add_argument("--top-p", type=float, help="sample only: the nucleus of probability p; default all")
    parser.add_argument("--num-beams", type=int, help="beam only; default 4")
    parser.add_argument("--length-penalty", type=float, help="beam only; default 1.0")
    parser.add_argument("--length-penalty-form", choices=LENGTH_PENALTY_FORMS,
                        help="beam only: sum(log p) / length**a (power) or ((5 + length) / 6)**a (gnmt); default power")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="no n-gram occurs twice in the generated text (e.g. 3 against greedy loops; 0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    parser.add_argument("--compilation-cache", default=DEFAULT_DIR, metavar="DIR",
                        help='compiled programs kept for the next call (default %(default)s; "" = off); '
                        "a streamed result's program calls back to Python and is not kept")
    args = parser.parse_args(argv)
    use_compilation_cache(args.compilation_cache)
    try:
        if args.strategy == "sample" and args.temperature is None and not args.top_k_uniform:
            args.temperature = SAMPLE_TEMPERATURE
        given = {name: getattr(args, name) for name in STRATEGY_OPTIONS if getattr(args, name) is not None}
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, strategy=args.strategy,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size, **given)
        check_seed(args.seed)
        sampler = Sampler.load(args.run_dir, step=args.step)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    prompts = args.prompt if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    try:
        for prompt in prompts:
            shown = prompt if not sampler.is_encoder_decoder else f"{prompt}\n-> "
            if config.strategy == "beam" or args.no_stream:
                print(shown + sampler(prompt, config, seed=args.seed))
            else:
                pieces = sampler.stream(prompt, config, seed=args.seed)  # checked before the prompt is shown
                print(shown, end="", flush=True)
                for piece in pieces:
                    print(piece, end="", flush=True)
                print()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
