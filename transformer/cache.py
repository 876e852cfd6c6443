"""Decoding caches as explicit pytrees: passed into every call and returned updated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from transformer.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer: k, v [B, S, K, H] (a leading L axis when stacked).

    Self-attention caches are preallocated to the longest sequence and filled slot by slot,
    a token's keys and values living in the slot of its position. Cross-attention caches
    hold the encoder's keys and values, computed once.
    """

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """Stores new k, v [B, T, K, H] in slots start[b] .. start[b] + T - 1 of each row.

        The caller guarantees start + T <= S (generation checks the length limit first).
        """

        def write_row(cache_row, new_row, index):  # [S, K, H], [T, K, H], []
            return jax.lax.dynamic_update_slice(cache_row, new_row.astype(cache_row.dtype), (index, 0, 0))

        write_rows = jax.vmap(write_row)
        return KVCache(write_rows(self.k, k, start), write_rows(self.v, v, start))


@struct.dataclass
class DecoderCache:
    """Everything a decoder stack needs to extend its sequences one step at a time.

    self_attention: stacked KVCache, k and v [L, B, max_length, K, H].
    lengths: [B] int32, tokens already in the cache for each row.
    cross_attention: stacked encoder K/V [L, B, S, K, H], filled by the first call that
        passes the encoder output; None for decoder-only models.
    source_segment_ids: [B, S] encoder segment ids (0 = padding) for the cross-attention mask.
    """

    self_attention: KVCache
    lengths: jax.Array
    cross_attention: KVCache | None = None
    source_segment_ids: jax.Array | None = None

    @property
    def max_length(self) -> int:
        return self.self_attention.k.shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_length: int | None = None) -> DecoderCache:
    """An empty cache for `config`'s decoder, holding up to `max_length` tokens per row."""
    if config.num_decoder_layers == 0:
        raise ValueError("This config has no decoder (num_decoder_layers=0); encoders need no cache.")
    max_length = config.max_length if max_length is None else max_length
    if max_length > config.max_length:
        raise ValueError(
            f"A cache of {max_length} tokens exceeds the model's context of {config.max_length} "
            "(ModelConfig.max_length)."
        )
    shape = (config.num_decoder_layers, batch_size, max_length, config.kv_heads, config.dim_per_head)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    return DecoderCache(KVCache(zeros, zeros), jnp.zeros((batch_size,), jnp.int32))
