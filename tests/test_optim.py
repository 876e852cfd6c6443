"""The optimizer: which parameters weight decay reaches, and the learning rate each update gets."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import transformer as tfm
from conftest import abstract_params
from train import optim


def decayed_paths(model) -> dict[str, bool]:
    """'path/to/leaf' -> whether it decays, for the model's (abstract, boxed) parameters; the layers
    of an unscanned stack ('layers_0', 'layers_1') are named 'layers', as in a scanned one."""
    mask = optim.decay_mask(abstract_params(model))
    out = {}
    for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        out["/".join("layers" if n.startswith("layers_") else n for n in names)] = bool(decays)
    return out


MODELS = {
    "gpt2-tiny": tfm.CausalLM,
    "llama-tiny": tfm.CausalLM,
    "bert-tiny": functools.partial(tfm.MaskedLM, next_sentence_prediction=True),
    "t5-tiny": tfm.Seq2SeqLM,
}


@pytest.mark.parametrize("preset", MODELS)
def test_scanned_and_unscanned_layers_decay_the_same_parameters(preset):
    cfg = tfm.ModelConfig.preset(preset)
    scanned = decayed_paths(MODELS[preset](cfg.replace(scan_layers=True)))
    assert decayed_paths(MODELS[preset](cfg.replace(scan_layers=False))) == scanned


def test_matrices_and_embeddings_decay_biases_norms_and_relative_bias_do_not():
    bert = decayed_paths(MODELS["bert-tiny"](tfm.ModelConfig.preset("bert-tiny")))
    assert {path for path, decays in bert.items() if decays} == {
        "embed/token/embedding", "embed/position/embedding", "embed/token_type/embedding",
        *(f"encoder/layers/self_attention/{p}/kernel" for p in ("query", "key", "value", "out")),
        "encoder/layers/feed_forward/wi/kernel", "encoder/layers/feed_forward/wo/kernel",
        "mlm_transform/kernel", "pooler/kernel", "nsp_head/kernel",
    }
    t5 = decayed_paths(MODELS["t5-tiny"](tfm.ModelConfig.preset("t5-tiny")))
    assert not t5["encoder/relative_position_bias/embedding"] and not t5["decoder/relative_position_bias/embedding"]
    assert not t5["encoder/layers/self_attention_norm/scale"] and t5["decoder/layers/cross_attention/query/kernel"]


def applied_learning_rates(schedule, updates: int) -> np.ndarray:
    """The step size each of `updates` AdamW updates takes: with a constant gradient Adam's
    direction is exactly 1 (bias-corrected), so the update is -learning_rate."""
    optimizer = optim.make_optimizer(schedule, weight_decay=0.0, grad_clip=None, eps=0.0)
    params = {"kernel": jnp.zeros(())}

    def update(opt_state, _):
        change, opt_state = optimizer.update({"kernel": jnp.ones(())}, opt_state, params)
        return opt_state, -change["kernel"]

    return np.asarray(jax.lax.scan(update, optimizer.init(params), length=updates)[1])


def test_inverse_sqrt_is_the_papers_formula_for_every_update():
    """Vaswani et al. 2017: lrate = d_model**-0.5 * min(n**-0.5, n * warmup**-1.5) for update n = 1, 2, ..."""
    d_model, warmup, updates = 512, 4000, 20_000
    schedule = optim.learning_rate_schedule("inverse_sqrt", d_model**-0.5 * warmup**-0.5, warmup, updates)
    n = np.arange(1, updates + 1, dtype=np.float64)
    paper = d_model**-0.5 * np.minimum(n**-0.5, n * warmup**-1.5)
    applied = applied_learning_rates(schedule, updates)
    np.testing.assert_allclose(applied, paper, rtol=1e-5)
    np.testing.assert_allclose(applied[[0, warmup - 1, -1]], [1.75e-7, 7.0e-4, 3.125e-4], rtol=2e-3)


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_warmup_starts_above_zero_and_reaches_the_peak(name):
    peak, warmup, total = 1e-3, 10, 50
    applied = applied_learning_rates(optim.learning_rate_schedule(name, peak, warmup, total), total)
    np.testing.assert_allclose(applied[:warmup], peak * np.arange(1, warmup + 1) / warmup, rtol=1e-5)
    if name == "constant":
        np.testing.assert_allclose(applied[warmup:], peak, rtol=1e-5)
    else:  # half-cosine from the peak to 10% of it, reached on the last update
        n = np.arange(warmup + 1, total + 1)
        cosine = 0.1 * peak + 0.9 * peak * 0.5 * (1 + np.cos(math.pi * (n - warmup) / (total - warmup)))
        np.testing.assert_allclose(applied[warmup:], cosine, rtol=1e-5)
        assert applied[-1] == pytest.approx(0.1 * peak, rel=1e-5)


def test_weight_decay_shrinks_matrices_only():
    """A zero gradient leaves biases as they are; a matrix shrinks by learning_rate * decay."""
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2, 2))}}  # a bias of rank 2, as when scanned
    optimizer = optim.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, grad_clip=None)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.05)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    assert optim.decay_mask(jnp.ones((2, 2))) is False  # a bare array names nothing to decay
