"""Masks: the worked examples in the docstrings, and how the factors combine."""

import jax
import jax.numpy as jnp
import numpy as np

from transformer.masks import (
    AttentionMask,
    causal_mask,
    cross_attention_mask,
    padding_mask,
    segment_mask,
    self_attention_mask,
)


def row(*values):
    """A [1, L] int32 array: one batch row."""
    return jnp.array([values], jnp.int32)


def test_causal_mask_docstring_example():
    """Positions 0..2: a query sees its own and earlier positions (lower triangle)."""
    mask = causal_mask(row(0, 1, 2), row(0, 1, 2))
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_causal_mask_uses_positions_not_indices():
    """Causality follows the positions given (a query at position 2 over keys at 0..3)."""
    mask = causal_mask(row(2), row(0, 1, 2, 3))
    np.testing.assert_array_equal(mask[0, 0], [[1, 1, 1, 0]])


def test_padding_mask_docstring_example():
    """Query ids [1, 1, 0], key ids [1, 0]: padding on either side blocks attention."""
    mask = padding_mask(row(1, 1, 0), row(1, 0))
    assert mask.shape == (1, 1, 3, 2) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], [[1, 0], [1, 0], [0, 0]])


def test_segment_mask_docstring_example():
    """Ids [1, 1, 2]: tokens attend only within their packed segment (block diagonal)."""
    mask = segment_mask(row(1, 1, 2), row(1, 1, 2))
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_masks_are_per_batch_row():
    """Each batch row gets its own mask from its own ids."""
    ids = jnp.array([[1, 1, 0], [1, 2, 2]], jnp.int32)
    mask = segment_mask(ids, ids)
    assert mask.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(mask[1, 0], [[1, 0, 0], [0, 1, 1], [0, 1, 1]])


def packed_factors():
    """Two rows: two packed documents plus padding, and one document padded at the end."""
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]], jnp.int32)
    positions = jnp.array([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]], jnp.int32)
    return segment_ids, positions


def test_attention_mask_dense_is_and_of_factors():
    """AttentionMask.dense() = padding & segment (& causal when causal=True)."""
    segment_ids, positions = packed_factors()
    expected = padding_mask(segment_ids, segment_ids) & segment_mask(segment_ids, segment_ids)
    encoder = AttentionMask(segment_ids, segment_ids, positions, positions, causal=False)
    np.testing.assert_array_equal(encoder.dense(), expected)
    decoder = AttentionMask(segment_ids, segment_ids, positions, positions, causal=True)
    np.testing.assert_array_equal(decoder.dense(), expected & causal_mask(positions, positions))


def test_packed_causal_mask_literal():
    """Row 0 of the packed causal mask, written out: two causal blocks, padding row/column empty."""
    segment_ids, positions = packed_factors()
    mask = self_attention_mask(segment_ids, positions, causal=True).dense()
    np.testing.assert_array_equal(
        mask[0, 0],
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
    )


def test_self_attention_mask_uses_same_factors_both_sides():
    """self_attention_mask passes its ids/positions to both sides and keeps `causal`."""
    segment_ids, positions = packed_factors()
    for causal in (False, True):
        mask = self_attention_mask(segment_ids, positions, causal=causal)
        assert mask.causal is causal
        expected = AttentionMask(segment_ids, segment_ids, positions, positions, causal=causal).dense()
        np.testing.assert_array_equal(mask.dense(), expected)
    encoder = self_attention_mask(segment_ids, positions, causal=False).dense()
    decoder = self_attention_mask(segment_ids, positions, causal=True).dense()
    assert not np.array_equal(encoder, decoder)
    assert np.all(encoder >= decoder)


def test_cross_attention_mask_is_padding_only_never_causal():
    """Decoder queries see every non-padding encoder key, whatever their order."""
    q_ids = jnp.array([[1, 1, 1, 0]], jnp.int32)
    kv_ids = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.int32)
    mask = cross_attention_mask(q_ids, kv_ids)
    assert not mask.causal
    dense = mask.dense()
    assert dense.shape == (1, 1, 4, 6)
    np.testing.assert_array_equal(dense, padding_mask(q_ids, kv_ids))
    np.testing.assert_array_equal(dense[0, 0, 0], [1, 1, 1, 1, 1, 0])  # the first query sees later keys


def test_attention_mask_is_a_pytree_with_static_causal():
    """AttentionMask passes through jit; `causal` is static metadata, not a traced leaf."""
    segment_ids, positions = packed_factors()
    mask = self_attention_mask(segment_ids, positions, causal=True)
    assert len(jax.tree_util.tree_leaves(mask)) == 4
    dense = jax.jit(lambda m: m.dense())(mask)
    np.testing.assert_array_equal(dense, mask.dense())
