"""Attention weights of a forward pass, and a heatmap of them."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util


def attention_maps(model: nn.Module, variables, *args, **kwargs) -> dict[str, jax.Array]:
    """Runs `model.apply(variables, *args, **kwargs)` and returns every layer's attention weights.

    Keys name the attention, e.g. "decoder/self_attention" or "decoder/cross_attention"; values
    are float32 [L, B, N, T, S] for scanned stacks (one entry per layer, "layers_0/..." when
    unscanned). Weights are recomputed with the reference formula, so any implementation works.
    """
    _, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
    flat = traverse_util.flatten_dict(state.get("intermediates", {}), sep="/")
    maps = {}
    for path, (weights,) in flat.items():
        maps[path.removesuffix("/attention_weights").replace("/layers/", "/")] = weights
    if not maps:
        raise ValueError(f"{type(model).__name__} recorded no attention weights.")
    return maps


def plot_attention(
    weights: np.ndarray,
    path: str | os.PathLike,
    *,
    query_labels: list[str] | None = None,
    key_labels: list[str] | None = None,
    title: str = "attention",
) -> None:
    """Writes a heatmap PNG of one head's weights [T, S] (rows: queries, columns: keys)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install matplotlib.") from None
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 2:
        raise ValueError(f"plot_attention takes one head's weights [T, S], got shape {weights.shape}.")
    height, width = weights.shape
    figure, axes = plt.subplots(figsize=(max(4, 0.35 * width + 2), max(3, 0.35 * height + 1.5)))
    image = axes.imshow(weights, cmap="viridis", vmin=0.0, vmax=float(weights.max()) or 1.0)
    figure.colorbar(image, ax=axes, fraction=0.046)
    for labels, set_ticks, set_labels, size in (
        (key_labels, axes.set_xticks, axes.set_xticklabels, width),
        (query_labels, axes.set_yticks, axes.set_yticklabels, height),
    ):
        if labels is not None:
            if len(labels) != size:
                raise ValueError(f"{len(labels)} labels for an axis of {size} tokens.")
            set_ticks(range(size))
            set_labels(labels, fontsize=8)
    plt.setp(axes.get_xticklabels(), rotation=90)
    axes.set_xlabel("key")
    axes.set_ylabel("query")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
