"""Attention weights of a forward pass are the model's real attention, and plot as a PNG."""

import jax
import jax.numpy as jnp
import numpy as np

import transformer as tfm
from conftest import preset


def test_attention_maps_show_causality_padding_and_every_layer():
    cfg = preset("t5-tiny")
    model = tfm.Seq2SeqLM(cfg)
    source, target = jnp.array([[5, 6, 7, 8, 9]]), jnp.array([[2, 5, 6]])
    source_segments = jnp.array([[1, 1, 1, 0, 0]])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), source, target)
    maps = tfm.attention_maps(model, variables, source, target, source_segment_ids=source_segments)
    assert set(maps) == {"encoder/self_attention", "decoder/self_attention", "decoder/cross_attention"}
    decoder_self = np.asarray(maps["decoder/self_attention"])  # [L, B, N, T, T]
    assert decoder_self.shape == (cfg.num_decoder_layers, 1, cfg.num_heads, 3, 3)
    np.testing.assert_allclose(decoder_self.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(np.ones((3, 3)), k=1) * decoder_self == 0)  # no weight on future tokens
    cross = np.asarray(maps["decoder/cross_attention"])
    assert np.all(cross[..., 3:] == 0) and np.all(cross[..., :3] > 0)  # source padding gets nothing


def test_plot_attention_writes_a_png(tmp_path):
    weights = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    path = tmp_path / "attention.png"
    tfm.plot_attention(weights, path, query_labels=list("abcd"), key_labels=list("abcd"), title="layer 0 head 0")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
