"""Training objectives: pure functions of (model, params, batch) -> summed loss, weight and metrics.

Every objective returns `(loss_sum, weight_sum, metrics)` where the metrics are sums too, so
that sums over microbatches, devices and evaluation batches divide once at the end: the mean
loss is loss_sum / weight_sum, never a mean of means. Padding carries weight 0.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


class Task(enum.StrEnum):
    CAUSAL_LM = "causal_lm"
    MASKED_LM = "masked_lm"
    SEQ2SEQ = "seq2seq"
    CLASSIFICATION = "classification"


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted cross-entropy. logits [..., V], targets and weights [...].

    With label smoothing ls the target distribution is (1 - ls) on the target plus ls spread
    uniformly over the vocabulary (the 2017 paper uses 0.1). Returns the summed loss, the
    summed weight and the weighted count of correct argmax predictions.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def _scheduled_sampling(tokens, predictions, segment_ids, probability, rng):
    """Replaces each input token (after a segment's first) by the model's own prediction for it
    with the given probability (Bengio et al. 2015). predictions[t] predicts tokens[t + 1]."""
    previous_prediction = jnp.concatenate([tokens[:, :1], predictions[:, :-1]], axis=1)
    continues = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1
    )
    replace = continues & (segment_ids != 0) & jax.random.bernoulli(rng, probability, tokens.shape)
    return jnp.where(replace, previous_prediction, tokens)


def causal_lm(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Next-token prediction over packed rows (tokens, targets, segment_ids, positions, weights)."""
    rngs = {"dropout": rng}
    tokens = batch["tokens"]
    kwargs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    if not deterministic and sampling_probability is not None:
        teacher_forced = model.apply({"params": params}, tokens, deterministic=True, **kwargs)
        predictions = jax.lax.stop_gradient(jnp.argmax(teacher_forced, axis=-1))
        sample_rng, rng = jax.random.split(rng)
        tokens = _scheduled_sampling(tokens, predictions, batch["segment_ids"], sampling_probability, sample_rng)
        rngs = {"dropout": rng}
    logits = model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs, **kwargs)
    loss, weight, correct = cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing)
    return loss, weight, {"loss": loss, "weight": weight, "correct": correct}


def masked_lm(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Masked-token prediction (+ next-sentence prediction when the batch has nsp_labels)."""
    outputs = model.apply(
        {"params": params}, batch["tokens"], token_types=batch["token_types"], segment_ids=batch["segment_ids"],
        deterministic=deterministic, rngs={"dropout": rng},
    )
    mlm_logits = outputs[0] if "nsp_labels" in batch else outputs
    loss, weight, correct = cross_entropy(mlm_logits, batch["targets"], batch["weights"], label_smoothing)
    metrics = {"loss": loss, "weight": weight, "correct": correct}
    if "nsp_labels" in batch:
        # The NSP loss is a mean over real examples, added to the MLM mean: scale it by the MLM weight.
        real = (batch["segment_ids"][:, 0] != 0).astype(jnp.float32)
        nsp_loss, nsp_weight, nsp_correct = cross_entropy(outputs[1], batch["nsp_labels"], real)
        loss += nsp_loss / jnp.maximum(nsp_weight, 1.0) * weight
        metrics.update(nsp_loss=nsp_loss, nsp_weight=nsp_weight, nsp_correct=nsp_correct)
    return loss, weight, metrics


def seq2seq(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Teacher-forced translation: decoder input = BOS + target, predicting target + EOS."""
    source_kwargs = dict(source_segment_ids=batch["source_segment_ids"], target_segment_ids=batch["target_segment_ids"])
    target_in = batch["target_in"]
    rngs = {"dropout": rng}
    if not deterministic and sampling_probability is not None:
        teacher_forced = model.apply({"params": params}, batch["source"], target_in, deterministic=True, **source_kwargs)
        predictions = jax.lax.stop_gradient(jnp.argmax(teacher_forced, axis=-1))
        sample_rng, rng = jax.random.split(rng)
        target_in = _scheduled_sampling(
            target_in, predictions, batch["target_segment_ids"], sampling_probability, sample_rng
        )
        rngs = {"dropout": rng}
    logits = model.apply(
        {"params": params}, batch["source"], target_in, deterministic=deterministic, rngs=rngs, **source_kwargs
    )
    loss, weight, correct = cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing)
    return loss, weight, {"loss": loss, "weight": weight, "correct": correct}


def classification(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Sequence classification: one label per example (weight 0 for filler rows)."""
    logits = model.apply(
        {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], deterministic=deterministic,
        rngs={"dropout": rng},
    )
    loss, weight, correct = cross_entropy(logits, batch["labels"], batch["weights"], label_smoothing)
    return loss, weight, {"loss": loss, "weight": weight, "correct": correct}


Objective = Callable[..., tuple[jax.Array, jax.Array, Metrics]]
OBJECTIVES: dict[Task, Objective] = {
    Task.CAUSAL_LM: causal_lm,
    Task.MASKED_LM: masked_lm,
    Task.SEQ2SEQ: seq2seq,
    Task.CLASSIFICATION: classification,
}
