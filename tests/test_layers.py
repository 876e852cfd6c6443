"""MultiHeadAttention with an explicit cache; the one Block serves every architecture."""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from conftest import RNG, abstract_params, init_inputs, preset
from transformer import layers
from transformer.sharding import LOGICAL_AXIS_RULES

ATOL = 1e-5  # float32, values of order 1

CONFIGS = {
    "mha": preset("gpt2-tiny"),
    "gqa-rope": preset("llama-tiny"),
    "mqa-chunked": preset("llama-tiny", num_kv_heads=1, attention_implementation="chunked"),
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

    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
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
    assert cache.k.shape == (2, 7, cfg.num_kv_heads, cfg.head_dim)
    assert same_cache is cache
    with pytest.raises(ValueError, match="encoder output"):
        attention.apply(variables, decoder_x, mask)


def test_one_block_class_for_all_three_architectures():
    """Encoder, decoder-only and encoder-decoder stacks are built from the same Block."""
    shapes = {
        "encoder": abstract_params(tfm.MaskedLM(tfm.ModelConfig.preset("bert-tiny"))),
        "decoder-only": abstract_params(tfm.CausalLM(tfm.ModelConfig.preset("gpt2-tiny"))),
        "encoder-decoder": abstract_params(tfm.Seq2SeqLM(tfm.ModelConfig.preset("t5-tiny"))),
    }
    assert sorted(shapes["encoder"]["encoder"]["layers"]) == sorted(shapes["decoder-only"]["decoder"]["layers"])
    enc_dec_layers = shapes["encoder-decoder"]["decoder"]["layers"]
    assert {"cross_attention", "cross_attention_norm"} <= set(enc_dec_layers)
    assert "cross_attention" not in shapes["encoder-decoder"]["encoder"]["layers"]


def test_remat_static_argnum_names_deterministic():
    """nn.remat marks Block's `deterministic` static by position (self = 0); the constant must follow
    the signature."""
    parameters = list(inspect.signature(tfm.Block.__call__).parameters)
    assert parameters[layers.DETERMINISTIC_ARGNUM] == "deterministic"


def test_block_with_inputs_is_the_layer_of_a_stack():
    """Block(x, caches, BlockInputs, deterministic) computes layer 0 of a one-layer (post-LN) stack."""
    cfg = preset("transformer-tiny", num_encoder_layers=0, num_decoder_layers=1, scan_layers=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.d_model))
    segments = jnp.ones((2, 5), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    stack = tfm.Stack(cfg, 1, causal=True)
    variables = stack.init(jax.random.PRNGKey(1), x, segments, positions)
    expected, _ = stack.apply(variables, x, segments, positions)
    inputs = layers.BlockInputs(tfm.self_attention_mask(segments, positions, causal=True), positions)
    block_variables = {"params": variables["params"]["layers_0"]}
    out, caches = tfm.Block(cfg).apply(block_variables, x, (None, None), inputs, True)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    assert caches == (None, None)


def test_model_runs_under_a_mesh_with_logical_rules():
    """Every parameter's logical names fit its rank, so init and apply work with the constraints
    active (nn.DenseGeneral's 2-D init of an N-D kernel did not: flax#3676)."""
    model = tfm.CausalLM(preset("llama-tiny"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        variables = jax.jit(model.init)(RNG, *init_inputs(model))
        logits = jax.jit(model.apply)(variables, *init_inputs(model))
    assert logits.shape == (1, 4, model.config.vocab_size)


def test_float32_logits_gradient_runs_in_the_compute_dtype():
    """The output head returns float32 logits, but its gradient products stay in the compute
    dtype (bfloat16 inputs: no float32 x float32 product over the vocabulary), and equal the
    plain product's gradient in float32."""
    numbers = (((2,), (1,)), ((), ()))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 8))

    def loss(dot, x, kernel):
        return jnp.sum(jnp.sin(dot(x, kernel)))

    plain = lambda x, kernel: jnp.einsum("btd,vd->btv", x, kernel)  # noqa: E731
    dot = functools.partial(layers.float32_dot, dimension_numbers=numbers)
    for ours, reference in zip(jax.grad(loss, (1, 2))(dot, x, kernel),
                               jax.grad(loss, (1, 2))(plain, x, kernel)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)

    hessian_vector = jax.jvp(jax.grad(functools.partial(loss, dot, x)), (kernel,), (kernel,))[1]  # forward mode too
    np.testing.assert_allclose(hessian_vector, jax.jvp(jax.grad(functools.partial(loss, plain, x)), (kernel,), (kernel,))[1],
                               rtol=1e-5, atol=1e-5)

    low = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert layers.float32_dot(*low, numbers).dtype == jnp.float32
    gradient = jax.jit(jax.grad(lambda x, kernel: loss(lambda a, b: layers.float32_dot(a, b, numbers), x, kernel), (0, 1)))
    products = [line for line in gradient.lower(*low).as_text().splitlines() if "dot_general" in line]
    assert len(products) == 3  # forward, and the gradients of x and kernel
    assert all(line.split(":")[-1].split("->")[0].count("bf16") == 2 for line in products), products


def test_dense_contracts_trailing_axes_as_einsum_and_refuses_others():
    """Dense's one 2-D product computes the contraction over its trailing `axis` dims (checked
    against einsum); a leading axis is a clear error, not a silently wrong reshape."""
    cfg = preset("gpt2-tiny")
    x = jax.random.normal(RNG, (2, 3, 4, 5))
    dense = layers.Dense(cfg, features=(6, 7), axes=("heads", "kv", "embed", "mlp"), axis=(-2, -1), use_bias=False)
    params = dense.init(RNG, x)
    kernel = nn.meta.unbox(params)["params"]["kernel"]  # [4, 5, 6, 7]
    np.testing.assert_allclose(dense.apply(params, x), jnp.einsum("btkh,khfo->btfo", x, kernel), rtol=1e-5, atol=1e-6)
    leading = layers.Dense(cfg, features=6, axes=("batch", "mlp"), axis=0, use_bias=False)
    with pytest.raises(ValueError, match="trailing axes"):
        leading.init(RNG, x)


def test_gpt2_scaled_residual_init():
    """scale_residual_init: the projections into the residual stream (attention out, feed-forward
    out) start at 0.02 / sqrt(2L), every other matrix at 0.02 (GPT-2's initialisation)."""
    cfg = preset("gpt2-tiny").replace(d_model=256, d_ff=1024, num_decoder_layers=8, scale_residual_init=True)
    params = nn.unbox(jax.jit(tfm.CausalLM(cfg).init)(RNG, jnp.ones((1, 4), jnp.int32))["params"])
    layers_ = params["decoder"]["layers"]
    residual = 0.02 / np.sqrt(2 * 8)
    for kernel, expected in [(layers_["self_attention"]["out"]["kernel"], residual),
                             (layers_["feed_forward"]["wo"]["kernel"], residual),
                             (layers_["self_attention"]["query"]["kernel"], 0.02),
                             (layers_["feed_forward"]["wi"]["kernel"], 0.02)]:
        assert np.std(np.asarray(kernel)) == pytest.approx(expected, rel=0.02)
    plain = nn.unbox(jax.jit(tfm.CausalLM(cfg.replace(scale_residual_init=False)).init)(RNG, jnp.ones((1, 4), jnp.int32)))
    assert np.std(np.asarray(plain["params"]["decoder"]["layers"]["feed_forward"]["wo"]["kernel"])) == pytest.approx(
        0.02, rel=0.02)


def test_t5_fan_in_initialisation():
    """T5's initialisation (Initialisation.FAN_IN, the T5 presets'): every matrix at
    1 / sqrt(fan_in), the query at 1 / sqrt(d_model * H) (it carries the logit scaling T5 leaves
    out), embeddings at 1; the 0.02 of BERT and GPT otherwise."""
    cfg = preset("t5-tiny").replace(d_model=256, num_heads=4, d_ff=1024, vocab_size=2048)
    source, target = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)
    params = nn.unbox(jax.jit(tfm.Seq2SeqLM(cfg).init)(RNG, source, target)["params"])
    layers_ = params["decoder"]["layers"]
    for kernel, expected in [(params["embed"]["token"]["embedding"], 1.0),
                             (layers_["self_attention"]["query"]["kernel"], (256 * 64) ** -0.5),
                             (layers_["cross_attention"]["key"]["kernel"], 256**-0.5),
                             (layers_["self_attention"]["out"]["kernel"], 256**-0.5),
                             (layers_["feed_forward"]["wi"]["kernel"], 256**-0.5),
                             (layers_["feed_forward"]["wo"]["kernel"], 1024**-0.5)]:
        assert np.std(np.asarray(kernel)) == pytest.approx(expected, rel=0.03)
    bert = nn.unbox(jax.jit(tfm.MaskedLM(preset("bert-tiny")).init)(RNG, source)["params"])
    assert np.std(np.asarray(bert["embed"]["token"]["embedding"])) == pytest.approx(0.02, rel=0.03)


def test_feed_forward_dropout_is_unbiased_inside_the_layer():
    """T5's dropout on the feed-forward's hidden activations: each draw differs, their mean is the
    layer without dropout (inverted dropout before a linear map), and nothing changes when
    deterministic or at rate 0."""
    cfg = preset("t5-tiny").replace(d_model=16, d_ff=32, feed_forward_dropout_rate=0.5)
    x = jax.random.normal(RNG, (1, 3, 16))
    ff = layers.FeedForward(cfg)
    variables = ff.init(RNG, x)
    exact = ff.apply(variables, x)
    draws = jax.vmap(lambda key: ff.apply(variables, x, False, rngs={"dropout": key}))(jax.random.split(RNG, 4000))
    assert np.abs(np.asarray(draws[0] - draws[1])).max() > 1e-3
    np.testing.assert_allclose(draws.mean(0), exact, atol=0.03 * float(np.abs(exact).max()))
    no_dropout = layers.FeedForward(cfg.replace(feed_forward_dropout_rate=0.0))
    np.testing.assert_array_equal(no_dropout.apply(variables, x, False, rngs={"dropout": RNG}), exact)
