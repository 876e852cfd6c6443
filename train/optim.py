"""The optimizer: AdamW with gradient clipping, learning-rate schedules, and skipping of
non-finite updates."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import optax

from transformer.layers import is_weight_matrix


class Schedule(enum.StrEnum):
    INVERSE_SQRT = "inverse_sqrt"  # the 2017 paper: linear warmup, then decay with 1/sqrt(step)
    COSINE = "cosine"  # linear warmup, then cosine decay to 10% of the peak
    CONSTANT = "constant"  # linear warmup, then constant


def learning_rate_schedule(schedule: Schedule | str, peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The learning rate of each update, as optax calls it: with the number of updates already
    applied, so update n (counted from 1) gets the schedule's value at step n.

    Warmup is linear: update 1 gets peak / warmup_steps (not 0) and update warmup_steps the
    peak. inverse_sqrt is the paper's d_model**-0.5 * min(step**-0.5, step * warmup**-1.5) with
    its constant folded into `peak`: for transformer-base (d_model 512, warmup 4000) the
    paper's peak is 512**-0.5 * 4000**-0.5 = 7.0e-4. cosine ends at 10% of the peak on the
    last update (update total_steps).
    """
    schedule = Schedule(schedule)
    warmup_steps = max(warmup_steps, 1)
    if schedule == Schedule.INVERSE_SQRT:

        def of_step(step):
            step = jnp.asarray(step, jnp.float32)
            return peak * jnp.minimum(step / warmup_steps, jnp.sqrt(warmup_steps / step))

    elif schedule == Schedule.COSINE:
        of_step = optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.1 * peak
        )
    else:
        of_step = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)], [warmup_steps]
        )
    return lambda count: of_step(count + 1)


def decay_mask(params):
    """A tree of booleans like `params` (boxed or not): True where weight decay applies, on the
    weight matrices (projections and embeddings) only, never on biases, norm scales or T5's
    relative-position bias, whether layers are scanned or not (`is_weight_matrix`)."""

    def mask(key_path, _):
        return is_weight_matrix(key.key for key in key_path if isinstance(key, jax.tree_util.DictKey))

    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(
    learning_rate: optax.Schedule,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; a step whose gradients are not finite changes nothing.

    The wrapper counts non-finite steps (see `nonfinite_counts`); it never applies one, however
    many come in a row, so the parameters stay finite and the training loop decides when to stop.
    """
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=jnp.iinfo(jnp.int32).max)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) non-finite steps recorded by `make_optimizer`'s wrapper."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def updates_applied(opt_state) -> jax.Array:
    """How many updates `make_optimizer`'s optimizer has applied: the count its learning-rate
    schedule reads, which a skipped non-finite step does not advance."""
    (count,) = [count for path, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
                if path[-1].tuple_name == "ScaleByScheduleState"]
    return count
