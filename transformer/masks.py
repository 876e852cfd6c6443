"""Attention masks: small pure functions, and a factored mask every implementation can slice.

Polarity: True = the query may attend to the key. Dense masks have shape [B, 1, T, S]
(batch, a head axis that broadcasts, query length, key length) and are combined with `&`.

Every mask in the library is built from four per-token arrays: query and key positions,
and query and key segment ids (0 = padding, equal ids = same document). `AttentionMask`
keeps those factors instead of the [T, S] matrix, so the chunked implementation can
build one block at a time and use memory linear in the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """A query may attend to keys at its own position or earlier. [B, T], [B, S] -> [B, 1, T, S].

    With positions 0..2 on both sides:

        [[1, 0, 0],
         [1, 1, 0],
         [1, 1, 1]]
    """
    return (q_positions[:, :, None] >= kv_positions[:, None, :])[:, None]


def padding_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Neither the query nor the key may be padding (segment id 0). [B, T], [B, S] -> [B, 1, T, S].

    With query ids [1, 1, 0] and key ids [1, 0]:

        [[1, 0],
         [1, 0],
         [0, 0]]
    """
    return ((q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0))[:, None]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Tokens attend only within their own packed segment. [B, T], [B, S] -> [B, 1, T, S].

    With ids [1, 1, 2] on both sides:

        [[1, 1, 0],
         [1, 1, 0],
         [0, 0, 1]]
    """
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


@struct.dataclass
class AttentionMask:
    """The factors of an attention mask: padding & same segment (& causal).

    q_segment_ids:  [B, T] int, 0 = padding.
    kv_segment_ids: [B, S] int, 0 = padding (or an empty cache slot).
    q_positions:    [B, T] int, used only when causal.
    kv_positions:   [B, S] int, used only when causal.
    causal:         static; True for decoder self-attention.
    """

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array
    causal: bool = struct.field(pytree_node=False, default=False)

    def dense(self) -> jax.Array:
        """The boolean mask [B, 1, T, S]."""
        mask = padding_mask(self.q_segment_ids, self.kv_segment_ids)
        mask &= segment_mask(self.q_segment_ids, self.kv_segment_ids)
        if self.causal:
            mask &= causal_mask(self.q_positions, self.kv_positions)
        return mask


def self_attention_mask(segment_ids: jax.Array, positions: jax.Array, *, causal: bool) -> AttentionMask:
    """Mask for self-attention over one sequence (encoder: causal=False; decoder: causal=True)."""
    return AttentionMask(segment_ids, segment_ids, positions, positions, causal=causal)


def cross_attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> AttentionMask:
    """Mask for decoder queries over encoder keys: padding only, never causal.

    Segment ids of decoder and encoder must match for packed pairs; for one pair per row
    both sides are 1 on real tokens and 0 on padding.
    """
    q_positions = jnp.zeros_like(q_segment_ids)
    kv_positions = jnp.zeros_like(kv_segment_ids)
    return AttentionMask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=False)
