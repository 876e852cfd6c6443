"""Compile time of the project's own training step against depth, with and without
`scan_layers`, and optionally of the generation program.

    python benchmarks/compile_time.py [--preset gpt2-small] [--set FIELD=VALUE ...]
        [--depths 2 4 8 16 32 48] [--scan both|on|off] [--batch 8] [--length 256]
        [--generate] [--out benchmarks/results/compile_time.json]

    e.g. python benchmarks/compile_time.py --preset gpt2-small \\
        --set d_model=256 num_heads=4 d_ff=1024 vocab_size=8192 max_length=256

The step is `train.step.compile_steps`'s (objective, AdamW with clipping and the decay mask,
the non-finite guard, metrics), built by `benchmarks/workload.py`. Each row is one fresh
compile through jax's ahead-of-time API, timed in three parts: trace (Python -> jaxpr: the
model's and optimizer's Python code), lower (jaxpr -> StableHLO) and compile (XLA's
optimisation and code generation); total is their sum, and ratio is total / the total of the
4-layer row of the first `--scan` setting measured (scanned, unless `--scan off`; the
smallest depth when 4 is not measured); `cpu s` and `cpu ratio` are
the same in process CPU seconds (all threads: XLA compiles on several), steadier than wall time
on a shared machine. `stablehlo` and `hlo` count the operations of the lowered and the
optimised module: with scan they should not grow with depth.

Every row is cold: a new model and a new jitted step, jax's in-memory caches cleared, and the
persistent compilation cache switched off (JAX_COMPILATION_CACHE_DIR is ignored; a compile that
consults it would abort the run). The process's first step compile (4 layers, scanned unless
`--scan off`) is also timed before the rows, as `cold first step`: it pays the process's one-
time costs too, as a user's first training step does.

--generate adds the program of `transformer.generate` (greedy, batch 1, a 16-token prompt, 32
new tokens; decoder-only presets): its first call less its second. Generation unstacks scanned
layers before the token loop (each token then reads the weights in place), so its size grows
with depth whatever `scan_layers` says.
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # before jax reads its configuration

import jax  # noqa: E402
import numpy as np  # noqa: E402

import workload  # noqa: E402
from report import write_results  # noqa: E402
from transformer.tasks import Task  # noqa: E402

REFERENCE_DEPTH = 4

_cache_hits = []


def _listen(event: str, **_) -> None:
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/compile_requests_use_cache"):
        _cache_hits.append(event)


def no_persistent_cache() -> None:
    """Switches jax's persistent compilation cache off and makes any use of it an error."""
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.monitoring.register_event_listener(_listen)


def check_cold() -> None:
    if _cache_hits:
        raise SystemExit(f"a compilation cache answered ({_cache_hits}): the times are not cold compiles")


def count_ops(text: str, stablehlo: bool) -> int:
    """Operations in a module's text: `%x = op` lines (StableHLO), instructions (HLO)."""
    if stablehlo:
        return sum(1 for line in text.splitlines() if re.match(r"\s*(%\S+(, %\S+)*\s*=|\"?[a-z_]+\.[a-z_]+)", line))
    return sum(1 for line in text.splitlines() if re.match(r"\s*(ROOT )?%\S+ = ", line))


def timed_compile(jitted, args) -> dict:
    """trace, lower and compile seconds of `jitted(*args)`, and the op counts."""
    start, cpu_start = time.perf_counter(), time.process_time()
    traced = jitted.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at, cpu_end = time.perf_counter(), time.process_time()
    check_cold()
    return {
        "trace_s": traced_at - start, "lower_s": lowered_at - traced_at, "compile_s": compiled_at - lowered_at,
        "total_s": compiled_at - start, "cpu_s": cpu_end - cpu_start,
        "stablehlo_ops": count_ops(lowered.as_text(), True), "hlo_ops": count_ops(compiled.as_text(), False),
    }


def layer_fields(config, depth: int, scan: bool) -> dict:
    fields = {"scan_layers": scan}
    if config.num_encoder_layers:
        fields["num_encoder_layers"] = depth
    if config.num_decoder_layers:
        fields["num_decoder_layers"] = depth
    return fields


def measure_training(args, base, depth: int, scan: bool) -> dict:
    config = workload.model_config(args.preset, args.set, **layer_fields(base, depth, scan))
    step, state, batch = workload.training_step(config, args.batch, args.length or config.max_length)
    row = timed_compile(step, (state, batch, jax.random.PRNGKey(0)))
    del state, batch
    return row


def measure_generation(args, base, depth: int, scan: bool) -> dict:
    """Compile seconds of `transformer.generate`'s program: its first call less its second."""
    import transformer as tfm

    config = workload.model_config(args.preset, args.set, **layer_fields(base, depth, scan),
                                   dropout_rate=0.0, attention_dropout_rate=0.0,
                                   feed_forward_dropout_rate=0.0)
    model = tfm.CausalLM(config)
    prompt = np.full((1, 16), 7, np.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), prompt)

    def call() -> float:
        start = time.perf_counter()
        jax.block_until_ready(tfm.generate(model, variables, prompt, max_new_tokens=32, strategy="greedy").tokens)
        return time.perf_counter() - start

    first = call()
    check_cold()
    total = first - call()
    return {"trace_s": None, "lower_s": None, "compile_s": None, "total_s": total, "cpu_s": None,
            "stablehlo_ops": None, "hlo_ops": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload.add_model_arguments(parser)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32, 48])
    parser.add_argument("--scan", choices=["both", "on", "off"], default="both")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default: the preset's max_length)")
    parser.add_argument("--generate", action="store_true", help="also time the generation program")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()

    no_persistent_cache()
    base = workload.model_config(args.preset, args.set)
    scans = {"both": [True, False], "on": [True], "off": [False]}[args.scan]
    programs = ["train"] + (["generate"] if args.generate else [])
    if args.generate and workload.task_of(base) != Task.CAUSAL_LM:
        raise SystemExit("--generate times decoder-only models (transformer.generate's CausalLM path)")
    measure = {"train": measure_training, "generate": measure_generation}
    print(f"device: {workload.device_line()}, {len(os.sched_getaffinity(0))} CPU core(s) usable")
    print(f"{args.preset} {' '.join(args.set)}: task {workload.task_of(base).value}, batch {args.batch} x "
          f"{args.length or base.max_length}, persistent compilation cache off")

    reference_depth = REFERENCE_DEPTH if REFERENCE_DEPTH in args.depths else min(args.depths)
    cold = measure_training(args, base, reference_depth, scans[0])
    print(f"cold first step ({reference_depth} layers, scan {'on' if scans[0] else 'off'}): trace "
          f"{_fmt(cold['trace_s'])} s + lower {_fmt(cold['lower_s'])} s + compile {_fmt(cold['compile_s'])} s = "
          f"{cold['total_s']:.2f} s")

    rows = []
    for program in programs:
        for scan in scans:
            for depth in args.depths:
                jax.clear_caches()
                row = {"program": program, "depth": depth, "scan": scan, **measure[program](args, base, depth, scan)}
                rows.append(row)
                print(f"  measured {program} depth {depth} scan {scan}: {row['total_s']:.2f} s", flush=True)

    print()
    header = (f"{'program':>8} {'depth':>5} {'scan':>4} {'trace s':>8} {'lower s':>8} {'compile s':>9} "
              f"{'total s':>8} {'ratio':>6} {'cpu s':>7} {'cpu ratio':>9} {'stablehlo':>9} {'hlo':>6}")
    print(header)
    for program in programs:
        reference = next((r for r in rows if r["program"] == program and r["depth"] == reference_depth
                          and r["scan"] == scans[0]), None)
        for row in (r for r in rows if r["program"] == program):
            row["ratio"] = row["total_s"] / reference["total_s"] if reference else None
            row["cpu_ratio"] = row["cpu_s"] / reference["cpu_s"] if reference and reference["cpu_s"] else None
            print(f"{program:>8} {row['depth']:>5} {'on' if row['scan'] else 'off':>4} {_fmt(row['trace_s']):>8} "
                  f"{_fmt(row['lower_s']):>8} {_fmt(row['compile_s']):>9} {row['total_s']:>8.2f} "
                  f"{_fmt(row['ratio']):>6} {_fmt(row['cpu_s']):>7} {_fmt(row['cpu_ratio']):>9} "
                  f"{row['stablehlo_ops'] or '-':>9} {row['hlo_ops'] or '-':>6}")
    for row in rows:
        row.update(preset=args.preset, changes=args.set, batch=args.batch, length=args.length or base.max_length)
    write_results(args.out, rows, cold_first_step={"depth": reference_depth, "scan": scans[0], **cold},
                  reference_depth=reference_depth)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
