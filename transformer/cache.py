"""Decoding caches as explicit pytrees: passed into every call and returned updated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from transformer.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer: k, v [B, S, K, H] (a leading L axis when stacked).

    Self-attention caches are preallocated and filled slot by slot: every call appends its
    tokens (padding included) at the same slot index in every row. Cross-attention caches
    hold the encoder's keys and values, computed once.
    """

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """Stores new k, v [B, T, K, H] in slots start .. start + T - 1 of every row."""
        index = (0, start, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), index),
            jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), index),
        )


@struct.dataclass
class DecoderCache:
    """Everything a decoder stack needs to extend its sequences a few tokens at a time.

    self_attention: stacked KVCache, k and v [L, B, S, K, H].
    segment_ids: [B, S] per slot; 0 = empty or padding (never attended to).
    positions: [B, S] per slot, the token positions (for causality and position encodings).
    end: [] int32, slots written so far (the same in every row).
    cross_attention: stacked encoder K/V [L, B, S_source, K, H], filled by the first call
        that passes the encoder output; None for decoder-only models.
    source_segment_ids: [B, S_source] encoder segment ids (0 = padding).
    """

    self_attention: KVCache
    segment_ids: jax.Array
    positions: jax.Array
    end: jax.Array
    cross_attention: KVCache | None = None
    source_segment_ids: jax.Array | None = None

    @property
    def max_length(self) -> int:
        """Slots per row."""
        return self.segment_ids.shape[1]

    @property
    def lengths(self) -> jax.Array:
        """[B] real (non-padding) tokens in each row."""
        return (self.segment_ids != 0).sum(axis=-1).astype(jnp.int32)

    def select_rows(self, rows: jax.Array) -> DecoderCache:
        """The cache of rows `rows` [B'] (e.g. each row repeated per beam, or beams reordered)."""

        def per_layer(kv):  # [L, B, ...]
            return None if kv is None else jax.tree.map(lambda x: jnp.take(x, rows, axis=1), kv)

        def take(x):  # [B, ...]
            return None if x is None else jnp.take(x, rows, axis=0)

        return self.replace(
            self_attention=per_layer(self.self_attention),
            segment_ids=take(self.segment_ids),
            positions=take(self.positions),
            cross_attention=per_layer(self.cross_attention),
            source_segment_ids=take(self.source_segment_ids),
        )

    def append(self, segment_ids: jax.Array, positions: jax.Array) -> DecoderCache:
        """Records the segment ids and positions [B, T] of T new tokens written at `end`."""
        index = (0, self.end)
        return self.replace(
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), index),
            positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), index),
            end=self.end + segment_ids.shape[1],
        )


def init_cache(config: ModelConfig, batch_size: int, max_length: int | None = None) -> DecoderCache:
    """An empty cache for `config`'s decoder with `max_length` slots per row.

    Every call writes all its tokens, padding included, so the slots must cover the padded
    prompt plus every token to be generated.
    """
    if config.num_decoder_layers == 0:
        raise ValueError("This config has no decoder (num_decoder_layers=0); encoders need no cache.")
    max_length = config.max_length if max_length is None else max_length
    if max_length > config.max_length:
        raise ValueError(
            f"A cache of {max_length} tokens exceeds the model's context of {config.max_length} "
            "(ModelConfig.max_length)."
        )
    shape = (config.num_decoder_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    slots = jnp.zeros((batch_size, max_length), jnp.int32)
    return DecoderCache(KVCache(zeros, zeros), slots, slots, jnp.zeros((), jnp.int32))
