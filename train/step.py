"""The compiled training and evaluation steps, sharded over a ("data", "fsdp", "tensor") mesh.

Parameters carry logical axis names; `transformer.sharding.axis_rules` maps them to mesh
axes, and every sharding here is derived from the abstract train state and those
rules, never written per parameter. Batches are split along their first axis over
("data", "fsdp").
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import objectives
from train.objectives import Objective
from transformer.config import AttentionImplementation, RematPolicy
from transformer.models import CausalLM, MaskedLM, Seq2SeqLM
from transformer.sharding import axis_rules

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = PartitionSpec(("data", "fsdp"))


@struct.dataclass
class TrainState:
    """Everything that changes during training (the RNG of step s is derived from the seed and s)."""

    step: jax.Array
    params: Any  # boxed in nn.Partitioned: each leaf carries its logical axis names
    opt_state: Any


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; one axis size may be -1 for "the rest"."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise ValueError(
                f"{devices.size} devices cannot be split into mesh axes {dict(zip(MESH_AXES, sizes))}: the fixed "
                f"sizes need a multiple of {known} devices; lower them (mesh_data, mesh_fsdp, mesh_tensor)."
            )
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, but {devices.size} are "
            "available; make the product of data, fsdp and tensor equal the device count (or use -1)."
        )
    return Mesh(devices.reshape(sizes), MESH_AXES)


def rules_for(model, mesh: Mesh):
    """The logical axis rules of `model` on `mesh` (see `transformer.sharding.axis_rules`)."""
    return axis_rules(model.config.num_kv_heads, mesh.shape["tensor"])


def state_shardings(abstract_state, model, mesh: Mesh):
    """NamedShardings for every leaf of a (boxed) train state of `model`, from its logical axis names."""
    specs = nn.get_partition_spec(abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_for(model, mesh))


def create_state(
    model, optimizer: optax.GradientTransformation, sample_inputs: tuple, rng, mesh: Mesh, *, microbatch: int = 1,
):
    """Initialises parameters and optimizer state directly in their sharded layout, once
    `check_memory` finds that they, their gradients and the activations of `microbatch` examples
    shaped like `sample_inputs` (one row) fit in the devices' memory.

    Returns the state and its shardings (for the step functions and checkpoint restores).
    """

    def init(rng):
        params = model.init(rng, *sample_inputs)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(abstract, model, mesh)
    rows = -(-microbatch // (mesh.shape["data"] * mesh.shape["fsdp"]))  # a device's share of the microbatch
    check_memory(
        state=shard_bytes(abstract, shardings), gradients=shard_bytes(abstract.params, shardings.params),
        activations=activation_bytes(model, sample_inputs, rows, mesh.shape["tensor"]), mesh=mesh,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(model, mesh)):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def shard_bytes(abstract, shardings) -> int:
    """Bytes of one device's shard of every leaf of a (boxed) abstract tree: the largest shard
    where a dimension does not divide evenly."""

    def leaf_bytes(leaf, sharding: NamedSharding) -> int:
        shape = list(leaf.shape)
        for dim, axes in enumerate(sharding.spec):
            for axis in () if axes is None else (axes,) if isinstance(axes, str) else axes:
                shape[dim] = -(-shape[dim] // sharding.mesh.shape[axis])
        return math.prod(shape) * leaf.dtype.itemsize

    return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, nn.meta.unbox(abstract), shardings)))


def activation_bytes(model, sample_inputs: tuple, rows: int, tensor_shards: int = 1) -> int:
    """A rough estimate of the activations a device keeps for the backward pass of `rows`
    examples shaped like `sample_inputs`.

    Per layer and token: its input, plus what the remat policy keeps of the rest: "dots_no_batch"
    the weight matmuls' outputs (query, key, value, attention output, feed-forward in and out),
    "dots" also the attention's batched products (its values, and its float32 scores, heads x
    keys, which cuDNN and chunked attention never hold whole), "none" about twice that (the
    elementwise results too). Policies that recompute hold one layer's "none" while they do.
    Plus a language model's float32 logits and their gradient (the span boundary head's too).
    All but the layer inputs split over `tensor_shards`. For the presets, 0.6 to 1.1 times what XLA plans on a CPU.
    """
    config, policy = model.config, model.config.remat_policy
    compute = jnp.dtype(config.dtype).itemsize
    heads = config.num_heads * config.head_dim
    attention = heads + 2 * config.num_kv_heads * config.head_dim + config.d_model
    feed_forward = config.d_ff * (2 if config.activation.gated else 1) + config.d_model
    blockwise = (AttentionImplementation.CUDNN, AttentionImplementation.CHUNKED)
    whole_scores = config.attention_implementation not in blockwise
    source, target = sample_inputs[0].shape[-1], sample_inputs[-1].shape[-1]
    cross = config.num_encoder_layers > 0 and config.num_decoder_layers > 0
    kept = recomputed = 0  # bytes per example
    for layers, length, keys, attentions in ((config.num_encoder_layers, source, source, 1),
                                             (config.num_decoder_layers, target, target + cross * source, 1 + cross)):
        if layers:
            matmuls = (attentions * attention + feed_forward) * compute
            dots = matmuls + attentions * heads * compute + whole_scores * config.num_heads * keys * 4
            policy_kept = {RematPolicy.FULL: 0, RematPolicy.DOTS_NO_BATCH: matmuls, RematPolicy.DOTS: dots,
                           RematPolicy.NONE: 2 * dots}[policy]
            kept += length * layers * (config.d_model * compute + policy_kept / tensor_shards)
            recomputed = max(recomputed, length * 2 * dots / tensor_shards)  # one layer at a time
    language_model = isinstance(model, (CausalLM, MaskedLM, Seq2SeqLM))
    vocabulary_outputs = language_model * (1 + getattr(model, "span_boundary_objective", False))  # SBO: twice
    logits = vocabulary_outputs * target * config.vocab_size * 4 * 2 / tensor_shards
    return int(rows * (kept + (policy != RematPolicy.NONE) * recomputed + logits))


def device_memory(device) -> tuple[int, str]:
    """The bytes `device` may hold, and what they are: the backend's limit (GPUs, TPUs), else the
    host's physical memory shared by its devices of that kind (CPUs)."""
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
        return limit, f"each {device.device_kind} holds"
    shared = len(jax.local_devices(backend=device.platform))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // shared, f"the host's memory shared by its {shared} {device.platform} device(s) gives each"


def check_memory(*, state: int, gradients: int, activations: int, mesh: Mesh) -> None:
    """An error, before anything is allocated, where a device's share of the train state, its
    gradients and a microbatch's activations (bytes each) exceeds what a device of `mesh` holds."""
    memory, what = min(device_memory(device) for device in mesh.local_devices)
    needed = state + gradients + activations
    if needed > memory:
        raise ValueError(
            f"Training needs about {_gib(needed)} per device (parameters and optimizer state {_gib(state)}, "
            f"gradients {_gib(gradients)}, activations of a microbatch {_gib(activations)}: a rough estimate), but "
            f"{what} {_gib(memory)}. Lower the model's sizes (model.d_model, model.d_ff, model.num_decoder_layers, "
            "model.num_encoder_layers, model.vocab_size) or spread its state over more devices (mesh_fsdp); for the "
            "activations, lower batch_size or seq_length, raise accumulation (smaller microbatches) or recompute "
            "more (model.remat_policy=full)."
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"


def _split_microbatches(batch, accumulation: int):
    """[B, ...] -> [accumulation, B / accumulation, ...] for every leaf, microbatch i holding rows
    i, i + accumulation, ...: every device's block of the batch splits alike, so no microbatch
    moves between devices."""
    def split(x):
        return x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _accumulated_gradients(grad_fn, params, batch, rng, accumulation: int):
    """Sums of `grad_fn(params, microbatch, rng_i) -> (grads, metrics)` over the microbatches,
    microbatch i drawing its randomness from fold_in(rng, i).

    One microbatch is called directly: XLA keeps a one-trip loop around the whole gradient,
    and adds it to zero-filled gradients.
    """
    if accumulation == 1:
        return grad_fn(params, batch, jax.random.fold_in(rng, 0))

    def accumulate(carry, xs):
        grads, metrics = carry
        microbatch, index = xs
        step_grads, step_metrics = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grads, step_grads), jax.tree.map(jnp.add, metrics, step_metrics)), None

    microbatches = _split_microbatches(batch, accumulation)
    first = jax.tree.map(lambda x: x[0], microbatches)
    zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, rng)[1]))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), (microbatches, jnp.arange(accumulation)))
    return grads, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: Any = None,
    *,
    model,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    accumulation: int = 1,
    label_smoothing: float = 0.0,
    sampling_probability: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch, accumulating gradients over microbatches.

    Each loss term is summed over the whole batch and divided by its weight in the whole batch
    (see `objectives.training_loss`), so k microbatches give the same update as one k-times-larger
    batch, for every objective. Returns the new state and metric sums (loss, weight, correct,
    ...) plus the gradient norm and `finite_steps` (1). `frozen`: parameters the objective reads
    and the step never trains (a distillation's teacher), passed to it where given. A step with non-finite gradients leaves
    parameters and optimizer moments unchanged (see train.optim), and its metrics are zeros
    (`finite_steps` 0), so that a logged interval averages the steps applied.
    """
    probability = None if sampling_probability is None else sampling_probability(state.step)
    total_weights = objectives.loss_weights(batch)
    reads = {} if frozen is None else {"frozen": frozen}

    def microbatch_loss(params, microbatch, rng):
        metrics = objective(
            model, params, microbatch, rng=rng, deterministic=False, label_smoothing=label_smoothing,
            sampling_probability=probability, **reads,
        )
        return objectives.training_loss(metrics, total_weights), metrics

    grad_fn = jax.grad(microbatch_loss, has_aux=True)
    grads, metrics = _accumulated_gradients(grad_fn, state.params, batch, rng, accumulation)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # a step with non-finite gradients (skipped by the optimizer) adds nothing to the logged sums
    finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0), dict(metrics, grad_norm=optax.tree.norm(grads)))
    metrics["finite_steps"] = finite.astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, frozen=None, *, model, objective: Objective) -> dict[str, jax.Array]:
    """Metric sums of a batch without dropout or label smoothing."""
    reads = {} if frozen is None else {"frozen": frozen}
    return objective(model, params, batch, rng=jax.random.PRNGKey(0), deterministic=True, **reads)


def compile_steps(model, objective, optimizer, mesh: Mesh, shardings, *, accumulation=1, label_smoothing=0.0,
                  sampling_probability=None, frozen=None):
    """jit-compiled (train_step, eval_step) with input/output shardings; the state is donated.
    `frozen`: parameters on the mesh that both steps pass to the objective (`train_step`)."""
    batch_sharding = NamedSharding(mesh, BATCH_SPEC)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    train = jax.jit(
        functools.partial(
            train_step, model=model, objective=objective, optimizer=optimizer, accumulation=accumulation,
            label_smoothing=label_smoothing, sampling_probability=sampling_probability,
        ),
        in_shardings=(shardings, batch_sharding, replicated, frozen_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, objective=objective),
        in_shardings=(shardings.params, batch_sharding, frozen_shardings),
        out_shardings=replicated,
    )

    rules = rules_for(model, mesh)

    def run_train(state, batch, rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return train(state, batch, rng, frozen)

    def run_eval(params, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return evaluate(params, batch, frozen)

    def trace_train(state, batch, rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return train.trace(state, batch, rng, frozen)

    run_train.trace = trace_train  # ahead-of-time: .trace(...).lower().compile(), as jax.jit's
    return run_train, run_eval


def check_batch_axes(mesh: Mesh, process_count: int | None = None) -> None:
    """Each process reads its own share of every batch (`train.data.batches`), so the batch axes
    must split over the processes: data x fsdp a multiple of the process count, which keeps
    tensor parallelism within a host. Otherwise processes that hold one replicated share of the
    batch would each fill it with different rows."""
    process_count = jax.process_count() if process_count is None else process_count
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if shards % process_count:
        raise ValueError(
            f"The mesh splits each batch into data x fsdp = {shards} shard(s), which {process_count} processes "
            f"cannot share: make mesh_data x mesh_fsdp a multiple of {process_count} (mesh_tensor a divisor of "
            f"one host's {mesh.devices.size // process_count} device(s))."
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along the batch axis over ("data", "fsdp")
    (the mesh must pass `check_batch_axes`)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
