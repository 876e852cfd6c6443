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


def test_attention_maps_of_a_shared_layer_are_one_per_call():
    """ALBERT's one layer, called once per layer: a map per call, in order, scanned or not; the
    layers differ (each reads the previous one's output)."""
    cfg = preset("albert-tiny")
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    variables = jax.jit(tfm.EncoderModel(cfg).init)(jax.random.PRNGKey(0), tokens)
    scanned = tfm.attention_maps(tfm.EncoderModel(cfg), variables, tokens)["encoder/self_attention"]
    looped = tfm.attention_maps(tfm.EncoderModel(cfg.replace(scan_layers=False)), variables, tokens)
    assert scanned.shape == (cfg.num_encoder_layers, 1, cfg.num_heads, 5, 5)
    np.testing.assert_allclose(looped["encoder/self_attention"], scanned, atol=1e-6)
    assert np.abs(np.asarray(scanned[0] - scanned[1])).max() > 1e-4


def test_plot_attention_draws_each_weight_in_its_cell(tmp_path):
    """The PNG shows the weights in viridis, queries down and keys across: a lower-triangular
    map has its zeros above the diagonal and its one weight of 1 in the top-left cell."""
    import matplotlib
    import matplotlib.image

    weights = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]  # rows: 1; 1/2 1/2; 1/3 x3; 1/4 x4
    path = tmp_path / "attention.png"
    tfm.plot_attention(weights, path, query_labels=list("abcd"), key_labels=list("abcd"), title="layer 0 head 0")
    pixels = matplotlib.image.imread(path)[..., :3]  # [height, width, RGB] in [0, 1]

    def where(weight):
        colour = np.asarray(matplotlib.colormaps["viridis"](weight)[:3])
        return np.argwhere(np.abs(pixels - colour).max(-1) < 0.01)  # [pixels, (y, x)]

    zero, one, quarter = where(0.0), where(1.0), where(0.25)
    # Pixel areas in proportion to the cells: 6 zeros, 1 one, 4 quarters (the colour bar adds a few).
    assert 4.5 < len(zero) / len(one) < 7.5 and 3 < len(quarter) / len(one) < 5, (len(zero), len(one), len(quarter))
    (_, one_x), (zero_y, zero_x), (quarter_y, _) = one.mean(0), np.median(zero, 0), quarter.mean(0)
    assert zero_x > one_x and zero_y < quarter_y  # above the diagonal; the last query at the bottom
