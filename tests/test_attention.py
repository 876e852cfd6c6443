"""dot_product_attention: every implementation agrees with the plain "reference" one.

Shapes: q [B, T, N, H], k and v [B, S, K, H]. Rows whose query is padding (no key allowed)
are documented as unspecified, so comparisons look only at rows of real queries.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.attention import attention_weights, dot_product_attention
from transformer.masks import AttentionMask, cross_attention_mask, self_attention_mask
from transformer.positions import RelativeBias

ATOL = 1e-5  # float32: online softmax over blocks vs one softmax, outputs of size ~1
CHUNK = 8  # small blocks, so the test lengths span several blocks and a padded last one
IMPLEMENTATIONS = ["xla", "chunked"]


_jitted_attention = jax.jit(
    dot_product_attention, static_argnames=("implementation", "scale", "dropout_rate", "chunk_size")
)


def attend(q, k, v, mask=None, bias=None, *, implementation, **kwargs):
    """dot_product_attention, jitted (one compilation instead of many eager ops), small chunks."""
    if implementation == "chunked":
        kwargs.setdefault("chunk_size", CHUNK)
    return _jitted_attention(q, k, v, mask, bias, implementation=implementation, **kwargs)


def normal(seed, shape, scale=1.0):
    """Standard normal float32 from numpy (no per-shape compilation of a JAX random kernel)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def bernoulli(seed, p, shape):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def random_qkv(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim=8):
    q = normal((seed, 0), (batch, q_len, num_heads, head_dim))
    k = normal((seed, 1), (batch, kv_len, num_kv_heads, head_dim))
    v = normal((seed, 2), (batch, kv_len, num_kv_heads, head_dim))
    return q, k, v


def packed(lengths_per_row, total):
    """Segment ids and per-segment positions for packed rows, padded with id 0 to `total`."""
    segment_ids, positions = [], []
    for lengths in lengths_per_row:
        ids = [i + 1 for i, n in enumerate(lengths) for _ in range(n)]
        pos = [p for n in lengths for p in range(n)]
        pad = total - len(ids)
        segment_ids.append(ids + [0] * pad)
        positions.append(pos + [0] * pad)
    return jnp.array(segment_ids, jnp.int32), jnp.array(positions, jnp.int32)


def ones_mask(batch, length, *, causal):
    return self_attention_mask(
        jnp.ones((batch, length), jnp.int32), jnp.broadcast_to(jnp.arange(length), (batch, length)), causal=causal
    )


# Each case: (q, k, v, mask, bias, valid query rows [B, T] or None for all, extra kwargs).
def case_no_mask():
    return (*random_qkv(0, 2, 19, 19, 4, 4), None, None, None, {})


def case_causal():
    return (*random_qkv(1, 2, 19, 19, 4, 4), ones_mask(2, 19, causal=True), None, None, {})


def case_packed_causal():
    segment_ids, positions = packed([[7, 9], [18]], 21)  # two documents + 5 pads; one + 3 pads
    mask = self_attention_mask(segment_ids, positions, causal=True)
    return (*random_qkv(2, 2, 21, 21, 4, 4), mask, None, segment_ids != 0, {})


def case_packed_causal_dense():
    q, k, v, mask, bias, valid, kwargs = case_packed_causal()
    return q, k, v, mask.dense(), bias, valid, kwargs


def case_packed_bidirectional():
    segment_ids, positions = packed([[3, 10, 4], [9]], 21)
    mask = self_attention_mask(segment_ids, positions, causal=False)
    return (*random_qkv(3, 2, 21, 21, 4, 4), mask, None, segment_ids != 0, {})


def case_bias():
    q, k, v = random_qkv(4, 2, 17, 17, 4, 4)
    bias = normal(40, (1, 4, 17, 17), scale=3.0)  # [1, N, T, S]
    return q, k, v, ones_mask(2, 17, causal=True), bias, None, {}


def case_bias_no_mask():
    q, k, v = random_qkv(5, 2, 10, 13, 4, 4)
    bias = normal(50, (1, 4, 10, 13), scale=3.0)
    return q, k, v, None, bias, None, {}


def case_per_head_dense_mask():
    q, k, v = random_qkv(6, 2, 12, 12, 4, 2)
    mask = bernoulli(60, 0.5, (2, 4, 12, 12)) | jnp.eye(12, dtype=bool)  # [B, N, T, S]
    return q, k, v, mask, None, None, {}


def case_key_padding_dense():
    """A dense [B, 1, 1, S] key-padding mask, broadcast over heads and queries."""
    kv_ids, _ = packed([[11], [7]], 14)
    return (*random_qkv(14, 2, 9, 14, 4, 2), (kv_ids != 0)[:, None, None, :], None, None, {})


def case_broadcast_biases():
    """Biases [B, 1, T, S] and [1, 1, 1, S] (broadcast over heads, and over queries too)."""
    q, k, v = random_qkv(15, 2, 11, 11, 4, 4)
    bias = normal(150, (2, 1, 11, 11), scale=2.0) + normal(151, (1, 1, 1, 11), scale=2.0)
    return q, k, v, ones_mask(2, 11, causal=True), bias, None, {}


def gqa_case(num_kv_heads):
    def case():
        segment_ids, positions = packed([[5, 11], [14]], 18)
        mask = self_attention_mask(segment_ids, positions, causal=True)
        return (*random_qkv(7, 2, 18, 18, 4, num_kv_heads), mask, None, segment_ids != 0, {})

    return case


def case_cross_attention():
    q_ids, _ = packed([[9], [6]], 11)
    kv_ids, _ = packed([[23], [15]], 23)
    return (*random_qkv(8, 2, 11, 23, 4, 2), cross_attention_mask(q_ids, kv_ids), None, q_ids != 0, {})


def case_cross_no_mask():
    return (*random_qkv(9, 2, 5, 19, 4, 1), None, None, None, {})


def case_odd_lengths_dense():
    q, k, v = random_qkv(10, 1, 13, 29, 4, 4)
    mask = bernoulli(100, 0.7, (1, 1, 13, 29)).at[..., 0].set(True)
    return q, k, v, mask, None, None, {}


def case_single_query_over_cache():
    """T = 1: one decode step at position 19 over 24 cache slots, the last 4 of them empty."""
    kv_ids = jnp.array([[1] * 20 + [0] * 4, [1] * 20 + [0] * 4], jnp.int32)
    kv_positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    mask = AttentionMask(jnp.ones((2, 1), jnp.int32), kv_ids, jnp.full((2, 1), 19), kv_positions, causal=True)
    return (*random_qkv(11, 2, 1, 24, 4, 2), mask, None, None, {})


def case_single_query_no_mask():
    return (*random_qkv(12, 2, 1, 1, 4, 4), None, None, None, {})


def case_relative_bias_over_cache():
    """T5 bias in factored form: 7 decode queries at positions 17..23 over 24 cache slots, causal.

    8 buckets up to distance 16, so the 24 distances cover exact, logarithmic and saturated buckets.
    """
    q_positions = jnp.broadcast_to(jnp.arange(17, 24), (2, 7))
    kv_positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    ones = functools.partial(jnp.ones, dtype=jnp.int32)
    mask = AttentionMask(ones((2, 7)), ones((2, 24)), q_positions, kv_positions, causal=True)  # a full cache
    bias = RelativeBias(normal(170, (8, 4), scale=2.0), q_positions, kv_positions, bidirectional=False, max_distance=16)
    return (*random_qkv(17, 2, 7, 24, 4, 2), mask, bias, None, {})


def case_explicit_scale():
    return (*random_qkv(13, 2, 9, 9, 4, 4), ones_mask(2, 9, causal=False), None, None, {"scale": 0.7})


CASES = {
    "no_mask": case_no_mask,
    "causal": case_causal,
    "packed_causal": case_packed_causal,
    "packed_causal_dense": case_packed_causal_dense,
    "packed_bidirectional": case_packed_bidirectional,
    "bias": case_bias,
    "bias_no_mask": case_bias_no_mask,
    "per_head_dense_mask": case_per_head_dense_mask,
    "key_padding_dense": case_key_padding_dense,
    "broadcast_biases": case_broadcast_biases,
    "gqa_K=N": gqa_case(4),
    "gqa_K=N/2": gqa_case(2),
    "gqa_K=1": gqa_case(1),
    "cross_attention": case_cross_attention,
    "cross_no_mask": case_cross_no_mask,
    "odd_lengths_dense": case_odd_lengths_dense,
    "single_query_over_cache": case_single_query_over_cache,
    "single_query_no_mask": case_single_query_no_mask,
    "relative_bias_over_cache": case_relative_bias_over_cache,
    "explicit_scale": case_explicit_scale,
}


@functools.cache
def reference_output(case):
    q, k, v, mask, bias, _, kwargs = CASES[case]()
    return attend(q, k, v, mask, bias, implementation="reference", **kwargs)


def assert_rows_close(actual, expected, valid, atol=ATOL):
    """Compare [B, T, ...] arrays on the valid query rows only."""
    assert actual.shape == expected.shape
    if valid is not None:
        actual, expected = actual[np.asarray(valid)], expected[np.asarray(valid)]
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(implementation, case):
    """Each implementation gives the reference output (float32, atol 1e-5) on every real query."""
    q, k, v, mask, bias, valid, kwargs = CASES[case]()
    expected = reference_output(case)
    actual = attend(q, k, v, mask, bias, implementation=implementation, **kwargs)
    assert actual.dtype == q.dtype
    assert_rows_close(actual, expected, valid)


@pytest.mark.parametrize("operand", ["mask", "bias"])
def test_chunked_accepts_low_rank_broadcastable_operands(operand):
    """Docstring: mask and bias need only be broadcastable to [B, N, T, S]; a [T, S] one is."""
    q, k, v = random_qkv(16, 2, 10, 12, 4, 4)
    mask = bernoulli(160, 0.6, (10, 12)).at[:, 0].set(True) if operand == "mask" else None
    bias = normal(161, (10, 12)) if operand == "bias" else None
    expected = attend(q, k, v, mask, bias, implementation="reference")
    assert_rows_close(attend(q, k, v, mask, bias, implementation="chunked"), expected, None)


def test_reference_matches_naive_softmax():
    """The reference itself: softmax(q k^T / sqrt(H) + bias, masked) v, written out per head."""
    q, k, v, mask, _, valid, _ = case_packed_causal()
    bias = normal(1, (1, 4, 21, 21))
    out = dot_product_attention(q, k, v, mask, bias, implementation="reference")
    qn, kn, vn, dense, bn = map(np.asarray, (q, k, v, mask.dense(), bias))
    expected = np.zeros_like(qn)
    for b in range(2):
        for n in range(4):
            for t in range(21):
                logits = kn[b, :, n] @ qn[b, t, n] / np.sqrt(8) + bn[0, n, t]
                allowed = dense[b, 0, t]
                if allowed.any():
                    p = np.where(allowed, np.exp(logits - logits[allowed].max()), 0.0)
                    expected[b, t, n] = (p / p.sum()) @ vn[b, :, n]
    assert_rows_close(out, expected, valid)


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_grouped_query_heads_share_kv(implementation, num_kv_heads):
    """Query head n uses key/value head n // (N // K): same as repeating each kv head N // K times."""
    q, k, v, mask, _, valid, _ = gqa_case(num_kv_heads)()
    groups = 4 // num_kv_heads
    grouped = attend(q, k, v, mask, implementation=implementation)
    repeated = attend(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), mask, implementation="reference")
    assert_rows_close(grouped, repeated, valid)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_chunked_independent_of_chunk_size(chunk_size):
    """The block size changes only the schedule, not the result (including blocks > length)."""
    q, k, v, mask, _, valid, _ = case_packed_causal()
    expected = attend(q, k, v, mask, implementation="reference")
    actual = attend(q, k, v, mask, implementation="chunked", chunk_size=chunk_size)
    assert_rows_close(actual, expected, valid)


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size"))
def masked_loss_grad(q, k, v, mask, bias, valid, cotangent, *, implementation, chunk_size=CHUNK):
    """Gradient w.r.t. q, k, v of sum(output * cotangent) over real query rows [B, T]."""

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, bias, implementation=implementation, chunk_size=chunk_size)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * cotangent, 0.0))

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@functools.cache
def gradient_inputs(case):
    q, k, v, mask, bias, valid, _ = CASES[case]()
    valid = jnp.ones(q.shape[:2], bool) if valid is None else valid
    return q, k, v, mask, bias, valid, normal(99, q.shape)


@functools.cache
def reference_gradient(case):
    return masked_loss_grad(*gradient_inputs(case), implementation="reference")


@pytest.mark.parametrize(
    "implementation, case",
    [
        ("chunked", "packed_causal"),
        ("chunked", "bias"),
        ("chunked", "gqa_K=N/2"),
        ("chunked", "cross_attention"),
        ("xla", "packed_causal"),
    ],
)
def test_gradients_match_reference(implementation, case):
    """d(loss)/d(q, k, v) equal the reference's, with the loss taken over real query rows only."""
    actual = masked_loss_grad(*gradient_inputs(case), implementation=implementation)
    for a, expected in zip(actual, reference_gradient(case)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, expected, atol=1e-4, rtol=0)


@functools.partial(jax.jit, static_argnames=("bidirectional", "implementation", "dense_bias", "chunk_size"))
def relative_bias_loss_grad(
    q, k, v, table, mask, positions, cotangent, *, bidirectional, implementation, dense_bias, chunk_size=CHUNK
):
    """Output, and gradient w.r.t. q, k, v and the bias table of sum(output * cotangent).

    The bias is a `RelativeBias` over `positions` [B, T] on both sides, passed as it is or,
    with `dense_bias`, as its dense [B, N, T, S] array.
    """

    def loss(q, k, v, table):
        bias = RelativeBias(table, positions, positions, bidirectional=bidirectional, max_distance=10)
        bias = bias.dense() if dense_bias else bias
        out = dot_product_attention(q, k, v, mask, bias, implementation=implementation, chunk_size=chunk_size)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
    return out, grads


@functools.cache
def relative_bias_inputs(bidirectional):
    """Length 13, positions offset per row; 8 buckets up to distance 10 (all kinds of bucket)."""
    q, k, v = random_qkv(18, 2, 13, 13, 4, 2)
    positions = jnp.stack([jnp.arange(13), jnp.arange(13) + 5]).astype(jnp.int32)  # [B, T]
    mask = None if bidirectional else AttentionMask(
        jnp.ones((2, 13), jnp.int32), jnp.ones((2, 13), jnp.int32), positions, positions, causal=True
    )
    return q, k, v, normal(180, (8, 4), scale=2.0), mask, positions, normal(181, q.shape)


@functools.cache
def relative_bias_reference(bidirectional):
    return relative_bias_loss_grad(
        *relative_bias_inputs(bidirectional), bidirectional=bidirectional, implementation="reference", dense_bias=True
    )


@pytest.mark.parametrize("chunk_size", [5, 8])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_chunked_relative_bias_matches_dense_bias(bidirectional, chunk_size):
    """Chunked, building the bias block by block, equals the reference given `bias.dense()`:
    output and gradients w.r.t. q, k, v and the table (length 13: several blocks, the last padded).
    """
    out, grads = relative_bias_loss_grad(
        *relative_bias_inputs(bidirectional), bidirectional=bidirectional, implementation="chunked",
        dense_bias=False, chunk_size=chunk_size,
    )
    expected_out, expected_grads = relative_bias_reference(bidirectional)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, actual, expected in zip(["q", "k", "v", "table"], grads, expected_grads):
        assert np.all(np.isfinite(actual)), name
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4, err_msg=name)


# Long sequences: compiled temporary memory on CPU for B=1, N=K=4, H=64, float32, causal
# AttentionMask, default chunk_size=512. Measured when written (jax 0.10.2, CPU):
#   chunked forward: 15.6 MiB at 2048, 21.6 MiB at 4096, 33.6 MiB at 8192 (linear: +6, +12)
#   chunked gradient: 62.8 / 111.0 / 207.4 MiB (191 MiB on another build)
#   reference at 8192: 2048 MiB forward, 3088 MiB gradient ([B, N, T, S] float32 = 1 GiB)
#   chunked with a RelativeBias (32 buckets) at 8192: 37.6 MiB forward, 228.3 MiB gradient
MiB = 2**20


def _long_attention(implementation, q, k, v, segment_ids, positions, table=None):
    """Causal self-attention, with T5's relative bias (table [32, N]) when `table` is given."""
    mask = self_attention_mask(segment_ids, positions, causal=True)
    bias = None if table is None else RelativeBias(table, positions, positions, bidirectional=False, max_distance=128)
    return dot_product_attention(q, k, v, mask, bias, implementation=implementation)


@functools.cache
def temp_bytes(implementation, length, gradient=False, relative_bias=False):
    """Temporary bytes XLA allocates for attention (or its gradient) at `length`, compile only.

    With `relative_bias`, the gradient is also taken w.r.t. the bias table.
    """
    qkv = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    args = (qkv, qkv, qkv, ids, ids) + ((jax.ShapeDtypeStruct((32, 4), jnp.float32),) if relative_bias else ())
    fn = functools.partial(_long_attention, implementation)
    if gradient:
        argnums = (0, 1, 2, 5) if relative_bias else (0, 1, 2)
        fn = jax.grad(lambda *args: _long_attention(implementation, *args).sum(), argnums=argnums)
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_at_8192():
    """Chunked attention at 8192 needs tens of MiB where the reference needs over 1 GiB."""
    assert temp_bytes("chunked", 8192) < 64 * MiB
    assert temp_bytes("reference", 8192) > 1024 * MiB


def test_chunked_memory_grows_linearly():
    """Doubling the length about doubles the growth in memory (quadratic would quadruple it).

    Linear memory a + b L gives (t8k - t4k) / (t4k - t2k) = 2; quadratic gives 4.
    """
    t2k, t4k, t8k = (temp_bytes("chunked", n) for n in (2048, 4096, 8192))
    assert t8k - t4k < 2.5 * (t4k - t2k) + MiB, (t2k, t4k, t8k)


def test_chunked_gradient_memory_at_8192():
    """The backward pass stays linear too (query blocks are rematerialised)."""
    assert temp_bytes("chunked", 8192, gradient=True) < 256 * MiB
    assert temp_bytes("reference", 8192, gradient=True) > 2048 * MiB


@pytest.mark.parametrize("gradient", [False, True], ids=["forward", "gradient"])
def test_chunked_relative_bias_memory_at_8192(gradient):
    """A factored relative bias keeps chunked attention linear: under 1.25x the memory without
    bias (a dense [B, N, T, S] float32 bias alone would be 1 GiB at 8192).
    """
    with_bias = temp_bytes("chunked", 8192, gradient=gradient, relative_bias=True)
    without = temp_bytes("chunked", 8192, gradient=gradient)
    assert with_bias < 1.25 * without, (with_bias / MiB, without / MiB)


def test_chunked_runs_at_8192():
    """A real 8192-token causal run: the last 64 queries equal 'xla' on those rows over all keys."""
    length, last = 8192, 64
    q, k, v = random_qkv(20, 1, length, length, 4, 4, head_dim=64)
    segment_ids = jnp.ones((1, length), jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    out = jax.jit(functools.partial(_long_attention, "chunked"))(q, k, v, segment_ids, positions)
    tail_mask = AttentionMask(segment_ids[:, -last:], segment_ids, positions[:, -last:], positions, causal=True)
    expected = dot_product_attention(q[:, -last:], k, v, tail_mask, implementation="xla")
    np.testing.assert_allclose(out[:, -last:], expected, atol=ATOL, rtol=0)
    assert np.all(np.isfinite(out))


DROPOUT_IMPLEMENTATIONS = ["reference", "xla", "chunked"]


@pytest.mark.parametrize("implementation", DROPOUT_IMPLEMENTATIONS)
def test_dropout_needs_rng(implementation):
    """Asking for dropout without a random key is an error, not silently deterministic."""
    q, k, v = random_qkv(0, 1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="dropout_rng"):
        attend(q, k, v, implementation=implementation, dropout_rate=0.1)


@pytest.mark.parametrize("implementation", DROPOUT_IMPLEMENTATIONS)
def test_dropout_is_reproducible_and_rng_dependent(implementation):
    """The same key gives the same output; another key another output; both differ from no dropout."""
    q, k, v, mask, *_ = case_causal()
    run = functools.partial(attend, q, k, v, mask, implementation=implementation, dropout_rate=0.5)
    first = run(dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(first, run(dropout_rng=jax.random.key(1)))
    assert not np.allclose(first, run(dropout_rng=jax.random.key(2)))
    assert not np.allclose(first, attend(q, k, v, mask, implementation=implementation))


@pytest.mark.parametrize("implementation", DROPOUT_IMPLEMENTATIONS)
def test_tiny_dropout_rate_is_nearly_deterministic(implementation):
    """With a dropout rate near 0 nothing is dropped and the output equals the deterministic one."""
    q, k, v, mask, *_ = case_causal()
    deterministic = attend(q, k, v, mask, implementation=implementation)
    dropped = attend(q, k, v, mask, implementation=implementation, dropout_rate=1e-7, dropout_rng=jax.random.key(0))
    np.testing.assert_allclose(dropped, deterministic, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", DROPOUT_IMPLEMENTATIONS)
def test_dropout_drops_weights_at_the_rate_and_rescales_the_rest(implementation):
    """With one-hot values the output is the attention weights themselves: each is either
    dropped (0) or kept and scaled by 1 / (1 - rate), and about `rate` of them are dropped,
    so the expected output is the output without dropout."""
    rate, length, samples = 0.25, 8, 64
    q, k, _ = random_qkv(3, 1, length, length, 2, 2, head_dim=length)
    v = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (1, length, 2, length))  # value s = one-hot s
    mask = ones_mask(1, length, causal=True)
    weights = np.asarray(attend(q, k, v, mask, implementation=implementation))  # [1, T, N, S]

    @jax.jit
    def dropped(keys):
        return jax.vmap(
            lambda key: attend(q, k, v, mask, implementation=implementation, dropout_rate=rate, dropout_rng=key)
        )(keys)

    outs = np.asarray(dropped(jax.random.split(jax.random.key(0), samples)))
    kept = outs != 0
    np.testing.assert_allclose(np.where(kept, outs, 0), np.where(kept, weights / (1 - rate), 0), rtol=1e-5, atol=1e-6)
    visible = np.broadcast_to(np.tril(np.ones((length, length), bool))[None, :, None, :], weights.shape)
    assert not kept[:, ~visible].any()  # future keys stay at 0
    dropped_fraction = 1 - kept[:, visible].mean()  # 64 * 72 draws: one standard error is ~0.006
    assert abs(dropped_fraction - rate) < 0.03, dropped_fraction


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised off GPU")
def test_cudnn_off_gpu_is_an_error():
    """'cudnn' on a CPU (or TPU) backend says it needs a GPU instead of failing obscurely."""
    q, k, v = random_qkv(0, 1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_reference_on_packed_rows(causal):
    """cuDNN (bfloat16, causal by index) equals the reference on packed, padded rows, forward
    and gradient, at the real queries; grouped-query heads; a cross-attention-shaped call too."""
    segment_ids, positions = packed([[40, 60, 20], [128], [70, 30]], 128)
    mask = self_attention_mask(segment_ids, positions, causal=causal)
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(7, 3, 128, 128, 8, 2, head_dim=64))
    real = np.asarray(segment_ids != 0)[:, :, None, None]

    def loss(implementation, q, k, v):
        out = dot_product_attention(q, k, v, mask, implementation=implementation).astype(jnp.float32)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    results = {}
    for implementation in ("cudnn", "reference"):
        grad_fn = jax.jit(jax.grad(functools.partial(loss, implementation), argnums=(0, 1, 2), has_aux=True))
        results[implementation] = grad_fn(q, k, v)
    (grads, out), (ref_grads, ref_out) = results["cudnn"], results["reference"]
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref_out, 0), atol=2e-2)
    for grad, ref_grad in zip(grads, ref_grads):
        grad, ref_grad = np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32)
        assert np.linalg.norm(grad - ref_grad) <= 2e-2 * np.linalg.norm(ref_grad)  # bfloat16 inputs

    cross = cross_attention_mask(segment_ids[:, :64], segment_ids)
    out = jax.jit(functools.partial(dot_product_attention, implementation="cudnn"))(q[:, :64], k, v, cross)
    ref = dot_product_attention(q[:, :64], k, v, cross, implementation="reference")
    real_queries = real[:, :64]
    np.testing.assert_allclose(np.where(real_queries, out.astype(jnp.float32), 0),
                               np.where(real_queries, ref.astype(jnp.float32), 0), atol=2e-2)


def test_unknown_implementation_is_an_error():
    """An implementation name outside the enum is rejected."""
    q, k, v = random_qkv(0, 1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="flash"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize(
    "q_shape, kv_shape",
    [
        ((1, 4, 4, 8), (1, 4, 4, 6)),  # head dims differ
        ((1, 4, 4, 8), (1, 4, 3, 8)),  # 3 key/value heads do not divide 4 query heads
        ((2, 4, 4, 8), (1, 4, 4, 8)),  # batch sizes differ
        ((4, 4, 8), (4, 4, 8)),  # missing batch axis
    ],
)
@pytest.mark.parametrize("implementation", ["reference", "xla", "chunked"])
def test_shape_errors(q_shape, kv_shape, implementation):
    """Incompatible q/k/v shapes are a ValueError before any computation."""
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    with pytest.raises(ValueError, match=r"shape|\[B, T, N, H\]"):
        dot_product_attention(q, k, k, implementation=implementation)


def test_value_shape_must_match_key_shape():
    """v must have exactly k's shape."""
    q, k, v = random_qkv(0, 1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="k, v"):
        dot_product_attention(q, k, v[:, :3])


def test_attention_weights_are_a_distribution_over_allowed_keys():
    """Each real query's weights sum to 1 and are exactly 0 on masked keys (also with a bias)."""
    q, k, v, mask, _, valid, _ = case_packed_causal()
    bias = normal(3, (1, 4, 21, 21), scale=5.0)
    for b in (None, bias):
        weights = attention_weights(q, k, mask, b)
        assert weights.shape == (2, 4, 21, 21) and weights.dtype == jnp.float32
        rows = np.asarray(valid)[:, None, :].repeat(4, axis=1)  # [B, N, T]
        np.testing.assert_allclose(weights.sum(-1)[rows], 1.0, atol=1e-6)
        dense = np.broadcast_to(np.asarray(mask.dense()), weights.shape)
        assert np.all(np.asarray(weights)[~dense & rows[..., None]] == 0.0)
        assert np.all(np.asarray(weights)[dense] > 0.0)


def test_attention_weights_times_values_is_the_output():
    """attention_weights are the probabilities the reference output is built from."""
    q, k, v, mask, _, valid, _ = case_packed_bidirectional()
    weights = attention_weights(q, k, mask)  # [B, N, T, S]
    out = jnp.einsum("bnts,bsnh->btnh", weights, v)
    assert_rows_close(out, dot_product_attention(q, k, v, mask, implementation="reference"), valid)
