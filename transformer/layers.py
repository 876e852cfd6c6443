"""Modules, only where there are parameters: embeddings, attention, feed-forward, the Block.

One `Block` serves all three architectures. It never decides causality: it receives masks.
    encoder block                   Block(has_cross_attention=False) + bidirectional mask
    decoder-only block              Block(has_cross_attention=False) + causal mask
    encoder-decoder decoder block   Block(has_cross_attention=True)  + causal mask, encoder output
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from transformer import sharding as ax
from transformer.attention import Bias, Mask, attention_weights, dot_product_attention
from transformer.cache import KVCache
from transformer.config import Activation, Initialisation, ModelConfig, Norm, NormPosition, PositionEncoding
from transformer.positions import RelativeBias, apply_rotary, sinusoidal_embedding

_ACTIVATIONS: dict[Activation, Callable[[jax.Array], jax.Array]] = {
    Activation.RELU: nn.relu,
    Activation.GELU: lambda x: nn.gelu(x, approximate=False),
    Activation.GELU_TANH: lambda x: nn.gelu(x, approximate=True),
    Activation.SWIGLU: nn.silu,
    Activation.GEGLU: lambda x: nn.gelu(x, approximate=False),
    Activation.GEGLU_TANH: lambda x: nn.gelu(x, approximate=True),
}


def activation_fn(activation: Activation) -> Callable[[jax.Array], jax.Array]:
    """The nonlinearity of a feed-forward layer (for gated ones, the function of the gate)."""
    return _ACTIVATIONS[activation]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def float32_dot(x: jax.Array, kernel: jax.Array, dimension_numbers) -> jax.Array:
    """`jax.lax.dot_general` accumulated and returned in float32 (logits), whose derivative
    products run in the inputs' dtypes.

    Differentiated as is, a float32 output makes both gradient products float32: with bfloat16
    inputs, GPT-2's output head then took a third of its training step on a GPU. The tangent
    products below are computed in the inputs' dtypes and cast, so their transposes (the
    gradients) are too.
    """
    return jax.lax.dot_general(x, kernel, dimension_numbers, preferred_element_type=jnp.float32)


@float32_dot.defjvp
def _float32_dot_jvp(dimension_numbers, primals, tangents):
    (x, kernel), (x_dot, kernel_dot) = primals, tangents
    output_dot = (jax.lax.dot_general(x_dot, kernel, dimension_numbers).astype(jnp.float32)
                  + jax.lax.dot_general(x, kernel_dot, dimension_numbers).astype(jnp.float32))
    return float32_dot(x, kernel, dimension_numbers), output_dot


def is_weight_matrix(path) -> bool:
    """Whether the parameter at `path` (module names, then the leaf's name) is a weight matrix:
    a projection kernel or an embedding table; not a bias, a norm scale, nor T5's
    relative-position bias table (an embedding that holds biases). Decided by name, not rank, so
    a scanned stack (biases stacked to [layers, d]) answers as an unscanned one does."""
    path = tuple(path)
    return bool(path) and path[-1] in ("kernel", "embedding") and "relative_position_bias" not in path


class Dense(nn.Module):
    """x W + b over the trailing `axis` dims of x, with logical axis names `axes` (inputs..., outputs...).

    The kernel is created at its full shape, so its names always fit it; nn.DenseGeneral creates a
    2-D kernel and reshapes it, and under a mesh applies the N-D names to the 2-D array (flax#3676).
    """

    config: ModelConfig
    features: int | tuple[int, ...]
    axes: tuple[str, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool | None = None  # None: config.use_bias
    float32_output: bool = False  # accumulate and return float32 whatever the compute dtype (logits)
    init_scale: float = 1.0  # multiplies the configured initial scale (`initial_stddev`)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axis = tuple(a % x.ndim for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,)))
        fan_in = math.prod(x.shape[a] for a in axis)
        stddev = initial_stddev(cfg, fan_in) * self.init_scale
        kernel_init = nn.with_logical_partitioning(nn.initializers.normal(stddev), self.axes)
        kernel = self.param("kernel", kernel_init, tuple(x.shape[a] for a in axis) + features, cfg.param_dtype)
        bias = None
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[-len(features) :])
            bias = self.param("bias", bias_init, features, cfg.param_dtype)
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"Dense contracts trailing axes of its input; got axis={self.axis} for {x.shape}.")
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.dtype)
        # One 2-D product [M, K] x [K, F]. With the batch axes kept, XLA:CPU ran the weight
        # gradient (contracting batch and length) as a generic dot: 5% slower training steps.
        rows = x.reshape(-1, math.prod(x.shape[a] for a in axis))
        dot = float32_dot if self.float32_output else jax.lax.dot_general
        out = dot(rows, kernel.reshape(rows.shape[1], -1), (((1,), (0,)), ((), ())))
        out = out.reshape(x.shape[: x.ndim - len(axis)] + features)  # [..., outputs...]
        return out if bias is None else out + bias


def initial_stddev(config: ModelConfig, fan_in: int) -> float:
    """The initial scale of a matrix reading `fan_in` inputs (of a table: `fan_in` 1): 0.02, or
    T5's 1 / sqrt(fan_in) (`Initialisation.FAN_IN`: each product starts at unit variance)."""
    return 0.02 if config.initialisation == Initialisation.NORMAL else fan_in**-0.5


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


def _embed(config: ModelConfig, num: int, axis: str, *, name: str, stddev: float | None = None) -> nn.Embed:
    """A table of `num` rows of the embedding width (E with factorised embeddings, else D)."""
    stddev = initial_stddev(config, 1) if stddev is None else stddev
    return nn.Embed(
        num, config.embedding_size or config.d_model, dtype=config.dtype, param_dtype=config.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), (axis, ax.EMBED)),
        name=name,
    )


class Embedder(nn.Module):
    """Token embeddings + position encoding (+ token types, + norm) in; tied logits out.

    With factorised embeddings (ALBERT) the tables are E wide and the sum is projected to D.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        token_stddev = cfg.d_model**-0.5 if cfg.scale_embeddings else None
        self.token = _embed(cfg, cfg.vocab_size, ax.VOCAB, name="token", stddev=token_stddev)
        if cfg.position == PositionEncoding.LEARNED:
            self.position = _embed(cfg, cfg.max_length + cfg.position_offset, ax.POSITIONS, name="position")
        if cfg.type_vocab_size:
            self.token_type = _embed(cfg, cfg.type_vocab_size, ax.TOKEN_TYPES, name="token_type")
        if cfg.embedding_norm:
            self.norm = norm(cfg, name="norm")
        self.dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.embedding_size:
            self.projection = Dense(cfg, cfg.d_model, (ax.EMBED, ax.MLP), use_bias=True, name="projection")

    def __call__(self, tokens, positions, token_types=None, *, deterministic: bool = True) -> jax.Array:
        """tokens, positions, token_types: [B, T] int -> [B, T, D]."""
        cfg = self.config
        x = self.token(tokens)
        if cfg.scale_embeddings:
            x *= jnp.sqrt(cfg.d_model).astype(x.dtype)
        if cfg.position == PositionEncoding.LEARNED:
            x += self.position(positions + cfg.position_offset)
        elif cfg.position == PositionEncoding.SINUSOIDAL:
            x += sinusoidal_embedding(positions, x.shape[-1]).astype(x.dtype)
        if cfg.type_vocab_size:
            x += self.token_type(jnp.zeros_like(tokens) if token_types is None else token_types)
        if cfg.embedding_norm:
            x = self.norm(x)
        x = self.dropout(x, deterministic=deterministic)
        return self.projection(x) if cfg.embedding_size else x

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the token embedding matrix: [B, T, E] -> [B, T, V] float32."""
        cfg = self.config
        if cfg.rescale_tied_logits:
            x *= cfg.d_model**-0.5
        embedding = self.token.embedding.astype(cfg.dtype)  # [V, E]
        return float32_dot(x.astype(cfg.dtype), embedding, (((x.ndim - 1,), (1,)), ((), ())))


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
            nn.with_logical_partitioning(nn.initializers.normal(initial_stddev(cfg, cfg.d_model)),
                                         (ax.RELATIVE_BUCKETS, ax.HEADS)),
            (cfg.relative_num_buckets, cfg.num_heads),
            cfg.param_dtype,
        )
        return RelativeBias(
            table, q_positions, kv_positions, bidirectional=self.bidirectional, max_distance=cfg.relative_max_distance
        )


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) attention; self-attention or cross-attention.

    Self-attention takes keys and values from its own input; with a cache, the new keys
    and values are appended to the cache and attention runs over all its slots.
    Cross-attention takes keys and values from `kv_input` (the encoder output) and returns
    them as a cache, so decoding computes them once.
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
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Without 1/sqrt(H) logit scaling (T5), the query initialisation carries it instead.
        query_scale = 1.0 if cfg.attention_logit_scaling else head_dim**-0.5
        q_axes = (ax.EMBED, ax.HEADS, ax.HEAD_DIM)
        q = Dense(cfg, (heads, head_dim), q_axes, init_scale=query_scale, name="query")(x)  # [B, T, N, H]
        # Key/value heads split over "tensor" as the query heads do; fewer of them (grouped or
        # multi-query attention) only where they divide evenly (`sharding.axis_rules`).
        kv_axes = (ax.EMBED, ax.HEADS if kv_heads == heads else ax.KV_HEADS, ax.HEAD_DIM)
        project_key = Dense(cfg, (kv_heads, head_dim), kv_axes, name="key")
        project_value = Dense(cfg, (kv_heads, head_dim), kv_axes, name="value")

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
        out_axes = (ax.HEADS, ax.HEAD_DIM, ax.EMBED)
        out = Dense(cfg, cfg.d_model, out_axes, axis=(-2, -1), init_scale=residual_scale(cfg), name="out")(out)
        return out, cache


def residual_scale(config: ModelConfig) -> float:
    """What multiplies the initial scale of a projection into the residual stream (attention out,
    feed-forward out): 1, or GPT-2's 1 / sqrt(2L) (`scale_residual_init`: the residual path sums
    2L of them; L the deeper stack's layers)."""
    if not config.scale_residual_init:
        return 1.0
    return 1 / math.sqrt(2 * max(config.num_encoder_layers, config.num_decoder_layers))


class FeedForward(nn.Module):
    """Position-wise feed-forward: act(x W_i) W_o, or gated act(x W_0) * (x W_1) W_o; T5 drops
    out act(...) inside it (`feed_forward_dropout_rate`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        act = activation_fn(cfg.activation)
        axes = (ax.EMBED, ax.MLP)
        if cfg.activation.gated:
            h = act(Dense(cfg, cfg.d_ff, axes, name="wi_0")(x)) * Dense(cfg, cfg.d_ff, axes, name="wi_1")(x)
        else:
            h = act(Dense(cfg, cfg.d_ff, axes, name="wi")(x))  # [B, T, F]
        h = nn.Dropout(cfg.feed_forward_dropout_rate)(h, deterministic=deterministic)
        out = Dense(cfg, cfg.d_model, (ax.MLP, ax.EMBED), init_scale=residual_scale(cfg), name="wo")
        return out(h)  # [B, T, D]


@struct.dataclass
class BlockInputs:
    """What every Block of a stack shares: nn.scan broadcasts it to all layers."""

    self_mask: Mask  # AttentionMask, or bool [B, 1, T, S]
    positions: jax.Array  # [B, T] int, token positions (rotary encoding)
    cache_index: jax.Array | None = None  # [] int32, first cache slot written; None without a cache
    self_bias: Bias = None  # RelativeBias (T5), or float [B, N, T, S], on the self-attention logits
    encoded: jax.Array | None = None  # [B, S, D] encoder output for cross-attention; None once cached
    cross_mask: Mask = None  # AttentionMask [B, 1, T, S] over the encoder tokens


# Block.__call__(self, x, caches, inputs, deterministic): `deterministic` is static under nn.remat.
DETERMINISTIC_ARGNUM = 4


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
        inputs: BlockInputs,
        deterministic: bool,
    ) -> tuple[jax.Array, tuple[KVCache | None, KVCache | None]]:
        """x: [B, T, D] -> [B, T, D], with the (self, cross) attention caches updated.

        Arguments are positional so that the block can be scanned and rematerialised.
        """
        cfg = self.config
        self_cache, cross_cache = caches
        x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))
        pre_norm = cfg.norm_position == NormPosition.PRE

        def sublayer_input(x, name):  # pre-LN: norm(x)
            return norm(cfg, name=f"{name}_norm")(x) if pre_norm else x

        def residual(x, h, name):  # x + dropout(h); post-LN: norm of that
            x = x + nn.Dropout(cfg.dropout_rate, name=f"{name}_dropout")(h, deterministic=deterministic)
            return x if pre_norm else norm(cfg, name=f"{name}_norm")(x)

        h, self_cache = MultiHeadAttention(cfg, name="self_attention")(
            sublayer_input(x, "self_attention"), inputs.self_mask, positions=inputs.positions,
            bias=inputs.self_bias, cache=self_cache, cache_index=inputs.cache_index, deterministic=deterministic,
        )
        x = residual(x, h, "self_attention")
        if self.has_cross_attention:
            h, cross_cache = MultiHeadAttention(cfg, is_cross_attention=True, name="cross_attention")(
                sublayer_input(x, "cross_attention"), inputs.cross_mask, kv_input=inputs.encoded,
                cache=cross_cache, deterministic=deterministic,
            )
            x = residual(x, h, "cross_attention")
        h = FeedForward(cfg, name="feed_forward")(sublayer_input(x, "feed_forward"), deterministic)
        return residual(x, h, "feed_forward"), (self_cache, cross_cache)
