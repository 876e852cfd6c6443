"""Stacks of Blocks: the encoder and the decoder differ only in the mask and cross-attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import sharding as ax
from transformer.cache import DecoderCache
from transformer.config import ModelConfig, NormPosition, PositionEncoding, RematPolicy
from transformer.layers import DETERMINISTIC_ARGNUM, Block, BlockInputs, RelativePositionBias, norm
from transformer.masks import AttentionMask, cross_attention_mask, self_attention_mask

_REMAT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_saveable,
    RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_class(config: ModelConfig) -> type[Block]:
    """Block, wrapped in nn.remat with the configured policy (unless the policy is "none")."""
    if config.remat_policy == RematPolicy.NONE:
        return Block
    return nn.remat(
        Block,
        policy=_REMAT_POLICIES[config.remat_policy],
        prevent_cse=not config.scan_layers,
        static_argnums=(DETERMINISTIC_ARGNUM,),
    )


def scan_blocks(config: ModelConfig, num_layers: int, has_cross_attention: bool, *, name: str) -> nn.Module:
    """`num_layers` Blocks as one nn.scan: parameters stacked on a leading "layers" axis (with
    shared layers, one Block's parameters, unstacked).

    The scanned stack computes exactly what a Python loop over `num_layers` Blocks does
    (tests/test_models.py checks it); compile time no longer grows with depth.
    """
    if config.share_layers:  # one Block's parameters, given to every step (ALBERT)
        layout = dict(variable_axes={"intermediates": 0}, variable_broadcast="params",
                      split_rngs={"params": False, "dropout": True})
    else:
        layout = dict(variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True, "dropout": True},
                      metadata_params={nn.PARTITION_NAME: ax.LAYERS})
    scanned = nn.scan(
        block_class(config),
        in_axes=(0, nn.broadcast, nn.broadcast),  # caches per layer; inputs, deterministic shared
        length=num_layers,
        **layout,
    )
    return scanned(config, has_cross_attention, name=name)


def _cross_mask(segment_ids, encoded, encoded_segment_ids, cache) -> tuple[AttentionMask, jax.Array]:
    """The cross-attention mask, and the encoder segment ids [B, S] (the cached ones once the
    encoder keys and values are cached; all 1 when not given)."""
    if encoded is None:
        if cache is None or cache.source_segment_ids is None:
            raise ValueError("A decoder with cross-attention needs the encoder output (encoded=...).")
        encoded_segment_ids = cache.source_segment_ids
    q_segment_ids = segment_ids if cache is None else (segment_ids != 0).astype(jnp.int32)
    if encoded_segment_ids is None:  # no source segments: padding is the only constraint
        encoded_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
        q_segment_ids = (segment_ids != 0).astype(jnp.int32)
    return cross_attention_mask(q_segment_ids, encoded_segment_ids), encoded_segment_ids


class Stack(nn.Module):
    """Blocks over embedded tokens, plus (pre-LN) a final norm.

    causal: decoder self-attention (a token sees itself and earlier tokens) or encoder
        self-attention (every token sees every other in its segment).
    has_cross_attention: decoder of an encoder-decoder model, attending to `encoded`.
    """

    config: ModelConfig
    num_layers: int
    causal: bool
    has_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        *,
        encoded: jax.Array | None = None,
        encoded_segment_ids: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """x: [B, T, D]; segment_ids, positions: [B, T] (segment 0 = padding).

        encoded, encoded_segment_ids: [B, S, D], [B, S] encoder output, for cross-attention;
        with a cache, only on the first call (afterwards its keys and values are cached).
        Without encoded_segment_ids, cross-attention masks decoder padding only; with them,
        a decoder token attends to the encoder tokens of its own segment (packed pairs).
        Returns [B, T, D] and the updated cache (None without one).
        """
        cfg = self.config
        cache_index = None
        if cache is None:
            self_mask = self_attention_mask(segment_ids, positions, causal=self.causal)
            kv_positions = positions
        else:
            is_token = (segment_ids != 0).astype(jnp.int32)
            cache_index = cache.end
            cache = cache.append(is_token, positions)
            kv_positions = cache.positions  # [B, S]
            self_mask = AttentionMask(is_token, cache.segment_ids, positions, kv_positions, causal=self.causal)

        self_bias = None
        if cfg.position == PositionEncoding.RELATIVE:
            relative_bias = RelativePositionBias(cfg, bidirectional=not self.causal, name="relative_position_bias")
            self_bias = relative_bias(positions, kv_positions)  # factored; attention builds [B, N, T, S]

        cross_mask = None
        if self.has_cross_attention:
            cross_mask, encoded_segment_ids = _cross_mask(segment_ids, encoded, encoded_segment_ids, cache)

        caches = (None, None) if cache is None else (cache.self_attention, cache.cross_attention)
        inputs = BlockInputs(self_mask, positions, cache_index, self_bias, encoded, cross_mask)
        if cfg.scan_layers:
            name = "shared_layer" if cfg.share_layers else "layers"
            x, (self_kv, cross_kv) = scan_blocks(cfg, self.num_layers, self.has_cross_attention, name=name)(
                x, _stacked(caches), inputs, deterministic
            )
            if cache is not None:
                self_kv, cross_kv = _unstacked(self_kv, self.num_layers), _unstacked(cross_kv, self.num_layers)
        else:
            x, (self_kv, cross_kv) = self._loop(x, caches, inputs, deterministic)

        if cfg.norm_position == NormPosition.PRE:
            x = norm(cfg, name="final_norm")(x)
        if cache is None:
            return x, None
        if self.has_cross_attention:
            cache = cache.replace(cross_attention=cross_kv, source_segment_ids=encoded_segment_ids)
        return x, cache.replace(self_attention=self_kv)

    def _loop(self, x, caches, inputs, deterministic):
        """The unscanned stack: layers_0 .. layers_{L-1}, each with its own parameters and cache
        (with shared layers, one `shared_layer` called L times, a cache per call)."""
        block, cfg = block_class(self.config), self.config
        shared = block(cfg, self.has_cross_attention, name="shared_layer") if cfg.share_layers else None
        self_kv, cross_kv = caches
        self_out, cross_out = [], []  # each block's caches (cross: new ones only when `encoded` is given)
        for i in range(self.num_layers):
            layer_caches = (None if self_kv is None else self_kv[i], None if cross_kv is None else cross_kv[i])
            layer = shared if shared is not None else block(cfg, self.has_cross_attention, name=f"layers_{i}")
            x, (layer_self, layer_cross) = layer(x, layer_caches, inputs, deterministic)
            self_out.append(layer_self)
            cross_out.append(layer_cross)
        if self_kv is not None:
            self_kv = tuple(self_out)
        if self.has_cross_attention and inputs.encoded is not None:  # a new encoder output replaces the cache's
            cross_kv = tuple(cross_out)
        return x, (self_kv, cross_kv)


def _stacked(caches):
    """Per-layer caches (tuples of KVCache, or None) as KVCaches [L, ...] for nn.scan: a copy of
    every layer at every call, which is why decoding unscans the layers first (`for_decoding`)."""
    return tuple(None if layers is None else jax.tree.map(lambda *a: jnp.stack(a), *layers) for layers in caches)


def _unstacked(stacked, num_layers: int):
    """A KVCache [L, ...] as a tuple of per-layer KVCaches (None stays None)."""
    return None if stacked is None else tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers))
