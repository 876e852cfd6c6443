"""Attention weights of a forward pass, a run's attention on one text, and a heatmap of them."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer.runs import Run
from transformer.sampler import Sampler, prompt_ids
from transformer.tasks import Task


def attention_maps(model: nn.Module, variables, *args, **kwargs) -> dict[str, jax.Array]:
    """Runs `model.apply(variables, *args, **kwargs)` and returns every layer's attention weights.

    Keys name the attention, e.g. "decoder/self_attention" or "decoder/cross_attention"; values
    are float32 [L, B, N, T, S], layers stacked in order whether the stack is scanned or not.
    Weights are recomputed with the reference formula, so any implementation works.
    """
    _, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
    flat = traverse_util.flatten_dict(state.get("intermediates", {}), sep="/")
    layers: dict[str, dict[int, jax.Array]] = {}  # attention -> layer -> [B, N, T, S]
    for path, recorded in flat.items():
        name = path.removesuffix("/attention_weights")
        unscanned = re.fullmatch(r"(.*)/layers_(\d+)/(.*)", name)  # one module per layer
        if unscanned:
            layers.setdefault(f"{unscanned[1]}/{unscanned[3]}", {})[int(unscanned[2])] = recorded[0]
            continue
        # A scanned stack records [L, B, N, T, S] under ".../layers/..."; one shared layer (ALBERT)
        # under ".../shared_layer/...", scanned so, or unscanned [B, N, T, S] once per call.
        per_layer = recorded[0] if recorded[0].ndim == 5 else recorded
        layers[re.sub(r"/(layers|shared_layer)/", "/", name)] = dict(enumerate(per_layer))
    if not layers:
        raise ValueError(f"{type(model).__name__} recorded no attention weights.")
    return {name: jnp.stack([by_layer[i] for i in sorted(by_layer)]) for name, by_layer in layers.items()}


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


class TextAttention(NamedTuple):
    """One attention of a model over one text: weights [L, N, T, S] and the pieces on each axis."""

    weights: np.ndarray
    queries: list[str]
    keys: list[str]


def text_attention(run: Run, text: str, *, max_new_tokens: int | None = None) -> dict[str, TextAttention]:
    """Every attention of a run's model over one text, labelled with the tokenizer's pieces.

    A language model attends over the text, an encoder over [CLS] text [SEP], and an
    encoder-decoder model over the text (+ EOS) and its greedy translation (BOS + pieces, at
    most `max_new_tokens`, by default as many as the model's context holds). Keys name the
    attention ("encoder/self_attention", "decoder/cross_attention", ...), scanned or not.
    """
    tok = run.tokenizer
    if not tok.encode(text):
        raise ValueError("The text is empty: give at least one word to show attention over.")
    variables = {"params": run.params}
    if run.task.encoder_decoder:
        sampler = Sampler(run.model, run.params, tok)
        limit = run.model.config.max_length - 1 if max_new_tokens is None else max_new_tokens  # BOS + it fit
        source, translation = sampler.token_ids(text, max_new_tokens=limit)
        target = [tok.decoder_start_id, *(t for t in translation if t != tok.eos_id)]
        maps = attention_maps(run.model, variables, np.array([source]), np.array([target]))
    else:
        if run.task == Task.CAUSAL_LM:
            source = prompt_ids(tok, text)
        elif not run.model.config.num_encoder_layers:  # a decoder's classifier reads the text (as a prompt) and EOS
            source = [*prompt_ids(tok, text), tok.eos_id]
        else:
            source = [tok.cls_id, *tok.encode(text), tok.sep_id]
        target = source
        maps = attention_maps(run.model, variables, np.array([source]))
    out = {}
    for name, weights in maps.items():
        queries = target if name.startswith("decoder") else source
        keys = source if name.startswith("encoder") or name.endswith("cross_attention") else target
        out[name] = TextAttention(
            np.asarray(weights)[:, 0], [tok.id_to_token(i) for i in queries], [tok.id_to_token(i) for i in keys]
        )
    return out
