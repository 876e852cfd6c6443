"""Training objectives: pure functions of (model, params, batch) -> metric sums.

Every metric is a sum over the batch (loss, weight, correct; nsp_loss, nsp_weight, nsp_correct
for next-sentence prediction; sbo_loss, sbo_correct for the span boundary objective), so that sums over microbatches, devices and evaluation batches
divide once at the end: a mean is loss / weight, never a mean of means. Padding carries weight 0.

The loss a step minimises is the sum of each term's mean (`training_loss`): each term's sum
divided by that term's weight in the whole batch (`loss_weights`, known before the forward
pass), so k microbatches give exactly the gradient of one k-times-larger batch. With label
smoothing the step minimises the smoothed sum (`smoothed_loss`), while `loss` stays the plain
cross-entropy, so that training and validation report the same quantity; a distillation's terms
are minimised times their weights (`scaled_loss`, ...), and reported as they are.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from transformer.decoding import argmax

Metrics = dict[str, jax.Array]
Objective = Callable[..., Metrics]  # (model, params, batch, *, rng, deterministic, ...) -> metric sums
# Each loss term and the metric that holds its weight; a step minimises "scaled_" + term where the
# objective reports one (distillation's weights), else "smoothed_" + term (label smoothing), else the term.
# SBO and distillation's KL: the masked tokens too; distillation's cosine: every real token.
LOSS_TERMS = {"loss": "weight", "nsp_loss": "nsp_weight", "sbo_loss": "weight", "kl_loss": "weight",
              "cosine_loss": "token_weight"}


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted cross-entropy. logits [..., V], integer targets in [0, V) and weights [...].

    With label smoothing ls the target distribution is (1 - ls) on the target plus ls spread
    uniformly over the vocabulary (the 2017 paper uses 0.1). Returns the summed loss, the
    summed weight and the weighted count of correct predictions (the target has the highest
    logit; where several but not all share it, as argmax's first one or not, it counts as
    correct; where all do, as in a collapsed model, it does not). A target outside [0, V) picks
    no logit (its loss is the logsumexp alone, meaningless: give such positions weight 0) and
    never counts as correct.

    Written as plain reductions over the vocabulary (max, sum of exponentials, and the mean
    for label smoothing; the target's logit by platform, below), which XLA fuses:
    log_softmax materialised [..., V] twice more, and `jnp.argmax` (a reduction over (value,
    index) pairs that XLA's CPU backend runs element by element) cost a third of a small
    model's training step.
    """
    logits = logits.astype(jnp.float32)
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    target_logits = jax.lax.platform_dependent(logits, targets, cpu=gathered_logits, default=selected_logits)
    highest = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    exp_sums = jnp.sum(jnp.exp(logits - highest[..., None]), axis=-1)  # in [1, V]; V only where all logits tie
    log_normalizers = highest + jnp.log(exp_sums)  # logsumexp
    nll = log_normalizers - target_logits
    if label_smoothing:  # the uniform part: mean over the vocabulary of -log p
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (log_normalizers - logits.mean(axis=-1))
    weights = weights.astype(jnp.float32)
    # The target holds the highest logit (no argmax: it materialised [..., V] ints, 14 ms of a 470 ms
    # CPU step). A tie for the highest counts as correct, unless every logit ties.
    correct = (in_range & (target_logits >= highest) & (exp_sums < logits.shape[-1])).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def gathered_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., target] by a gather (0 for a target outside [0, V)). Its gradient is a
    scatter into [..., V], which XLA:CPU runs fastest (with the select below, the steps of a
    5M-parameter GPT with an 8192-word vocabulary took 19% longer)."""
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    return jnp.where(in_range, jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0], 0.0)


def selected_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., target] by a one-hot select and sum (0 for a target outside [0, V)). Its
    gradient is elementwise, so a GPU can fuse it with the softmax's gradient and the conversion
    for the head's products into one pass; the gather's scatter split that pass into three
    (GPT-2 small, batch 16 x 1024, on an H100: 48.5 against 50.2 ms a step)."""
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)


def _token_metrics(logits, targets, weights, label_smoothing) -> Metrics:
    """Cross-entropy, weight and correct sums; with label smoothing also the smoothed loss that
    the step minimises (XLA computes the max and the sum of exponentials once for both)."""
    loss, weight, correct = cross_entropy(logits, targets, weights)
    metrics = {"loss": loss, "weight": weight, "correct": correct}
    if label_smoothing:
        metrics["smoothed_loss"] = cross_entropy(logits, targets, weights, label_smoothing)[0]
    return metrics


def nsp_weights(batch) -> jax.Array:
    """[B] 1.0 for real examples (their first token is not padding), 0.0 for filler rows."""
    return (batch["segment_ids"][:, 0] != 0).astype(jnp.float32)


def real_tokens(batch) -> jax.Array:
    """[B, T] 1.0 on the tokens of a row, 0.0 on its padding."""
    return (batch["segment_ids"] != 0).astype(jnp.float32)


def loss_weights(batch) -> Metrics:
    """Each loss term's summed weight over a batch, computed from the batch alone."""
    weights = {"weight": jnp.sum(batch["weights"].astype(jnp.float32))}
    if "segment_ids" in batch:
        weights["token_weight"] = jnp.sum(real_tokens(batch))
    if "nsp_labels" in batch:
        weights["nsp_weight"] = jnp.sum(nsp_weights(batch))
    return weights


def training_loss(metrics: Metrics, total_weights: Metrics) -> jax.Array:
    """The sum of each loss term's mean: its sum (the smoothed one, where there is one) over
    its weight in the whole (global) batch.

    With the whole batch's weights, the losses of microbatches add up to the loss of the batch
    (MLM and NSP each keep their own mean, as in BERT).
    """
    return sum(
        metrics.get("scaled_" + term, metrics.get("smoothed_" + term, metrics[term])) / jnp.maximum(total_weights[weight], 1.0)
        for term, weight in LOSS_TERMS.items() if term in metrics
    )


def scheduled_sampling(tokens, predictions, segment_ids, probability, rng):
    """Replaces each input token (after a segment's first) by the model's own prediction for it
    with the given probability (Bengio et al. 2015). predictions[t] predicts tokens[t + 1].

    The predictions are the argmax of one teacher-forced pass, so each is conditioned on the
    true tokens before it: the two-pass form a Transformer trains in parallel (Mihaylova and
    Martins 2019), not the paper's sequential sampling, where errors compound."""
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
        predictions = jax.lax.stop_gradient(argmax(teacher_forced))
        sample_rng, rng = jax.random.split(rng)
        tokens = scheduled_sampling(tokens, predictions, batch["segment_ids"], sampling_probability, sample_rng)
        rngs = {"dropout": rng}
    logits = model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs, **kwargs)
    return _token_metrics(logits, batch["targets"], batch["weights"], label_smoothing)


def masked_lm(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Masked-token prediction, + next-sentence prediction when the batch has nsp_labels, + the
    span boundary objective (SpanBERT: the masked tokens again, from their spans' boundaries)
    when the model has its head."""
    boundary_head = getattr(model, "span_boundary_objective", False)
    outputs = model.apply(
        {"params": params}, batch["tokens"], token_types=batch["token_types"], segment_ids=batch["segment_ids"],
        deterministic=deterministic, rngs={"dropout": rng},
        **({"span_boundaries": batch["span_boundaries"]} if boundary_head else {}),
    )
    mlm_logits = outputs[0] if "nsp_labels" in batch or boundary_head else outputs
    metrics = _token_metrics(mlm_logits, batch["targets"], batch["weights"], label_smoothing)
    if "nsp_labels" in batch:
        nsp_loss, nsp_weight, nsp_correct = cross_entropy(outputs[1], batch["nsp_labels"], nsp_weights(batch))
        metrics.update(nsp_loss=nsp_loss, nsp_weight=nsp_weight, nsp_correct=nsp_correct)
    if boundary_head:
        sbo = _token_metrics(outputs[1], batch["targets"], batch["weights"], label_smoothing)
        metrics.update(sbo_loss=sbo["loss"], sbo_correct=sbo["correct"])
        if label_smoothing:
            metrics["smoothed_sbo_loss"] = sbo["smoothed_loss"]
    return metrics


def seq2seq(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Teacher-forced translation: decoder input = BOS + target, predicting target + EOS."""
    source_kwargs = dict(source_segment_ids=batch["source_segment_ids"], target_segment_ids=batch["target_segment_ids"])
    target_in = batch["target_in"]
    rngs = {"dropout": rng}
    if not deterministic and sampling_probability is not None:
        teacher_forced = model.apply({"params": params}, batch["source"], target_in, deterministic=True, **source_kwargs)
        predictions = jax.lax.stop_gradient(argmax(teacher_forced))
        sample_rng, rng = jax.random.split(rng)
        target_in = scheduled_sampling(
            target_in, predictions, batch["target_segment_ids"], sampling_probability, sample_rng
        )
        rngs = {"dropout": rng}
    logits = model.apply(
        {"params": params}, batch["source"], target_in, deterministic=deterministic, rngs=rngs, **source_kwargs
    )
    return _token_metrics(logits, batch["targets"], batch["weights"], label_smoothing)


def classification(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Sequence classification: one label per example (weight 0 for filler rows); a label per
    token with token classification's [B, T] labels. An encoder's text pairs carry token types."""
    logits = model.apply(
        {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], deterministic=deterministic,
        rngs={"dropout": rng}, **({"token_types": batch["token_types"]} if "token_types" in batch else {}),
    )
    return _token_metrics(logits, batch["labels"], batch["weights"], label_smoothing)


def question_answering(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None):
    """Extractive QA: cross-entropy of the answer's start and of its end over the row's tokens,
    averaged (BERT on SQuAD); a row is correct when both are the highest logits."""
    start_logits, end_logits = model.apply(
        {"params": params}, batch["tokens"], token_types=batch["token_types"], segment_ids=batch["segment_ids"],
        deterministic=deterministic, rngs={"dropout": rng},
    )
    start = _token_metrics(start_logits, batch["start_positions"], batch["weights"], label_smoothing)
    end = _token_metrics(end_logits, batch["end_positions"], batch["weights"], label_smoothing)
    both = (argmax(start_logits) == batch["start_positions"]) & (argmax(end_logits) == batch["end_positions"])
    metrics = {"loss": (start["loss"] + end["loss"]) / 2, "weight": start["weight"],
               "correct": jnp.sum(both * batch["weights"])}
    if label_smoothing:
        metrics["smoothed_loss"] = (start["smoothed_loss"] + end["smoothed_loss"]) / 2
    return metrics


def softened_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(p_teacher || p_student) of the two softmaxes at `temperature`, times temperature^2 so that
    its gradients keep their scale as the temperature changes (Hinton et al. 2015; DistilBERT's
    loss_ce). [..., V] -> [...] float32."""
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1) * temperature**2


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """cos(a, b) along the last axis, in float32. [..., D] x [..., D] -> [...]."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, 1e-8)


def distillation(model, params, batch, *, rng, deterministic, label_smoothing=0.0, sampling_probability=None,
                 frozen, teacher, temperature: float, kl_weight: float, mlm_weight: float, cosine_weight: float):
    """DistilBERT's objective for a student `model` (a MaskedLM) on masked-LM rows: its own masked-LM
    cross-entropy (`loss`), KL of the teacher's softened distribution to its own on the masked
    tokens (`kl_loss`, `softened_kl`) and 1 - cos between the two models' last hidden states on
    every real token (`cosine_loss`); the step minimises each times its weight. `teacher` is the
    teacher's model (a MaskedLM; any encoder at kl_weight 0), `frozen` its parameters: read without
    dropout, and never differentiated."""
    inputs = dict(token_types=batch["token_types"], segment_ids=batch["segment_ids"])
    hidden = model.apply({"params": params}, batch["tokens"], **inputs, deterministic=deterministic,
                         rngs={"dropout": rng}, method="encode")
    logits = model.apply({"params": params}, hidden, method="mlm_logits")
    frozen = jax.lax.stop_gradient(frozen)
    teacher_hidden = teacher.apply({"params": frozen}, batch["tokens"], **inputs, method="encode")
    metrics = _token_metrics(logits, batch["targets"], batch["weights"], label_smoothing)
    # a term of weight 0 is left out of the step's loss (not multiplied by 0): no gradient through the head for it
    metrics["scaled_loss"] = mlm_weight * metrics.get("smoothed_loss", metrics["loss"]) if mlm_weight else jnp.zeros(())
    metrics["cosine_loss"] = jnp.sum((1.0 - cosine_similarity(hidden, teacher_hidden)) * real_tokens(batch))
    metrics["scaled_cosine_loss"] = cosine_weight * metrics["cosine_loss"]
    metrics["token_weight"] = jnp.sum(real_tokens(batch))
    if kl_weight:
        teacher_logits = teacher.apply({"params": frozen}, teacher_hidden, method="mlm_logits")
        kl = softened_kl(teacher_logits, logits, temperature)
        metrics["kl_loss"] = jnp.sum(kl * batch["weights"].astype(jnp.float32))
        metrics["scaled_kl_loss"] = kl_weight * metrics["kl_loss"]
    return metrics
