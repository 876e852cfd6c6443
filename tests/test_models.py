"""Behaviour of the task models: causality, bidirectionality, padding, packing, caching."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from conftest import RNG, abstract_params, init_inputs, preset

ATOL = 1e-5  # float32 logits of order 1


@functools.cache
def init(model):
    """Variables of `model`, initialised once per model (parameters do not depend on lengths)."""
    return jax.jit(model.init)(RNG, *init_inputs(model))


@functools.cache
def _compiled_apply(model):
    return jax.jit(model.apply, static_argnames=("deterministic", "method"))


def apply(model, variables, *args, **kwargs):
    """model.apply, compiled once per model, shapes and static arguments (eager scans are slow)."""
    return _compiled_apply(model)(variables, *args, **kwargs)


# Decoder-only variants covering every position encoding and norm placement.
DECODERS = {
    "gpt2 (learned, pre-LN)": preset("gpt2-tiny"),
    "llama (rope, GQA, swiglu)": preset("llama-tiny"),
    "t5 decoder (relative bias)": preset("t5-tiny", num_encoder_layers=0),
    "2017 decoder (sinusoidal, post-LN)": preset("transformer-tiny", num_encoder_layers=0),
    "gpt2, chunked attention": preset("gpt2-tiny", attention_implementation="chunked"),
    "gpt2, reference attention": preset("gpt2-tiny", attention_implementation="reference"),
}
SEQ2SEQ = {"t5": preset("t5-tiny"), "2017": preset("transformer-tiny")}


def random_tokens(shape, vocab, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, vocab)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_is_causal(name):
    """Changing token t never changes logits before t, and does change them from t on."""
    cfg = DECODERS[name]
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((2, 12), cfg.vocab_size)
    variables = init(model)
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    before, after = apply(model, variables, tokens), apply(model, variables, changed)
    np.testing.assert_allclose(before[:, :t], after[:, :t], atol=ATOL)
    assert jnp.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_encoder_is_bidirectional():
    """In an encoder, changing token t changes the outputs at earlier positions too."""
    cfg = preset("bert-tiny")
    model = tfm.MaskedLM(cfg)
    tokens = random_tokens((2, 12), cfg.vocab_size)
    variables = init(model)
    changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % cfg.vocab_size)
    difference = jnp.abs(apply(model, variables, tokens) - apply(model, variables, changed)).max(axis=-1)
    assert difference[:, :8].min() > 1e-4


def _padded(tokens, pad_length, vocab):
    """Appends `pad_length` random (garbage) tokens marked as padding by segment id 0."""
    batch, length = tokens.shape
    padding = random_tokens((batch, pad_length), vocab, seed=7)
    segments = jnp.concatenate([jnp.ones((batch, length), jnp.int32), jnp.zeros((batch, pad_length), jnp.int32)], 1)
    return jnp.concatenate([tokens, padding], axis=1), segments


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_padding_never_changes_real_positions_decoder(name):
    cfg = DECODERS[name]
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((2, 8), cfg.vocab_size)
    padded, segments = _padded(tokens, 5, cfg.vocab_size)
    variables = init(model)
    np.testing.assert_allclose(
        apply(model, variables, padded, segment_ids=segments)[:, :8], apply(model, variables, tokens), atol=ATOL
    )


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_padding_never_changes_real_positions_encoder(implementation):
    cfg = preset("bert-tiny", attention_implementation=implementation)
    model = tfm.TokenClassifier(cfg, num_labels=3)
    tokens = random_tokens((2, 8), cfg.vocab_size)
    padded, segments = _padded(tokens, 5, cfg.vocab_size)
    variables = init(model)
    np.testing.assert_allclose(
        apply(model, variables, padded, segment_ids=segments)[:, :8], apply(model, variables, tokens), atol=ATOL
    )


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_padding_never_changes_real_positions_seq2seq(name):
    cfg = SEQ2SEQ[name]
    model = tfm.Seq2SeqLM(cfg)
    source, target = random_tokens((2, 7), cfg.vocab_size), random_tokens((2, 5), cfg.vocab_size, seed=1)
    padded_source, source_segments = _padded(source, 4, cfg.vocab_size)
    padded_target, target_segments = _padded(target, 3, cfg.vocab_size)
    variables = init(model)
    padded = apply(
        model, variables, padded_source, padded_target,
        source_segment_ids=source_segments, target_segment_ids=target_segments,
    )
    np.testing.assert_allclose(padded[:, :5], apply(model, variables, source, target), atol=ATOL)


def _packed(documents):
    """One row holding the documents back to back, with segment ids 1, 2, ... and restarting positions."""
    tokens = jnp.concatenate(documents, axis=1)
    segments = jnp.concatenate([jnp.full(d.shape, i + 1, jnp.int32) for i, d in enumerate(documents)], axis=1)
    positions = jnp.concatenate([jnp.arange(d.shape[1])[None] for d in documents], axis=1)
    return tokens, segments, positions


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_packed_documents_never_attend_to_each_other(name):
    """A row packing two documents gives each document's logits exactly as if it were alone."""
    cfg = DECODERS[name]
    model = tfm.CausalLM(cfg)
    first, second = random_tokens((1, 5), cfg.vocab_size), random_tokens((1, 7), cfg.vocab_size, seed=1)
    tokens, segments, positions = _packed([first, second])
    variables = init(model)
    packed = apply(model, variables, tokens, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(packed[:, :5], apply(model, variables, first), atol=ATOL)
    np.testing.assert_allclose(packed[:, 5:], apply(model, variables, second), atol=ATOL)


def test_packed_documents_never_attend_to_each_other_encoder():
    cfg = preset("bert-tiny")
    model = tfm.MaskedLM(cfg)
    first, second = random_tokens((1, 5), cfg.vocab_size), random_tokens((1, 7), cfg.vocab_size, seed=1)
    tokens, segments, positions = _packed([first, second])
    variables = init(model)
    packed = apply(model, variables, tokens, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(packed[:, :5], apply(model, variables, first), atol=ATOL)
    np.testing.assert_allclose(packed[:, 5:], apply(model, variables, second), atol=ATOL)


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_seq2seq_decoder_reads_the_source_and_is_causal(name):
    """The decoder output depends on every source token (cross-attention) and only on earlier targets."""
    cfg = SEQ2SEQ[name]
    model = tfm.Seq2SeqLM(cfg)
    source, target = random_tokens((2, 7), cfg.vocab_size), random_tokens((2, 6), cfg.vocab_size, seed=1)
    variables = init(model)
    logits = apply(model, variables, source, target)
    for s in (0, 6):
        changed_source = source.at[:, s].set((source[:, s] + 1) % cfg.vocab_size)
        assert jnp.abs(apply(model, variables, changed_source, target) - logits).max(axis=-1).min() > 1e-4
    changed_target = target.at[:, 3].set((target[:, 3] + 1) % cfg.vocab_size)
    after = apply(model, variables, source, changed_target)
    np.testing.assert_allclose(after[:, :3], logits[:, :3], atol=ATOL)
    assert jnp.abs(after[:, 3:] - logits[:, 3:]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("base", ["t5-tiny", "gpt2-tiny"])
def test_decoder_block_without_cross_attention_is_the_decoder_only_block(base):
    """Silence the cross-attention of an encoder-decoder model and its decoder IS the decoder-only model.

    With pre-LN blocks, zeroing the cross-attention output projection turns that residual
    sub-layer into the identity; the rest of every decoder block then has exactly the
    parameters and the computation of the decoder-only model's block.
    """
    cfg = preset(base, num_encoder_layers=2, num_decoder_layers=2)
    seq2seq, causal = tfm.Seq2SeqLM(cfg), tfm.CausalLM(cfg.replace(num_encoder_layers=0))
    source, target = random_tokens((2, 5), cfg.vocab_size), random_tokens((2, 6), cfg.vocab_size, seed=1)
    params = nn.meta.unbox(init(seq2seq)["params"])
    cross_out = params["decoder"]["layers"]["cross_attention"]["out"]
    cross_out = jax.tree.map(jnp.zeros_like, cross_out)
    params["decoder"]["layers"]["cross_attention"]["out"] = cross_out

    layers = {k: v for k, v in params["decoder"]["layers"].items() if not k.startswith("cross_attention")}
    causal_params = {"embed": params["embed"], "decoder": {**params["decoder"], "layers": layers}}
    assert jax.tree.structure(nn.meta.unbox(abstract_params(causal))) == jax.tree.structure(causal_params)

    np.testing.assert_allclose(
        apply(seq2seq, {"params": params}, source, target),
        apply(causal, {"params": causal_params}, target),
        atol=ATOL,
    )


@pytest.mark.parametrize("name", ["gpt2-tiny", "t5-tiny", "bert-tiny", "albert-tiny"])
def test_scanned_stack_equals_python_loop(name):
    """nn.scan over layers computes exactly what a loop over separately named layers does (ALBERT:
    over one shared layer, called once per layer)."""
    cfg = preset(name)
    model, args = {
        "gpt2-tiny": (tfm.CausalLM, 1), "t5-tiny": (tfm.Seq2SeqLM, 2), "bert-tiny": (tfm.MaskedLM, 1),
        "albert-tiny": (tfm.MaskedLM, 1),
    }[name]
    tokens = random_tokens((2, 9), cfg.vocab_size)
    variables = init(model(cfg))
    unrolled, unrolled_variables = tfm.unscanned(model(cfg), variables)
    assert not unrolled.config.scan_layers
    assert jax.tree.structure(unrolled_variables["params"]) == jax.tree.structure(
        nn.meta.unbox(abstract_params(unrolled))
    )
    np.testing.assert_allclose(
        apply(unrolled, unrolled_variables, *[tokens] * args), apply(model(cfg), variables, *[tokens] * args),
        atol=ATOL,
    )


@functools.cache
def _loss_and_grad(cfg):
    """Mean log-probability of a fixed batch and its gradient, with dropout active."""
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((2, 10), cfg.vocab_size)
    params = init(tfm.CausalLM(cfg.replace(remat_policy="none")))["params"]

    def loss(params):
        logits = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": RNG})
        return jax.nn.log_softmax(logits).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "policy, scan", [("full", True), ("dots", True), ("dots_no_batch", True), ("full", False)]
)
def test_remat_keeps_loss_and_gradients(policy, scan):
    """Rematerialisation trades memory for compute without changing the loss or its gradient."""
    cfg = tfm.ModelConfig.preset("llama-tiny", dropout_rate=0.1, scan_layers=scan, remat_policy="none")
    loss, grads = _loss_and_grad(cfg)
    remat_loss, remat_grads = _loss_and_grad(cfg.replace(remat_policy=policy))
    np.testing.assert_allclose(loss, remat_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), grads, remat_grads)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_cached_decoding_equals_full_forward(name):
    """Prefilling a prompt and then decoding one token at a time reproduces the full forward pass."""
    cfg = DECODERS[name]
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((2, 10), cfg.vocab_size)
    variables = init(model)
    full = apply(model, variables, tokens)
    logits, cache = apply(model, variables, tokens[:, :4], cache=tfm.init_cache(cfg, 2, 16))
    outputs = [logits]
    for t in range(4, 10):
        logits, cache = apply(model, variables, tokens[:, t : t + 1], cache=cache)
        outputs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, [10, 10])


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_cached_seq2seq_decoding_equals_full_forward(name):
    """The encoder runs once; its keys/values are cached at the first decode call and reused."""
    cfg = SEQ2SEQ[name]
    model = tfm.Seq2SeqLM(cfg)
    source, target = random_tokens((2, 7), cfg.vocab_size), random_tokens((2, 6), cfg.vocab_size, seed=1)
    source_segments = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    variables = init(model)
    full = apply(model, variables, source, target, source_segment_ids=source_segments)
    encoded = apply(model, variables, source, segment_ids=source_segments, method="encode")
    logits, cache = apply(
        model, variables, target[:, :2], encoded, source_segment_ids=source_segments,
        cache=tfm.init_cache(cfg, 2, 8), method="decode",
    )
    layer_shape = (2, 7, cfg.num_kv_heads, cfg.head_dim)
    assert [layer.k.shape for layer in cache.cross_attention] == [layer_shape] * cfg.num_decoder_layers
    outputs = [logits]
    for t in range(2, 6):
        logits, cache = apply(model, variables, target[:, t : t + 1], None, cache=cache, method="decode")
        outputs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=ATOL)


def test_ragged_prompts_decode_like_each_prompt_alone():
    """Right-padded prompts of different lengths share a batch; each row decodes as if alone."""
    cfg = DECODERS["llama (rope, GQA, swiglu)"]
    model = tfm.CausalLM(cfg)
    lengths = [3, 6]
    prompts = [random_tokens((1, n), cfg.vocab_size, seed=n) for n in lengths]
    batch = jnp.concatenate([jnp.pad(p, ((0, 0), (0, 6 - p.shape[1]))) for p in prompts])
    segments = (jnp.arange(6)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)
    variables = init(model)
    logits, cache = apply(model, variables, batch, segment_ids=segments, cache=tfm.init_cache(cfg, 2, 12))
    np.testing.assert_array_equal(cache.lengths, lengths)
    next_tokens = random_tokens((2, 1), cfg.vocab_size, seed=9)
    step_logits, cache = apply(model, variables, next_tokens, cache=cache)
    for row, prompt in enumerate(prompts):
        alone = apply(model, variables, jnp.concatenate([prompt, next_tokens[row : row + 1]], axis=1))
        np.testing.assert_allclose(logits[row, lengths[row] - 1], alone[0, -2], atol=ATOL)
        np.testing.assert_allclose(step_logits[row, 0], alone[0, -1], atol=ATOL)


def test_pretrained_body_moves_under_a_new_head():
    """MLM-pretrained embeddings, encoder and pooler load into a classifier; only its head is new."""
    cfg = preset("bert-tiny")
    tokens = random_tokens((2, 8), cfg.vocab_size)
    pretrained = init(tfm.MaskedLM(cfg, next_sentence_prediction=True))["params"]
    classifier = tfm.SequenceClassifier(cfg, num_labels=3)
    fresh = init(classifier)["params"]
    params, new = tfm.merge_pretrained(fresh, pretrained)
    assert new == ["classifier/bias", "classifier/kernel"]

    def body(p):
        return {k: nn.meta.unbox(p)[k] for k in ("embed", "encoder", "pooler")}

    jax.tree.map(np.testing.assert_array_equal, body(params), body(pretrained))
    assert apply(classifier, {"params": params}, tokens).shape == (2, 3)

    other = abstract_params(tfm.MaskedLM(cfg.replace(vocab_size=512)))
    with pytest.raises(ValueError, match="embed/token/embedding"):
        tfm.merge_pretrained(fresh, other)


def test_dropout_only_in_training_and_reproducible():
    cfg = tfm.ModelConfig.preset("gpt2-tiny")
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((2, 8), cfg.vocab_size)
    variables = init(model)

    def train(seed):
        return apply(model, variables, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)})

    np.testing.assert_array_equal(train(1), train(1))
    assert jnp.abs(train(1) - train(2)).max() > 1e-3
    assert jnp.abs(train(1) - apply(model, variables, tokens)).max() > 1e-3


def test_every_parameter_has_logical_axis_names():
    """Each parameter is boxed with one logical name per dimension; scanned stacks lead with "layers"."""
    for model in [
        tfm.Seq2SeqLM(tfm.ModelConfig.preset("t5-tiny")),
        tfm.MaskedLM(tfm.ModelConfig.preset("bert-tiny"), next_sentence_prediction=True),
        tfm.CausalLM(tfm.ModelConfig.preset("llama-tiny")),
        tfm.MaskedLM(tfm.ModelConfig.preset("albert-tiny"), next_sentence_prediction=True),
    ]:
        params = abstract_params(model)
        boxes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
        for path, box in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )[0]:
            assert len(box.names) == box.value.ndim, path
            assert all(isinstance(n, str) for n in box.names), path
            if any(getattr(k, "key", None) == "layers" for k in path):
                assert box.names[0] == "layers", path


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = preset("gpt2-tiny")
    tokens = random_tokens((2, 8), cfg.vocab_size)
    variables = init(tfm.CausalLM(cfg))
    logits = apply(tfm.CausalLM(cfg.replace(dtype="bfloat16")), variables, tokens)
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
    np.testing.assert_allclose(logits, apply(tfm.CausalLM(cfg), variables, tokens), atol=0.05)


def test_bad_inputs_are_clear_errors():
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="needs a decoder"):
        tfm.CausalLM(tfm.ModelConfig.preset("bert-tiny")).init(RNG, tokens)
    with pytest.raises(ValueError, match="needs an encoder"):
        tfm.SequenceClassifier(tfm.ModelConfig.preset("gpt2-tiny")).init(RNG, tokens)
    cfg = tfm.ModelConfig.preset("gpt2-tiny", max_length=16)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tfm.CausalLM(cfg).init(RNG, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        tfm.CausalLM(cfg).init(RNG, jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tfm.init_cache(cfg, 1, 32)


def test_ids_past_their_tables_are_clear_errors_not_nan():
    """An eager call with positions, token types or tokens past their embedding tables is an
    error: the lookup would give NaN, which attention spreads to every position."""
    gpt = tfm.CausalLM(tfm.ModelConfig.preset("gpt2-tiny", max_length=16))
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = gpt.init(RNG, tokens)
    assert jnp.isfinite(gpt.apply(variables, tokens, positions=jnp.arange(12, 16)[None])).all()
    with pytest.raises(ValueError, match=r"positions run from 14 to 17, outside \[0, 16\) of the learned position"):
        gpt.apply(variables, tokens, positions=jnp.arange(14, 18)[None])
    with pytest.raises(ValueError, match=r"tokens run from 1 to 1024, outside \[0, 1024\)"):
        gpt.apply(variables, tokens.at[0, 2].set(1024))
    bert = tfm.SequenceClassifier(tfm.ModelConfig.preset("bert-tiny"), num_labels=2)
    bert_variables = bert.init(RNG, tokens)
    with pytest.raises(ValueError, match=r"token_types run from 0 to 2, outside \[0, 2\)"):
        bert.apply(bert_variables, tokens, token_types=jnp.array([[0, 1, 2, 0]]))


def test_left_padded_prompts_decode_like_each_prompt_alone():
    """Left padding (segment 0 before the text) works with the cache too: pads are never attended."""
    cfg = DECODERS["t5 decoder (relative bias)"]
    model = tfm.CausalLM(cfg)
    lengths = [3, 6]
    prompts = [random_tokens((1, n), cfg.vocab_size, seed=n) for n in lengths]
    batch = jnp.concatenate([jnp.pad(p, ((0, 0), (6 - p.shape[1], 0))) for p in prompts])
    segments = (jnp.arange(6)[None] >= 6 - jnp.array(lengths)[:, None]).astype(jnp.int32)
    variables = init(model)
    logits, cache = apply(model, variables, batch, segment_ids=segments, cache=tfm.init_cache(cfg, 2, 12))
    np.testing.assert_array_equal(cache.lengths, lengths)
    next_tokens = random_tokens((2, 1), cfg.vocab_size, seed=9)
    step_logits, _ = apply(model, variables, next_tokens, cache=cache)
    for row, prompt in enumerate(prompts):
        alone = apply(model, variables, jnp.concatenate([prompt, next_tokens[row : row + 1]], axis=1))
        np.testing.assert_allclose(logits[row, -1], alone[0, -2], atol=ATOL)
        np.testing.assert_allclose(step_logits[row, 0], alone[0, -1], atol=ATOL)


def test_cache_overflow_is_an_error():
    cfg = preset("gpt2-tiny")
    model = tfm.CausalLM(cfg)
    tokens = random_tokens((1, 3), cfg.vocab_size)
    _, cache = model.apply(init(model), tokens, cache=tfm.init_cache(cfg, 1, 4))
    with pytest.raises(ValueError, match="do not fit the cache: 3 of its 4 slots"):
        model.apply(init(model), tokens, cache=cache)


def test_packed_targets_without_source_segments_see_the_whole_source():
    """Without source segment ids, cross-attention masks padding only: every packed target
    segment attends to the whole source, exactly as when it is decoded alone."""
    cfg = SEQ2SEQ["t5"]
    model = tfm.Seq2SeqLM(cfg)
    source = random_tokens((1, 6), cfg.vocab_size)
    first, second = random_tokens((1, 3), cfg.vocab_size, seed=1), random_tokens((1, 4), cfg.vocab_size, seed=2)
    target, segments, positions = _packed([first, second])
    variables = init(model)
    encoded = apply(model, variables, source, method="encode")
    packed = apply(model, variables, target, encoded, segment_ids=segments, positions=positions, method="decode")
    np.testing.assert_allclose(packed[:, 3:], apply(model, variables, source, second), atol=ATOL)


def test_bfloat16_logits_are_accumulated_in_float32():
    """The output projection accumulates in float32: logits are not merely bfloat16 values cast up."""
    for name in ("gpt2-tiny", "llama-tiny"):  # tied and untied output projections
        cfg = preset(name, dtype="bfloat16")
        model = tfm.CausalLM(cfg)
        logits = apply(model, init(model), random_tokens((2, 8), cfg.vocab_size))
        assert jnp.any(logits != logits.astype(jnp.bfloat16).astype(jnp.float32)), name


def test_pretraining_continues_from_a_masked_lm_run():
    """A masked-LM run loads whole into another masked LM (continued, task-adaptive pretraining):
    its top-level `mlm_bias` leaf too, and the NSP head it no longer uses stays behind."""
    cfg = preset("bert-tiny")
    pretrained = init(tfm.MaskedLM(cfg, next_sentence_prediction=True))["params"]
    pretrained = jax.tree.map(lambda x: x + 1.0, nn.meta.unbox(pretrained))  # unlike a fresh initialisation
    params, new = tfm.merge_pretrained(init(tfm.MaskedLM(cfg))["params"], pretrained)
    assert new == [] and "mlm_bias" in params
    jax.tree.map(np.testing.assert_array_equal, params, {k: pretrained[k] for k in params})


def test_merge_pretrained_refuses_a_different_layer_layout():
    cfg = preset("bert-tiny")
    scanned = init(tfm.MaskedLM(cfg))["params"]
    unscanned = init(tfm.MaskedLM(cfg.replace(scan_layers=False)))["params"]
    with pytest.raises(ValueError, match="'encoder'.*scan_layers"):
        tfm.merge_pretrained(unscanned, scanned)


# Compiled temporary memory of a one-layer decoder (D=64, N=4, H=16, V=1024) with chunked attention
# at 8192 tokens, forward / gradient. Measured when written (jax 0.10.2, CPU):
#   relative bias: 18.5 / 212.7 MiB; rotary: 14.5 / 191.8 MiB.
#   Before the bias was factored: relative 2052 / 4664 MiB. Before chunked attention tied its mask
#   to q, the scanned gradient also kept the whole [T, S] causal mask (rotary: 358 MiB).
MiB = 2**20


@functools.cache
def decoder_temp_bytes(position, gradient, length=8192):
    """Temporary bytes XLA allocates for the decoder's logits (or their gradient), compile only."""
    cfg = preset("t5-tiny", num_encoder_layers=0, num_decoder_layers=1, max_length=length, position=position,
                 attention_implementation="chunked")
    model = tfm.CausalLM(cfg)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    params = jax.eval_shape(model.init, RNG, tokens)
    fn = jax.grad(lambda params, tokens: model.apply(params, tokens).mean()) if gradient else model.apply
    return jax.jit(fn).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("gradient", [False, True])
def test_relative_bias_keeps_chunked_attention_linear_in_memory(gradient):
    """At 8192 tokens a T5-style decoder with chunked attention needs about the memory of the same
    decoder with rotary positions: its relative bias is built block by block, never as a dense
    [B, N, T, S] array (1 GiB here), and no [T, S] mask or bias is kept for the backward pass."""
    relative, rotary = decoder_temp_bytes("relative", gradient), decoder_temp_bytes("rope", gradient)
    assert relative < 1.25 * rotary + 16 * MiB, (relative / MiB, rotary / MiB)
    assert relative < 256 * MiB, relative / MiB


def test_a_new_encoder_output_replaces_the_cached_cross_attention_in_both_stacks():
    """Decoding with a cache filled from source A and the encoder output of source B attends to
    B from then on, scanned or not (the unscanned loop once kept A's keys and values)."""
    cfg = preset("t5-tiny")
    variables = init(tfm.Seq2SeqLM(cfg))
    models = {"scanned": (tfm.Seq2SeqLM(cfg), variables), "loop": tfm.unscanned(tfm.Seq2SeqLM(cfg), variables)}
    source_a, source_b = random_tokens((2, 6), cfg.vocab_size, seed=1), random_tokens((2, 6), cfg.vocab_size, seed=2)
    start = jnp.full((2, 1), 2, jnp.int32)
    caches = {}
    for name, (model, params) in models.items():
        encode = lambda source: apply(model, params, source, method="encode")  # noqa: E731
        _, cache = apply(model, params, start, encode(source_a), cache=tfm.init_cache(cfg, 2, 4), method="decode")
        _, cache = apply(model, params, start, encode(source_b), cache=cache, method="decode")
        _, fresh = apply(model, params, start, encode(source_b), cache=tfm.init_cache(cfg, 2, 4), method="decode")
        keys = np.stack([layer.k for layer in cache.cross_attention])
        np.testing.assert_allclose(keys, np.stack([layer.k for layer in fresh.cross_attention]), atol=ATOL)
        caches[name] = keys
    np.testing.assert_allclose(caches["scanned"], caches["loop"], atol=ATOL)


@pytest.mark.parametrize("restricted_starts", [False, True])
def test_best_spans_equal_a_brute_force_search(restricted_starts):
    """The span picker against every (start, end) pair tried in Python: valid spans only (start <=
    end, at most max_length tokens, both in the context, the start among `starts` where given),
    the highest summed logit."""
    rng = np.random.default_rng(0)
    batch, length, longest = 64, 12, 4
    start, end = rng.normal(size=(2, batch, length)).astype(np.float32)
    context = rng.random((batch, length)) < 0.6
    context[0] = False  # a row with no context: no span
    starts = (rng.random((batch, length)) < 0.5) & context if restricted_starts else context
    got_start, got_end, got_score = map(np.asarray, tfm.best_spans(
        start, end, context, max_length=longest, starts=starts if restricted_starts else None))
    for row in range(batch):
        spans = [(start[row, i] + end[row, j], i, j) for i in range(length) for j in range(i, min(i + longest, length))
                 if starts[row, i] and context[row, j]]
        if not spans:
            assert got_score[row] == -np.inf
            continue
        score, i, j = max(spans)
        assert (got_start[row], got_end[row]) == (i, j) and got_score[row] == pytest.approx(score)
    with pytest.raises(ValueError, match="at least one token"):
        tfm.best_spans(start, end, context, max_length=0)
