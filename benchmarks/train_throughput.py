"""Training throughput of the project's own step: tokens/s, step time, compile time, peak
memory and MFU for a preset and batch shape.

    python benchmarks/train_throughput.py [--preset gpt2-small] [--set FIELD=VALUE ...]
        [--batch 8] [--length 1024] [--dtype bfloat16] [--attention cudnn] [--steps 10] [--rounds 3]
        [--out benchmarks/results/train_throughput.json]

The step is `train.step.compile_steps`'s (objective, AdamW with clipping and the decay mask,
the non-finite guard, metrics) on a batch of random tokens already on the device; dropout
follows the preset unless `--set dropout_rate=0 attention_dropout_rate=0
feed_forward_dropout_rate=0`.

The step time is the median over --rounds rounds of one round's time / --steps; a round
dispatches --steps steps back to back and waits once, as the training loop does (it keeps
metrics on the device and reads them only at log steps, a step late), so the host prepares
the next step while the device runs this one. Waiting for every step would add the host's
dispatch time to each: in a profile of GPT-2 small's unrolled step on an H100 a step's
kernels spanned 40.6 ms of the 46.3 ms that waiting for every step measured.

MFU = model FLOPs per second / peak. Model FLOPs per token are 6 x the weights of every matrix
product (projections and the output head; not the embedding lookup) plus attention: 12 x heads
x head_dim per (query, key) pair per layer. Causal self-attention counts the pairs the mask
allows, (T + 1) / 2 keys per query on average; `MFU (all pairs)` counts all T x T, the PaLM /
nanoGPT convention. The peak is the published dense bfloat16 figure for bfloat16 compute on a
GPU/TPU (`train.metrics.PEAK_FLOPS`), else the rate of a large matmul in the compute dtype
measured now (always printed beside it), times the number of devices the step runs on.

Tokens are every position of the batch, source and target both for an encoder-decoder (as the
training log counts them, `train.metrics.tokens_per_step`); FLOPs per token divide the step's
FLOPs by those tokens.
"""

from __future__ import annotations

import argparse
import time

import jax

import workload
from report import write_results
from train.hugepages import reexec_with_huge_pages
from train.metrics import published_peak_flops
from transformer.tasks import Task


def main():
    reexec_with_huge_pages()  # as `python -m train` does; GLIBC_TUNABLES=glibc.malloc.hugetlb=0: without
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload.add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default: the preset's max_length)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    parser.add_argument("--attention", default=None, help="xla, cudnn, chunked or reference (default: the preset's)")
    parser.add_argument("--remat", default=None, help="rematerialisation policy (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps a round, after the compiling one")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median round gives the step time)")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    fields = {name: value for name, value in [("dtype", args.dtype), ("attention_implementation", args.attention),
                                              ("remat_policy", args.remat)] if value is not None}
    config = workload.model_config(args.preset, args.set, **fields)
    length = args.length or config.max_length
    measured_peak = workload.measured_matmul_peak(config.dtype)
    published = (published_peak_flops(jax.devices()[0].device_kind)
                 if jax.default_backend() != "cpu" and config.dtype == "bfloat16" else None)
    peak = (published or measured_peak) * jax.device_count()  # the step's batch is split over every device
    peak_source = ("published bf16" if published else f"measured {config.dtype}") + f" x {jax.device_count()} device(s)"

    step, state, batch = workload.training_step(config, args.batch, length)
    rng = jax.random.PRNGKey(0)
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    first_step = time.perf_counter() - start
    rounds = []
    for round_ in range(args.rounds):  # steps back to back, as the training loop dispatches them
        start = time.perf_counter()
        for index in range(args.steps):
            state, metrics = step(state, batch, jax.random.fold_in(rng, round_ * args.steps + index))
        jax.block_until_ready(metrics)
        rounds.append((time.perf_counter() - start) / args.steps)
    step_seconds = sorted(rounds)[len(rounds) // 2]
    sequences_per_row = 2 if workload.task_of(config) == Task.SEQ2SEQ else 1  # source and target, both `length`
    tokens = args.batch * length * sequences_per_row
    attended, full = (flops / sequences_per_row for flops in workload.training_flops_per_token(config, length))
    memory = jax.devices()[0].memory_stats() or {}
    peak_bytes = memory.get("peak_bytes_in_use")
    parameters = sum(x.size for x in jax.tree.leaves(state.params))
    row = {
        "preset": args.preset, "changes": args.set, "task": workload.task_of(config).value,
        "parameters": parameters, "dtype": config.dtype, "attention": config.attention_implementation.value,
        "remat": config.remat_policy.value, "batch": args.batch, "length": length,
        "timing": "back to back", "steps": args.steps, "rounds": args.rounds,
        "tokens_per_second": tokens / step_seconds, "step_ms": 1000 * step_seconds,
        "first_step_s": first_step, "peak_memory_gib": peak_bytes / 2**30 if peak_bytes else None,
        "flops_per_token": attended, "flops_per_token_all_pairs": full,
        "peak_flops": peak, "peak_source": peak_source, "measured_matmul_flops": measured_peak,
        "mfu": attended * tokens / step_seconds / peak, "mfu_all_pairs": full * tokens / step_seconds / peak,
        "loss": float(metrics["loss"] / metrics["weight"]),
    }
    print(f"{args.preset} {' '.join(args.set)}: {parameters / 1e6:.1f}M parameters, {row['task']}, "
          f"{config.dtype}, attention {row['attention']}, remat {row['remat']}, batch {args.batch} x {length}")
    print(f"peak: {peak / 1e12:.2f} TFLOP/s ({peak_source}); matmul measured now: {measured_peak / 1e12:.2f} "
          f"TFLOP/s {config.dtype}")
    print(f"{'tokens/s':>10} {'step ms':>9} {'first step s':>13} {'peak GiB':>9} {'MFU':>7} {'MFU (all pairs)':>16}")
    memory_text = f"{row['peak_memory_gib']:.2f}" if peak_bytes else "n/a"
    print(f"{row['tokens_per_second']:>10,.0f} {row['step_ms']:>9.1f} {first_step:>13.2f} {memory_text:>9} "
          f"{row['mfu']:>7.1%} {row['mfu_all_pairs']:>16.1%}")
    write_results(args.out, [row])


if __name__ == "__main__":
    main()
