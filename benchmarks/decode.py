"""Decoding speed: our compiled generation loop against Hugging Face `generate`, side by side.

    pip install torch==2.13.0 transformers      # the reference (a CPU build of torch)
    python benchmarks/decode.py [--batch-sizes 1 8] [--prompt-length 32] [--new-tokens 64]
        [--repeats 3] [--dtype float32] [--out benchmarks/results/decode.json]

Both sides run GPT-2 small (124M parameters, the same architecture: tests/test_presets.py
checks the parameter count against `GPT2LMHeadModel`) with random weights, greedy decoding with
a KV cache, a fixed prompt and exactly `--new-tokens` new tokens (no EOS). The figure is new
tokens per second (batch x new tokens / wall time, prefill included), the median of
`--repeats` calls after a warm-up call (which compiles our program); the ratio is ours / theirs
in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

import transformer as tfm
from report import write_results


def time_calls(fn, repeats: int) -> float:
    fn()  # warm-up: compiles ours, fills torch's caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(prompts: np.ndarray, new_tokens: int, dtype: str, repeats: int) -> float:
    config = tfm.ModelConfig.preset("gpt2-small", dtype=dtype, dropout_rate=0.0, attention_dropout_rate=0.0)
    model = tfm.CausalLM(config)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), prompts[:1])["params"])}
    model, variables = tfm.unscanned(model, variables)  # as Sampler does: layers unstacked once

    def run():
        output = tfm.generate(model, variables, prompts, max_new_tokens=new_tokens, strategy="greedy")
        jax.block_until_ready(output.tokens)

    return time_calls(run, repeats)


def hugging_face(prompts: np.ndarray, new_tokens: int, dtype: str, repeats: int) -> float:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().to(getattr(torch, dtype))
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def run():
        with torch.inference_mode():
            model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0,
            )

    return time_calls(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"gpt2-small, prompt {args.prompt_length}, {args.new_tokens} new tokens, greedy, {args.dtype}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ours / HF':>10}")
    rows = []
    for batch in args.batch_sizes:
        prompts = np.random.default_rng(batch).integers(0, 50257, (batch, args.prompt_length)).astype(np.int32)
        seconds_ours = ours(prompts, args.new_tokens, args.dtype, args.repeats)
        seconds_hf = hugging_face(prompts, args.new_tokens, args.dtype, args.repeats)
        tokens = batch * args.new_tokens
        row = {
            "batch": batch, "ours_tokens_per_second": tokens / seconds_ours,
            "hf_tokens_per_second": tokens / seconds_hf, "ours_over_hf": seconds_hf / seconds_ours,
        }
        rows.append(row)
        print(f"{batch:>5} {row['ours_tokens_per_second']:>11.1f} {row['hf_tokens_per_second']:>10.1f} "
              f"{row['ours_over_hf']:>10.2f}")

    import torch
    import transformers

    write_results(args.out, rows, torch=torch.__version__, transformers=transformers.__version__,
                  prompt_length=args.prompt_length, new_tokens=args.new_tokens, dtype=args.dtype)


if __name__ == "__main__":
    main()
