"""Modules, only where there are parameters: embeddings, attention, feed-forward, the Block.

One `Block` serves all three architectures. It never decides causality: it receives masks.
    encoder block                   Block(has_cross_attention=False) + bidirectional mask
    decoder-only block              Block(has_cross_attention=False) + causal mask
    encoder-decoder decoder block   Block(has_cross_attention=True)  + causal mask, encoder output
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import sharding as ax
from transformer.attention import Bias, Mask, attention_weights, dot_product_attention
from transformer.cache import KVCache
from transformer.config import Activation, ModelConfig, Norm, NormPosition, PositionEncoding
from transformer.positions import RelativeBias, apply_rotary, sinusoidal_embedding

_ACTIVATIONS: dict[Activation, Callable[[jax.Array], jax.Array]] = {
    Activation.RELU: nn.relu,
    Activation.GELU: lambda x: nn.gelu(x, approximate=False),
    Activation.GELU_TANH: lambda x: nn.gelu(x, approximate=True),
    Activation.SWIGLU: nn.silu,
    Activation.GEGLU: lambda x: nn.gelu(x, approximate=False),
}


def activation_fn(activation: Activation) -> Callable[[jax.Array], jax.Array]:
    """The nonlinearity of a feed-forward layer (for gated ones, the function of the gate)."""
    return _ACTIVATIONS[activation]


def dense(
    config: ModelConfig,
    features,
    axes: tuple[str, ...],
    *,
    name: str,
    axis=-1,
    use_bias: bool | None = None,
    float32_output: bool = False,
    kernel_stddev: float = 0.02,
):
    """A DenseGeneral whose kernel and bias carry logical axis names `axes` (inputs..., outputs...).

    float32_output: accumulate and return float32 whatever the compute dtype (logits).
    """
    features = features if isinstance(features, tuple) else (features,)
    return nn.DenseGeneral(
        features,
        axis=axis,
        use_bias=config.use_bias if use_bias is None else use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(kernel_stddev), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-len(features) :]),
        dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
        if float32_output
        else None,
        name=name,
    )


def norm(config: ModelConfig, *, name: str) -> nn.Module:
    """The configured normalisation (statistics in float32)."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, (ax.EMBED,))
    if config.norm == Norm.RMSNORM:
        return nn.RMSNorm(
            epsilon=config.norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype,
            scale_init=scale_init, name=name,
        )
    return nn.LayerNorm(
        epsilon=config.norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype,
        scale_init=scale_init, bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ax.EMBED,)),
        name=name,
    )


def _embed(config: ModelConfig, num: int, axis: str, *, name: str, stddev: float = 0.02) -> nn.Embed:
    return nn.Embed(
        num, config.d_model, dtype=config.dtype, param_dtype=config.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), (axis, ax.EMBED)),
        name=name,
    )


class Embedder(nn.Module):
    """Token embeddings + position encoding (+ token types, + norm) in; tied logits out."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        token_stddev = cfg.d_model**-0.5 if cfg.scale_embeddings else 0.02
        self.token = _embed(cfg, cfg.vocab_size, ax.VOCAB, name="token", stddev=token_stddev)
        if cfg.position == PositionEncoding.LEARNED:
            self.position = _embed(cfg, cfg.max_length, ax.POSITIONS, name="position")
        if cfg.type_vocab_size:
            self.token_type = _embed(cfg, cfg.type_vocab_size, ax.TOKEN_TYPES, name="token_type")
        if cfg.embedding_norm:
            self.norm = norm(cfg, name="norm")
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, tokens, positions, token_types=None, *, deterministic: bool = True) -> jax.Array:
        """tokens, positions, token_types: [B, T] int -> [B, T, D]."""
        cfg = self.config
        x = self.token(tokens)
        if cfg.scale_embeddings:
            x *= jnp.sqrt(cfg.d_model).astype(x.dtype)
        if cfg.position == PositionEncoding.LEARNED:
            x += self.position(positions)
        elif cfg.position == PositionEncoding.SINUSOIDAL:
            x += sinusoidal_embedding(positions, cfg.d_model).astype(x.dtype)
        if cfg.type_vocab_size:
            x += self.token_type(jnp.zeros_like(tokens) if token_types is None else token_types)
        if cfg.embedding_norm:
            x = self.norm(x)
        return self.dropout(x, deterministic=deterministic)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the token embedding matrix: [B, T, D] -> [B, T, V] float32."""
        cfg = self.config
        if cfg.rescale_tied_logits:
            x *= cfg.d_model**-0.5
        embedding = self.token.embedding.astype(cfg.dtype)  # [V, D]
        return jnp.einsum("btd,vd->btv", x.astype(cfg.dtype), embedding, preferred_element_type=jnp.float32)


class RelativePositionBias(nn.Module):
    """T5's learned bias per (relative-position bucket, head), shared by all layers of a stack."""

    config: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> RelativeBias:
        """[B, T], [B, S] -> the factored bias; `.dense()` is [B, N, T, S] float32."""
        cfg = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (ax.RELATIVE_BUCKETS, ax.HEADS)),
            (cfg.relative_num_buckets, cfg.num_heads),
            cfg.param_dtype,
        )
        return RelativeBias(
            table, q_positions, kv_positions, bidirectional=self.bidirectional, max_distance=cfg.relative_max_distance
        )


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) attention; self-attention or cross-attention.

    Self-attention takes keys and values from its own input; with a cache, the new keys
    and values are appended to the cache and attention runs over all its slots. Cross-attention takes keys and values from `kv_input` (the encoder
    output) and returns them as a cache, so decoding computes them once.
    """

    config: ModelConfig
    is_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: Mask,
        *,
        positions: jax.Array | None = None,
        kv_input: jax.Array | None = None,
        bias: Bias = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, D]; positions [B, T] (rotary encoding); kv_input [B, S, D]; bias on the logits
        (a `RelativeBias` or an array broadcastable to [B, N, T, S]).

        With a self-attention cache, the new keys and values go to slots cache_index ..
        cache_index + T - 1, and `mask` covers all the cache's slots.
        Returns the output [B, T, D] and the updated cache (for cross-attention: the encoder
        keys and values; None for self-attention without a cache).
        """
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        # Without 1/sqrt(H) logit scaling (T5), the query initialisation carries it instead.
        query_stddev = 0.02 if cfg.attention_logit_scaling else 0.02 * head_dim**-0.5
        q_axes = (ax.EMBED, ax.HEADS, ax.HEAD_DIM)
        q = dense(cfg, (heads, head_dim), q_axes, kernel_stddev=query_stddev, name="query")(x)  # [B, T, N, H]
        kv_axes = (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM)
        project_key = dense(cfg, (kv_heads, head_dim), kv_axes, name="key")
        project_value = dense(cfg, (kv_heads, head_dim), kv_axes, name="value")

        if self.is_cross_attention:
            if kv_input is not None:
                cache = KVCache(project_key(kv_input), project_value(kv_input))  # [B, S, K, H]
            elif cache is None:
                raise ValueError("Cross-attention needs the encoder output (kv_input) or its cached keys/values.")
            k, v = cache.k, cache.v
        else:
            k, v = project_key(x), project_value(x)  # [B, T, K, H]
            if cfg.position == PositionEncoding.ROPE:
                q = apply_rotary(q, positions, cfg.rope_theta)
                k = apply_rotary(k, positions, cfg.rope_theta)
            if cache is not None:
                cache = cache.write(k, v, cache_index)
                k, v = cache.k, cache.v  # [B, S, K, H], S = cache slots

        dropout_rate = 0.0 if deterministic else cfg.attention_dropout_rate
        out = dot_product_attention(
            q, k, v, mask, bias,
            scale=None if cfg.attention_logit_scaling else 1.0,
            implementation=cfg.attention_implementation,
            dropout_rate=dropout_rate,
            dropout_rng=self.make_rng("dropout") if dropout_rate > 0.0 else None,
        )  # [B, T, N, H]
        if self.is_mutable_collection("intermediates"):  # asked for by transformer.attention_maps
            scale = None if cfg.attention_logit_scaling else 1.0
            self.sow("intermediates", "attention_weights", attention_weights(q, k, mask, bias, scale=scale))
        out = dense(cfg, cfg.d_model, (ax.HEADS, ax.HEAD_DIM, ax.EMBED), axis=(-2, -1), name="out")(out)
        return out, cache


class FeedForward(nn.Module):
    """Position-wise feed-forward: act(x W_i) W_o, or gated act(x W_0) * (x W_1) W_o."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = activation_fn(cfg.activation)
        axes = (ax.EMBED, ax.MLP)
        if cfg.activation.gated:
            h = act(dense(cfg, cfg.d_ff, axes, name="wi_0")(x)) * dense(cfg, cfg.d_ff, axes, name="wi_1")(x)
        else:
            h = act(dense(cfg, cfg.d_ff, axes, name="wi")(x))  # [B, T, F]
        return dense(cfg, cfg.d_model, (ax.MLP, ax.EMBED), name="wo")(h)  # [B, T, D]


class Block(nn.Module):
    """The one Transformer block: self-attention, optional cross-attention, feed-forward.

    Each sub-layer is wrapped in a residual connection with dropout and a norm, before
    (pre-LN: x + f(norm(x))) or after (post-LN: norm(x + f(x))) the sub-layer.
    """

    config: ModelConfig
    has_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        caches: tuple[KVCache | None, KVCache | None],
        self_mask: Mask,
        positions: jax.Array,
        cache_index: jax.Array | None,
        self_bias: Bias,
        encoded: jax.Array | None,
        cross_mask: Mask,
        deterministic: bool,
    ) -> tuple[jax.Array, tuple[KVCache | None, KVCache | None]]:
        """x: [B, T, D] -> [B, T, D], with the (self, cross) attention caches updated.

        Arguments are positional so that the block can be scanned and rematerialised.
        """
        cfg = self.config
        self_cache, cross_cache = caches
        x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))

        def sublayer(x, fn, name):
            dropout = nn.Dropout(cfg.dropout_rate, name=f"{name}_dropout")
            if cfg.norm_position == NormPosition.PRE:
                return x + dropout(fn(norm(cfg, name=f"{name}_norm")(x)), deterministic=deterministic)
            return norm(cfg, name=f"{name}_norm")(x + dropout(fn(x), deterministic=deterministic))

        def self_attention(h):
            nonlocal self_cache
            attention = MultiHeadAttention(cfg, name="self_attention")
            h, self_cache = attention(
                h, self_mask, positions=positions, bias=self_bias, cache=self_cache, cache_index=cache_index,
                deterministic=deterministic,
            )
            return h

        def cross_attention(h):
            nonlocal cross_cache
            attention = MultiHeadAttention(cfg, is_cross_attention=True, name="cross_attention")
            h, cross_cache = attention(
                h, cross_mask, kv_input=encoded, cache=cross_cache, deterministic=deterministic
            )
            return h

        x = sublayer(x, self_attention, "self_attention")
        if self.has_cross_attention:
            x = sublayer(x, cross_attention, "cross_attention")
        x = sublayer(x, FeedForward(cfg, name="feed_forward"), "feed_forward")
        return x, (self_cache, cross_cache)
