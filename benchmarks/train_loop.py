"""What the training loop costs on top of its compiled step: steps per second of the bare step
against the whole loop (data, logging, progress bar), measured in one process.

    python benchmarks/train_loop.py [--experiment gpt-tiny] [--steps 200] [--log-every 10]
        [--out benchmarks/results/train_loop.json]

The bare step runs the run's own compiled `train_step` on batches made beforehand; the loop
is `train.loop.run` on a fresh run directory with the same config, its speed read from the
`steps_per_second` it logs (wall time between the ends of two log intervals, so logging and
data loading count; the first, compiling step excluded). The bare step runs before and after
the loop, and the loop is compared with their mean: on a shared CPU the speed drifts. Evaluation,
sampling and checkpoints are pushed past the end, so both sides do the same work per step.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax

from report import write_results
from train import config as config_lib
from train import loop, rundir
from train.hugepages import reexec_with_huge_pages
from train.step import global_batch


def bare_steps_per_second(config, steps: int) -> float:
    """The compiled step alone, on batches already in memory."""
    with tempfile.TemporaryDirectory() as run_dir:
        job = loop.set_up(config.replace(run_dir=run_dir), pathlib.Path(run_dir), resuming=False)
        batches = [global_batch(next(job.batches), job.mesh) for _ in range(min(steps, 50))]
        state, key = job.state, jax.random.PRNGKey(0)
        state, metrics = job.train_step(state, batches[0], key)  # compiles
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for step in range(steps):
            state, metrics = job.train_step(state, batches[step % len(batches)], jax.random.fold_in(key, step))
        jax.block_until_ready((state, metrics))
        return steps / (time.perf_counter() - start)


def loop_steps_per_second(config) -> list[float]:
    """`train.loop.run`'s logged steps per second, one value per log interval."""
    with tempfile.TemporaryDirectory() as run_dir:
        loop.run(config.replace(run_dir=run_dir), progress=False)
        records, _ = rundir.read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
        return [r["steps_per_second"] for r in records if r["split"] == "train" and "steps_per_second" in r]


def main():
    reexec_with_huge_pages()  # as `python -m train` does; GLIBC_TUNABLES=glibc.malloc.hugetlb=0: without
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="gpt-tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/train_loop.json")
    args = parser.parse_args()
    config = config_lib.experiment(args.experiment).replace(
        steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, checkpoint_every=10 * args.steps,
        sample_tokens=0, bleu_examples=0,
    )
    before = bare_steps_per_second(config, args.steps)
    intervals = loop_steps_per_second(config)
    after = bare_steps_per_second(config, args.steps)
    bare, looped = (before + after) / 2, statistics.median(intervals)
    rows = [
        {"measure": "bare compiled step, before the loop", "steps_per_second": before},
        {"measure": f"train.loop.run (median of {len(intervals)} log intervals)", "steps_per_second": looped},
        {"measure": "bare compiled step, after the loop", "steps_per_second": after},
    ]
    print(f"{'measure':55s} {'steps/s':>9s}")
    for row in rows:
        print(f"{row['measure']:55s} {row['steps_per_second']:9.2f}")
    print(f"loop / bare (mean of the two): {looped / bare:.3f}; the loop costs {1 - looped / bare:.1%} of the step's speed")
    write_results(args.out, rows, experiment=args.experiment, log_every=args.log_every, loop_over_bare=looped / bare)


if __name__ == "__main__":
    main()
