"""Attention implementations side by side: compiled temporary memory and time per call.

    python benchmarks/attention.py [--lengths 1024 2048 4096 8192] [--heads 8] [--head-dim 64]
        [--dtype float32] [--backward] [--relative-bias] [--out benchmarks/results/attention.json]

Causal self-attention, batch 1. With --relative-bias, every implementation is measured a
second time with T5's relative-position bias (a `RelativeBias`, 32 buckets; with --backward,
its table's gradient too). Memory is XLA's own count of temporary buffers of the compiled
program (`memory_analysis().temp_size_in_bytes`); time is the median of repeated calls after
compilation. Ratios are against "xla" without bias in the same run. "cudnn" runs only on
NVIDIA GPUs; an implementation whose program does not fit is reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import transformer as tfm
from report import write_results


NUM_BUCKETS, MAX_DISTANCE = 32, 128  # T5's relative-bias settings


def measure(
    implementation: str, length: int, heads: int, head_dim: int, dtype, backward: bool, repeats: int,
    relative_bias: bool = False,
):
    """(temporary bytes, median seconds per call) of causal attention, or of its gradient."""
    shape = jax.ShapeDtypeStruct((1, length, heads, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    table_shape = jax.ShapeDtypeStruct((NUM_BUCKETS, heads), jnp.float32)

    def attend(q, k, v, segment_ids, positions, table=None):
        mask = tfm.self_attention_mask(segment_ids, positions, causal=True)
        bias = None if table is None else tfm.RelativeBias(
            table, positions, positions, bidirectional=False, max_distance=MAX_DISTANCE
        )
        return tfm.dot_product_attention(q, k, v, mask, bias, implementation=implementation)

    fn = attend
    if backward:
        argnums = (0, 1, 2, 5) if relative_bias else (0, 1, 2)
        fn = jax.grad(lambda *args: attend(*args).astype(jnp.float32).sum(), argnums=argnums)
    shapes = (shape, shape, shape, ids, ids) + ((table_shape,) if relative_bias else ())
    compiled = jax.jit(fn).lower(*shapes).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, shape.shape, dtype) for key in keys[:3])
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    segment_ids = jnp.ones((1, length), jnp.int32)
    args = (q, k, v, segment_ids, positions)
    if relative_bias:
        args += (0.1 * jax.random.normal(keys[3], table_shape.shape, jnp.float32),)  # [32, N]
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return temp_bytes, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backward", action="store_true", help="measure the gradient instead of the forward pass")
    parser.add_argument("--relative-bias", action="store_true", help="also measure with T5's relative-position bias")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()

    implementations = ["xla", "reference", "chunked"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    biases = ["none", "relative"] if args.relative_bias else ["none"]
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{'forward+backward' if args.backward else 'forward'}, heads={args.heads}, head_dim={args.head_dim}, "
          f"dtype={args.dtype}")
    print(f"{'length':>7} {'implementation':>14} {'bias':>8} {'temp MiB':>10} {'x xla':>7} {'ms/call':>9} {'x xla':>7}")
    for length in args.lengths:
        baseline = None  # "xla" without bias at this length; no ratios at a length where it failed
        for bias in biases:
            for implementation in implementations:
                key = {"length": length, "implementation": implementation, "bias": bias}
                try:
                    temp, seconds = measure(
                        implementation, length, args.heads, args.head_dim, dtype, args.backward, args.repeats,
                        relative_bias=bias == "relative",
                    )
                except Exception as error:  # noqa: BLE001 - report, e.g. out of memory, and go on
                    print(f"{length:>7} {implementation:>14} {bias:>8}  failed: {type(error).__name__}: "
                          f"{str(error)[:80]}")
                    rows.append({**key, "error": str(error)[:500]})
                    continue
                if implementation == "xla" and bias == "none":
                    baseline = (temp, seconds)
                ratios = (temp / max(baseline[0], 1), seconds / baseline[1]) if baseline else (None, None)
                row = {**key, "temp_bytes": temp, "seconds": seconds, "memory_vs_xla": ratios[0],
                       "time_vs_xla": ratios[1]}
                rows.append(row)
                memory_ratio, time_ratio = (f"{r:>7.2f}" if r is not None else f"{'-':>7}" for r in ratios)
                print(f"{length:>7} {implementation:>14} {bias:>8} {temp / 2**20:>10.1f} {memory_ratio} "
                      f"{seconds * 1e3:>9.2f} {time_ratio}")

    write_results(
        args.out, rows, backward=args.backward, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        relative_bias=args.relative_bias,
    )


if __name__ == "__main__":
    main()
