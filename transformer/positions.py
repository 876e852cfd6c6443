"""Position encodings as pure functions: sinusoidal, rotary, and T5 relative buckets and bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position within its run of equal segment ids. [B, T] -> [B, T] int32.

    segment ids [[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]] -> [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]]:
    packed documents restart at 0, and left padding does not shift the text's positions.
    """
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def sinusoidal_embedding(positions: jax.Array, dim: int, max_timescale: float = 10_000.0) -> jax.Array:
    """The 2017 paper's encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same).

    [B, T] int -> [B, T, dim] float32.
    """
    inv_timescales = max_timescale ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
    angles = positions[..., None].astype(jnp.float32) * inv_timescales  # [B, T, dim/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (RoFormer), rotating the two halves of each head.

    x: [B, T, N, H]; positions: [B, T]. The dot product of a rotated query at position m
    with a rotated key at position n depends on m - n only. Computed in float32.
    """
    head_dim = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
    """T5's bucketing of key_position - query_position into `num_buckets` ids.

    Small distances get a bucket each; larger ones share logarithmically wider buckets up to
    `max_distance`, beyond which all distances share the last bucket. Bidirectional (encoder)
    spends half the buckets on each direction; unidirectional (decoder) maps every future key
    to bucket 0, which the causal mask hides anyway.
    """
    bucket = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


@struct.dataclass
class RelativeBias:
    """T5's relative-position bias in factored form: the learned table and the token positions.

    Like `AttentionMask`, it keeps per-token factors instead of the [B, N, T, S] matrix, so
    the chunked attention builds the bias one block at a time, in memory linear in length.

    table:         [num_buckets, N] learned bias per relative-position bucket and head.
    q_positions:   [B, T] int.
    kv_positions:  [B, S] int.
    bidirectional: static; True for encoder self-attention (see `relative_position_bucket`).
    max_distance:  static; distances beyond it share the last bucket.
    """

    table: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array
    bidirectional: bool = struct.field(pytree_node=False)
    max_distance: int = struct.field(pytree_node=False)

    def dense(self) -> jax.Array:
        """The bias [B, N, T, S] float32."""
        relative = self.kv_positions[:, None, :] - self.q_positions[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.table.shape[0],
            max_distance=self.max_distance,
        )
        return jnp.moveaxis(self.table[buckets], -1, 1).astype(jnp.float32)  # [B, N, T, S]
