"""Position encodings: sinusoidal against the paper's formula, rotary invariants, T5 buckets."""

import jax.numpy as jnp
import numpy as np
import pytest

from transformer.positions import (
    RelativeBias,
    apply_rotary,
    relative_position_bucket,
    segment_positions,
    sinusoidal_embedding,
)


def test_segment_positions():
    """Positions restart in every packed segment, and left padding does not shift the text."""
    positions = segment_positions(jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]]))
    assert positions.dtype == jnp.int32
    np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]])


def test_sinusoidal_matches_paper_formula():
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)), computed in numpy."""
    dim = 16
    positions = np.array([[0, 1, 2, 7, 50, 511]])
    expected = np.zeros((1, positions.shape[1], dim))
    for t, p in enumerate(positions[0]):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            expected[0, t, 2 * i] = np.sin(angle)
            expected[0, t, 2 * i + 1] = np.cos(angle)
    actual = sinusoidal_embedding(jnp.asarray(positions), dim)
    assert actual.shape == (1, 6, dim) and actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, atol=2e-4)  # float32 sin of angles up to 511 rad


def rotary_inputs(seed=0, shape=(2, 5, 3, 8)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_rotary_matches_the_rotation_formula():
    """Each pair (x[i], x[i + H/2]) turns by the angle p / theta^(2i/H), computed in numpy:
    the halves layout of GPT-NeoX and Llama checkpoints, so lengths are kept."""
    x = rotary_inputs()
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 3, 1000, 12]])
    half = x.shape[-1] // 2
    angles = positions[:, :, None, None] / 500.0 ** (2 * np.arange(half) / x.shape[-1])  # [B, T, 1, H/2]
    first, second = np.asarray(x[..., :half], np.float64), np.asarray(x[..., half:], np.float64)
    expected = np.concatenate(
        [first * np.cos(angles) - second * np.sin(angles), second * np.cos(angles) + first * np.sin(angles)], -1
    )
    rotated = apply_rotary(x, jnp.asarray(positions), theta=500.0)
    assert rotated.dtype == jnp.float32
    np.testing.assert_allclose(rotated, expected, atol=2e-4)  # float32 sin of angles up to 1000 rad
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rotary_position_zero_is_identity():
    """At position 0 every angle is 0, so the vector is unchanged."""
    x = rotary_inputs()
    np.testing.assert_allclose(apply_rotary(x, jnp.zeros((2, 5), jnp.int32)), x, atol=1e-7)


@pytest.mark.parametrize("offset", [1, 17, 300])
def test_rotary_dot_product_depends_only_on_relative_position(offset):
    """<R(m) q, R(n) k> = <R(m + c) q, R(n + c) k>: shifting both positions keeps every score."""
    q = rotary_inputs(1, (1, 6, 2, 16))
    k = rotary_inputs(2, (1, 6, 2, 16))
    q_positions = jnp.array([[0, 1, 2, 3, 9, 20]])
    k_positions = jnp.array([[5, 0, 2, 11, 4, 1]])

    def scores(shift):
        rq = apply_rotary(q, q_positions + shift)
        rk = apply_rotary(k, k_positions + shift)
        return jnp.einsum("btnh,bsnh->bnts", rq, rk)

    np.testing.assert_allclose(scores(offset), scores(0), atol=2e-4)
    # Sanity: the scores do depend on the positions (shifting only the keys changes them).
    unshifted = jnp.einsum("btnh,bsnh->bnts", apply_rotary(q, q_positions), apply_rotary(k, k_positions + 1))
    assert not np.allclose(unshifted, scores(0), atol=1e-2)


def test_rotary_in_bfloat16_rounds_the_float32_rotation():
    """bfloat16 inputs are rotated in float32 and come back in bfloat16: the float32 result
    rounded once, not a rotation computed in bfloat16 (which loses the angle at large positions)."""
    x = rotary_inputs().astype(jnp.bfloat16)
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 100, 3, 1000, 12]])
    rotated = apply_rotary(x, positions)
    assert rotated.dtype == jnp.bfloat16
    expected = apply_rotary(x.astype(jnp.float32), positions).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(rotated, np.float32), np.asarray(expected, np.float32))


# relative = key_position - query_position; num_buckets=32, max_distance=128 (T5 defaults).
BIDIRECTIONAL = {0: 0, -1: 1, 1: 17, -8: 8, -200: 15, 200: 31, 8: 24, -7: 7}
UNIDIRECTIONAL = {0: 0, 5: 0, -5: 5, -15: 15, -16: 16, -1000: 31, -128: 31}


@pytest.mark.parametrize("bidirectional, expected", [(True, BIDIRECTIONAL), (False, UNIDIRECTIONAL)])
def test_relative_position_bucket_literals(bidirectional, expected):
    """Hand-computed buckets: exact for small distances, log-spaced beyond, clipped at the last."""
    relative = jnp.array(list(expected), jnp.int32)
    buckets = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(buckets, list(expected.values()))


def test_relative_position_bucket_monotone_and_in_range():
    """Unidirectional: the bucket of -d is non-decreasing in d and stays in [0, num_buckets)."""
    distances = jnp.arange(0, 2000, dtype=jnp.int32)
    buckets = np.asarray(relative_position_bucket(-distances, bidirectional=False))
    assert np.all(np.diff(buckets) >= 0)
    assert buckets.min() == 0 and buckets.max() == 31
    bidirectional = np.asarray(relative_position_bucket(jnp.arange(-2000, 2000), bidirectional=True))
    assert bidirectional.min() == 0 and bidirectional.max() == 31


def test_relative_bias_dense_reads_each_pairs_bucket_from_the_table():
    """RelativeBias.dense()[b, n, t, s] = table[bucket(kv_positions[s] - q_positions[t]), n]."""
    table = 10.0 * jnp.arange(32)[:, None] + jnp.arange(2)  # [32 buckets, N=2]: 10 * bucket + head
    bias = RelativeBias(table, jnp.array([[0, 3]]), jnp.array([[0, 1, 3, 40]]), bidirectional=True, max_distance=128)
    buckets = np.array([[0, 17, 19, 28], [3, 2, 0, 28]])  # [T, S]: later keys from bucket 16 on
    dense = bias.dense()
    assert dense.shape == (1, 2, 2, 4) and dense.dtype == jnp.float32
    np.testing.assert_array_equal(dense[0], np.stack([10.0 * buckets, 10.0 * buckets + 1]))
