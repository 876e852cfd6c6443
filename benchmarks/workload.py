"""What the benchmarks measure, built once: a model from a preset and `field=value` changes,
the project's own compiled training step on synthetic batches, the model's FLOPs, and the
hardware's limits (matmul peak, memory bandwidth) measured on the spot."""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from train import objectives
from train.metrics import head_weights, training_flops
from train.optim import make_optimizer
from train.step import compile_steps, create_state, global_batch, make_mesh
from transformer.config import ModelConfig
from transformer.tasks import Task

OBJECTIVES = {Task.CAUSAL_LM: objectives.causal_lm, Task.MASKED_LM: objectives.masked_lm, Task.SEQ2SEQ: objectives.seq2seq}


def add_model_arguments(parser: argparse.ArgumentParser, preset: str = "gpt2-small") -> None:
    parser.add_argument("--preset", default=preset, help="a ModelConfig preset (transformer.config.PRESETS)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig fields to change, e.g. num_decoder_layers=4 d_model=256")


def model_config(preset: str, changes: list[str], **fields: Any) -> ModelConfig:
    """The preset with `FIELD=VALUE` strings (YAML values) and `fields` applied."""
    values = {}
    for item in changes:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {item!r}")
        values[key] = yaml.safe_load(text)
    return ModelConfig.preset(preset, **{**values, **fields})


def task_of(config: ModelConfig) -> Task:
    """The task a benchmark trains a model for: by which stacks it has."""
    if config.num_encoder_layers and config.num_decoder_layers:
        return Task.SEQ2SEQ
    return Task.MASKED_LM if config.num_encoder_layers else Task.CAUSAL_LM


def synthetic_batch(task: Task, batch: int, length: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One full batch of random tokens in the layout the task's objective reads (no padding;
    source and target both `length` long; masked LM predicts 15% of positions)."""
    rng = np.random.default_rng(seed)
    tokens = lambda: rng.integers(7, vocab_size, (batch, length)).astype(np.int32)  # noqa: E731
    ones = np.ones((batch, length), np.int32)
    if task == Task.CAUSAL_LM:
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
        return {"tokens": tokens(), "targets": tokens(), "segment_ids": ones, "positions": positions,
                "weights": np.ones((batch, length), np.float32)}
    if task == Task.MASKED_LM:
        return {"tokens": tokens(), "targets": tokens(), "segment_ids": ones, "token_types": np.zeros_like(ones),
                "weights": (rng.random((batch, length)) < 0.15).astype(np.float32)}
    return {"source": tokens(), "target_in": tokens(), "targets": tokens(), "source_segment_ids": ones,
            "target_segment_ids": ones, "weights": np.ones((batch, length), np.float32)}


def training_step(config: ModelConfig, batch_size: int, length: int, seed: int = 0):
    """The project's compiled training step (objective, AdamW with clipping and decay mask,
    the non-finite guard, metrics), its initial state and a batch on the devices.

    Returns (step, state, batch): `step(state, batch, rng) -> (state, metrics)` donates `state`.
    """
    task = task_of(config)
    model = task.model(config)
    optimizer = make_optimizer(lambda count: 1e-4)
    mesh = make_mesh()
    inputs = task.example_inputs(length, length)
    state, shardings = create_state(model, optimizer, inputs, jax.random.PRNGKey(seed), mesh)
    step, _ = compile_steps(model, OBJECTIVES[task], optimizer, mesh, shardings)
    batch = global_batch(synthetic_batch(task, batch_size, length, config.vocab_size, seed), mesh)
    return step, state, batch


def training_flops_per_token(config: ModelConfig, length: int) -> tuple[float, float]:
    """FLOPs of one training token of a row `length` long (source and target both `length` for
    an encoder-decoder): (causal pairs the mask allows, all T x T pairs); see
    `train.metrics.training_flops`."""
    task = task_of(config)
    source = length if task == Task.SEQ2SEQ else 0
    head = head_weights(config, task)
    return tuple(training_flops(config, length, source, head=head, causal_pairs=pairs) / length
                 for pairs in ("attended", "all"))


def time_it(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measured_matmul_peak(dtype: str = "float32", size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product in `dtype` on the default device, measured now."""
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)  # an accelerator needs a large one
    a = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(2), (size, size), jnp.float32).astype(dtype)
    product = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(product(a, b))
    seconds = time_it(lambda: jax.block_until_ready(product(a, b)), repeats)
    return 2 * size**3 / seconds


def measured_read_bandwidth(megabytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s at which the default device reads memory, measured now: a large float32 matrix
    read once by a matrix-vector product (as a decode step reads its weights).

    Reading is what bounds decoding, which never writes its weights. A copy's traffic (read
    plus write) measures more: 1.4-2.3x the read-only rates on the 2-core CPU of
    benchmarks/RESULTS.md, where other read-only kernels came within 25% of this one.
    """
    megabytes = megabytes or (512 if jax.default_backend() == "cpu" else 4096)
    columns = 4096
    matrix = jnp.ones((megabytes * 2**20 // (4 * columns), columns), jnp.float32)
    vector = jnp.ones((columns,), jnp.float32)
    read = jax.jit(jnp.matmul)
    jax.block_until_ready(read(matrix, vector))
    return matrix.nbytes / time_it(lambda: jax.block_until_ready(read(matrix, vector)), repeats)


def device_line() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), jax {jax.__version__}"
