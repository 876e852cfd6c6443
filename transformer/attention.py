"""Scaled dot-product attention: one pure function, four implementations.

Shapes (letters as in `jax.nn.dot_product_attention`):
    q: [B, T, N, H]    k, v: [B, S, K, H]    output: [B, T, N, H]
with N query heads sharing K key/value heads (grouped-query attention when K < N; query head
n uses key/value head n // (N // K)). Logits and softmax are computed in float32.

Implementations:
    "reference"  plain einsums; the ground truth every other implementation is tested against.
    "xla"        `jax.nn.dot_product_attention` lowered by XLA.
    "cudnn"      `jax.nn.dot_product_attention` on cuDNN's fused flash attention (NVIDIA GPUs,
                 bfloat16/float16 inputs). Only used when asked for explicitly. A causal
                 `AttentionMask` with T == S is applied by index (cuDNN skips the blocks above
                 the diagonal), which equals the mask by position when positions strictly rise
                 within each segment id, as packing, padding and generation make them.
    "chunked"    online softmax over blocks of queries and keys (Rabe & Staats 2021; flash
                 attention's recurrence): memory grows linearly with length, in the forward
                 and (through rematerialisation of each query block) the backward pass.

Masks and biases may be factored (`AttentionMask`, `RelativeBias`): "chunked" builds them one
block at a time, the others build the dense [B, N, T, S] array.

Rows whose mask allows no key at all (padding queries) produce unspecified values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer.config import AttentionImplementation
from transformer.masks import AttentionMask
from transformer.positions import RelativeBias

Mask = AttentionMask | jax.Array | None
Bias = RelativeBias | jax.Array | None

# Masked logits get this value rather than -inf, so a fully masked row stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask = None,
    bias: Bias = None,
    *,
    scale: float | None = None,
    implementation: AttentionImplementation | str = AttentionImplementation.XLA,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    chunk_size: int = 512,
) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v.

    mask: an `AttentionMask`, or a boolean array broadcastable to [B, N, T, S] (True = attend).
    bias: added to the logits: a `RelativeBias` (T5), or a float array broadcastable to
        [B, N, T, S].
    scale: multiplies the logits; defaults to 1 / sqrt(H).
    dropout_rate, dropout_rng: dropout on the attention weights (training only). With "xla",
        the weights are then computed explicitly, as "reference" does.
    chunk_size: block length of queries and keys for "chunked".
    """
    implementation = AttentionImplementation(implementation)
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout = dropout_rate > 0.0
    if dropout and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng.")

    if implementation == AttentionImplementation.CHUNKED:
        return _chunked_attention(q, k, v, mask, bias, scale, chunk_size, dropout_rate, dropout_rng)
    if implementation == AttentionImplementation.REFERENCE or (
        implementation == AttentionImplementation.XLA and dropout
    ):
        weights = attention_weights(q, k, mask, bias, scale=scale)
        if dropout:
            weights = _dropout(weights, dropout_rate, dropout_rng)
        return _weighted_values(weights, v)
    if implementation == AttentionImplementation.CUDNN:
        return _cudnn_attention(q, k, v, mask, bias, scale, dropout)
    return jax.nn.dot_product_attention(
        q, k, v, bias=_dense_bias(bias), mask=_dense_mask(mask), scale=scale, implementation="xla"
    )


def _cudnn_attention(q, k, v, mask: Mask, bias: Bias, scale: float, dropout: bool) -> jax.Array:
    """cuDNN's flash attention. It applies causality itself, skipping the blocks above the
    diagonal; by index, which equals the mask's by position where queries and keys are one
    sequence (T == S) whose positions rise within each segment (packed rows, prompts), the
    segment mask doing the rest."""
    if dropout:
        raise ValueError("The 'cudnn' attention implementation has no attention dropout; set "
                         "attention_dropout_rate=0 or use the 'xla' implementation.")
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"The 'cudnn' attention implementation needs an NVIDIA GPU, but JAX runs on "
            f"{jax.default_backend()!r}; use 'xla' or 'chunked'."
        )
    is_causal = isinstance(mask, AttentionMask) and mask.causal and q.shape[1] == k.shape[1]
    if is_causal:
        mask = mask.replace(causal=False)
    bias = None if bias is None else _dense_bias(bias).astype(q.dtype)  # cuDNN takes the bias in the input dtype
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=_dense_mask(mask), scale=scale, is_causal=is_causal, implementation="cudnn"
    )


def attention_weights(
    q: jax.Array, k: jax.Array, mask: Mask = None, bias: Bias = None, *, scale: float | None = None
) -> jax.Array:
    """The attention probabilities softmax(q k^T * scale + bias, masked). -> [B, N, T, S] float32."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, num_heads, q_len, k.shape[1]) * scale  # [B, N, T, S]
    if bias is not None:
        logits += _dense_bias(bias).astype(jnp.float32)
    dense = _dense_mask(mask)
    if dense is not None:
        logits = jnp.where(dense, logits, _MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def _weighted_values(weights: jax.Array, v: jax.Array) -> jax.Array:
    """[B, N, T, S] weights x [B, S, K, H] values -> [B, T, N, H]."""
    batch, num_heads, q_len, kv_len = weights.shape
    num_kv_heads = v.shape[2]
    weights = weights.reshape(batch, num_kv_heads, num_heads // num_kv_heads, q_len, kv_len)
    out = jnp.einsum("bkgts,bskh->btkgh", weights.astype(v.dtype), v)
    return out.reshape(batch, q_len, num_heads, v.shape[-1])


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"Attention expects q [B, T, N, H] and k, v [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}."
        )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"Attention shapes do not match: q {q.shape}, k {k.shape}; batch and head dim must "
            "agree and the number of key/value heads must divide the number of query heads."
        )


def _dense_mask(mask: Mask) -> jax.Array | None:
    return mask.dense() if isinstance(mask, AttentionMask) else mask


def _dense_bias(bias: Bias) -> jax.Array | None:
    return bias.dense() if isinstance(bias, RelativeBias) else bias


def _dropout(weights: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def _as_4d(x: jax.Array) -> jax.Array:
    """A mask or bias broadcastable to [B, N, T, S], with its missing leading axes added."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Pads `axis` to a multiple of `block` and moves the block index to the front.

    [..., L, ...] -> [L // block, ..., block, ...]; a size-1 (broadcast) axis stays as it is,
    with a leading block axis of 1.
    """
    if x.shape[axis] == 1:
        return jnp.expand_dims(x, 0)
    pad = -x.shape[axis] % block
    x = jnp.pad(x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _blocks_2d(x: jax.Array, q_block: int, kv_block: int) -> jax.Array:
    """[B, M, T, S] -> [T // q_block, S // kv_block, B, M, q_block, kv_block] (see `_blocks`)."""
    return jnp.swapaxes(_blocks(_blocks(x, 2, q_block), 4, kv_block), 0, 1)


def _pick(blocks: jax.Array, index: jax.Array) -> jax.Array:
    """Block `index` of `_blocks` output (block 0 when the axis was broadcast)."""
    return blocks[jnp.minimum(index, blocks.shape[0] - 1)]


def _block_fn(x: AttentionMask | RelativeBias | jax.Array, q_block: int, kv_block: int):
    """A function (qi, ki) -> block [B, 1|N, q_block, kv_block] of a mask or bias.

    Factored values are cut into blocks of their per-token factors, [num_blocks, B, block], and
    each block is built from those; arrays are cut into blocks once (see `_blocks_2d`).
    """
    if isinstance(x, AttentionMask):
        q_ids, q_pos = _blocks(x.q_segment_ids, 1, q_block), _blocks(x.q_positions, 1, q_block)
        kv_ids, kv_pos = _blocks(x.kv_segment_ids, 1, kv_block), _blocks(x.kv_positions, 1, kv_block)
        return lambda qi, ki: x.replace(
            q_segment_ids=_pick(q_ids, qi), kv_segment_ids=_pick(kv_ids, ki),
            q_positions=_pick(q_pos, qi), kv_positions=_pick(kv_pos, ki),
        ).dense()
    if isinstance(x, RelativeBias):
        q_pos, kv_pos = _blocks(x.q_positions, 1, q_block), _blocks(x.kv_positions, 1, kv_block)
        return lambda qi, ki: x.replace(q_positions=_pick(q_pos, qi), kv_positions=_pick(kv_pos, ki)).dense()
    blocks = _blocks_2d(_as_4d(x), q_block, kv_block)  # [nq, nk, B, 1|N, q_block, kv_block]
    return lambda qi, ki: _pick(_pick(blocks, qi), ki)


def _allow_all(batch: int, q_len: int, kv_len: int) -> AttentionMask:
    """A mask that lets every query attend to every key (one segment, not causal)."""
    return AttentionMask(
        jnp.ones((batch, q_len), jnp.int32), jnp.ones((batch, kv_len), jnp.int32),
        jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32),
    )


def _to_groups(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, 1|N, t, s] -> [B, 1|K, 1|G, t, s], matching [B, K, G, t, s] logits."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _chunked_attention(q, k, v, mask, bias, scale, chunk_size, dropout_rate, dropout_rng):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    q_block, kv_block = min(chunk_size, q_len), min(chunk_size, kv_len)
    num_q_blocks, num_kv_blocks = -(-q_len // q_block), -(-kv_len // kv_block)

    if mask is None:  # still needed: padding keys up to a whole block must be masked
        mask = _allow_all(batch, q_len, kv_len)
    # Ties the mask and bias to q. Otherwise, differentiated inside a scan over layers, they are
    # loop invariants: JAX computes every block of them once, before the loop, and keeps all the
    # blocks, [B, N, T, S] in all, for the backward pass.
    mask, bias, q = jax.lax.optimization_barrier((mask, bias, q))
    if not isinstance(mask, AttentionMask):  # broadcast, so that padding keys are masked
        mask = _as_4d(mask)
        mask = jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))
    mask_block = _block_fn(mask, q_block, kv_block)
    bias_block = None if bias is None else _block_fn(bias, q_block, kv_block)

    q_blocks = _blocks(q, 1, q_block)  # [nq, B, q_block, N, H]
    k_blocks = _blocks(k, 1, kv_block)  # [nk, B, kv_block, K, H]
    v_blocks = _blocks(v, 1, kv_block)

    def attend_query_block(xs):
        qi, qb = xs
        qb = qb.reshape(batch, q_block, num_kv_heads, groups, head_dim)

        def step(carry, xs):
            ki, kb, vb = xs
            running_max, normalizer, acc = carry
            logits = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32)
            logits *= scale  # [B, K, G, q_block, kv_block]
            if bias_block is not None:
                logits += _to_groups(bias_block(qi, ki).astype(jnp.float32), num_kv_heads)
            logits = jnp.where(_to_groups(mask_block(qi, ki), num_kv_heads), logits, _MASK_VALUE)
            new_max = jnp.maximum(running_max, logits.max(axis=-1))
            correction = jnp.exp(running_max - new_max)
            probs = jnp.exp(logits - new_max[..., None])
            normalizer = normalizer * correction + probs.sum(axis=-1)
            if dropout_rate > 0.0:
                rng = jax.random.fold_in(dropout_rng, qi * num_kv_blocks + ki)
                probs = _dropout(probs, dropout_rate, rng)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bskh->bkgqh", probs.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return (new_max, normalizer, acc), None

        stats = jnp.zeros((batch, num_kv_heads, groups, q_block), jnp.float32)  # [B, K, G, q_block]
        init = (jnp.full_like(stats, -jnp.inf), stats, jnp.zeros((*stats.shape, head_dim), jnp.float32))
        (_, normalizer, acc), _ = jax.lax.scan(step, init, (jnp.arange(num_kv_blocks), k_blocks, v_blocks))
        out = acc / normalizer[..., None]  # [B, K, G, q_block, H]
        return jnp.moveaxis(out, 3, 1).reshape(batch, q_block, num_heads, head_dim)

    # Each query block is rematerialised in the backward pass, so only one block's
    # [B, N, q_block, S] intermediates are alive at a time.
    out = jax.lax.map(jax.checkpoint(attend_query_block), (jnp.arange(num_q_blocks), q_blocks))  # [nq, B, qb, N, H]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_q_blocks * q_block, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)

