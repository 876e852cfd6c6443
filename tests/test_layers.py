"""MultiHeadAttention with an explicit cache; the one Block serves every architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm

ATOL = 1e-5  # float32, values of order 1

CONFIGS = {
    "mha": tfm.ModelConfig.preset("gpt2-tiny", dropout_rate=0.0, attention_dropout_rate=0.0),
    "gqa-rope": tfm.ModelConfig.preset("llama-tiny"),
    "mqa-chunked": tfm.ModelConfig.preset("llama-tiny", num_kv_heads=1, attention_implementation="chunked"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_single_token_attention_equals_full_forward(name):
    """Feeding tokens one at a time through the KV cache gives the full causal pass at every position."""
    cfg = CONFIGS[name]
    batch, length = 2, 9
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)
    attention = tfm.MultiHeadAttention(cfg)
    full_mask = tfm.self_attention_mask(segments, positions, causal=True)
    variables = attention.init(jax.random.PRNGKey(1), x, full_mask, positions=positions)
    full, no_cache = attention.apply(variables, x, full_mask, positions=positions)
    assert no_cache is None

    shape = (batch, length, cfg.kv_heads, cfg.dim_per_head)
    cache = tfm.KVCache(jnp.zeros(shape), jnp.zeros(shape))
    slots = positions
    step = jax.jit(lambda c, xt, t: attention.apply(
        variables, xt,
        tfm.AttentionMask(
            jnp.ones((batch, 1), jnp.int32), (slots <= t).astype(jnp.int32),
            jnp.full((batch, 1), t), slots, causal=True,
        ),
        positions=jnp.full((batch, 1), t), cache=c, cache_index=t,
    ))
    for t in range(length):
        out, cache = step(cache, x[:, t : t + 1], t)
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=ATOL)


def test_cross_attention_cache_equals_recomputing_keys_and_values():
    """Cross-attention returns the encoder K/V once; reusing them equals recomputing them."""
    cfg = CONFIGS["gqa-rope"]
    decoder_x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, cfg.d_model))
    encoded = jax.random.normal(jax.random.PRNGKey(1), (2, 7, cfg.d_model))
    mask = tfm.cross_attention_mask(jnp.ones((2, 3), jnp.int32), jnp.array([[1] * 7, [1] * 4 + [0] * 3]))
    attention = tfm.MultiHeadAttention(cfg, is_cross_attention=True)
    variables = attention.init(jax.random.PRNGKey(2), decoder_x, mask, kv_input=encoded)
    fresh, cache = attention.apply(variables, decoder_x, mask, kv_input=encoded)
    reused, same_cache = attention.apply(variables, decoder_x, mask, cache=cache)
    np.testing.assert_array_equal(fresh, reused)
    assert cache.k.shape == (2, 7, cfg.kv_heads, cfg.dim_per_head)
    assert same_cache is cache
    with pytest.raises(ValueError, match="encoder output"):
        attention.apply(variables, decoder_x, mask)


def test_one_block_class_for_all_three_architectures():
    """Encoder, decoder-only and encoder-decoder stacks are built from the same Block."""
    shapes = {}
    for name, model, args in [
        ("encoder", tfm.MaskedLM(tfm.ModelConfig.preset("bert-tiny")), 1),
        ("decoder-only", tfm.CausalLM(tfm.ModelConfig.preset("gpt2-tiny")), 1),
        ("encoder-decoder", tfm.Seq2SeqLM(tfm.ModelConfig.preset("t5-tiny")), 2),
    ]:
        tokens = jnp.zeros((1, 4), jnp.int32)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *([tokens] * args))
        shapes[name] = variables["params"]
    block_keys = lambda layers: sorted(layers)  # noqa: E731
    assert block_keys(shapes["encoder"]["encoder"]["layers"]) == block_keys(
        shapes["decoder-only"]["decoder"]["layers"]
    )
    enc_dec_layers = shapes["encoder-decoder"]["decoder"]["layers"]
    assert {"cross_attention", "cross_attention_norm"} <= set(enc_dec_layers)
    assert "cross_attention" not in shapes["encoder-decoder"]["encoder"]["layers"]
