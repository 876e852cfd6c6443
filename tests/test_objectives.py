"""Training objectives against hand computations: label smoothing, the masked-LM loss over
selected positions only, NSP over real examples only, SpanBERT's span boundary objective, and
scheduled sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import transformer as tfm
from train import objectives


def test_label_smoothing_matches_a_hand_computation():
    """q = (1 - ls) one_hot + ls / V; loss = -sum q log softmax(logits)."""
    logits = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    targets, weights, ls = np.array([1, 3]), np.array([1.0, 0.5]), 0.1
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = (1 - ls) * np.eye(4)[targets] + ls / 4
    expected = np.sum(-(q * log_p).sum(-1) * weights)
    logits, targets, weights = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
    loss, weight, correct = objectives.cross_entropy(logits, targets, weights, ls)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(weight) == 1.5 and float(correct) == 1.0  # row 0 is right (argmax 1), row 1 is not
    unsmoothed = objectives.cross_entropy(logits, targets, weights)[0]
    np.testing.assert_allclose(unsmoothed, -np.sum(log_p[[0, 1], np.asarray(targets)] * np.asarray(weights)), rtol=1e-6)


def test_loss_gradient_is_softmax_minus_the_target_distribution():
    """d loss / d logits = weight * (softmax - q), q the (smoothed) target distribution: the
    backward pass XLA fuses over the logits computes the textbook gradient."""
    rng = np.random.default_rng(1)
    logits, targets, weights = rng.normal(size=(2, 3, 7)), rng.integers(0, 7, (2, 3)), rng.random((2, 3))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for ls in (0.0, 0.1):
        q = (1 - ls) * np.eye(7)[targets] + ls / 7
        grad = jax.grad(lambda x: objectives.cross_entropy(x, jnp.asarray(targets), jnp.asarray(weights), ls)[0])
        np.testing.assert_allclose(grad(jnp.asarray(logits)), weights[..., None] * (p - q), rtol=1e-5, atol=1e-7)


def test_correct_counts_match_argmax_and_ties_count_as_correct():
    """`correct` is the weighted count of argmax hits (checked against numpy); a target that
    shares the highest logit counts as correct, wherever argmax would put the tie, unless all
    logits tie (a collapsed model scores nothing)."""
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(3, 5, 40)), rng.integers(0, 40, (3, 5))
    targets[0] = logits[0].argmax(-1)  # some hits
    weights = rng.random((3, 5))
    correct = objectives.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))[2]
    np.testing.assert_allclose(correct, np.sum((logits.argmax(-1) == targets) * weights), rtol=1e-6)
    tied = jnp.asarray([[1.0, 3.0, 3.0], [3.0, 3.0, 1.0]])
    assert float(objectives.cross_entropy(tied, jnp.asarray([2, 2]), jnp.ones(2))[2]) == 1.0
    collapsed = jnp.full((4, 50), 2.5)
    assert float(objectives.cross_entropy(collapsed, jnp.arange(4), jnp.ones(4))[2]) == 0.0


@pytest.mark.parametrize("pick", [objectives.gathered_logits, objectives.selected_logits])
def test_both_ways_of_picking_the_target_logit_agree_with_numpy(pick):
    """The CPU's gather and the accelerators' select: the same values (0 out of range) and the
    same one-hot gradient."""
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(3, 6)).astype(np.float32), np.array([5, 0, 6])
    expected = np.where(targets < 6, logits[np.arange(3), np.minimum(targets, 5)], 0.0)
    np.testing.assert_allclose(pick(jnp.asarray(logits), jnp.asarray(targets)), expected, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(pick(x, jnp.asarray(targets)) * jnp.arange(1.0, 4.0)))(jnp.asarray(logits))
    np.testing.assert_array_equal(grad, np.eye(6)[np.minimum(targets, 5)] * (targets < 6)[:, None] * np.arange(1, 4)[:, None])


def test_a_target_outside_the_vocabulary_picks_no_logit_and_is_never_correct():
    """Its loss is the logsumexp alone (finite), and it does not score even where every logit
    is below the 0 it picks."""
    logits = jnp.asarray([[-1.0, -2.0, -3.0]] * 3)
    loss, _, correct = objectives.cross_entropy(logits, jnp.asarray([3, -1, 0]), jnp.asarray([1.0, 1.0, 0.0]))
    logsumexp = float(jax.nn.logsumexp(logits[0]))
    np.testing.assert_allclose(loss, 2 * logsumexp, rtol=1e-6)
    assert float(correct) == 0.0


def masked_lm_and_batch():
    """A tiny BERT with an NSP head, its variables, and a batch of 3 rows (the last a filler row)."""
    cfg = tfm.ModelConfig.preset("bert-tiny", dropout_rate=0.0, attention_dropout_rate=0.0, vocab_size=64)
    model = tfm.MaskedLM(cfg, next_sentence_prediction=True)
    rng = np.random.default_rng(0)
    segments = np.ones((3, 8), np.int32)
    segments[2] = 0  # a filler row
    batch = dict(
        tokens=rng.integers(7, 64, (3, 8)).astype(np.int32), targets=rng.integers(7, 64, (3, 8)).astype(np.int32),
        weights=(rng.random((3, 8)) < 0.3).astype(np.float32) * segments, segment_ids=segments,
        token_types=np.zeros((3, 8), np.int32), nsp_labels=np.array([0, 1, 1], np.int32),
    )
    return model, model.init(jax.random.PRNGKey(0), batch["tokens"]), batch


def test_masked_lm_loss_counts_selected_positions_and_real_examples_only():
    model, variables, batch = masked_lm_and_batch()
    segments = batch["segment_ids"]
    metrics = objectives.masked_lm(model, variables["params"], batch, rng=jax.random.PRNGKey(0), deterministic=True)

    mlm_logits, nsp_logits = model.apply(
        variables, batch["tokens"], token_types=batch["token_types"], segment_ids=segments
    )
    log_p = np.asarray(jax.nn.log_softmax(mlm_logits))
    selected = np.nonzero(batch["weights"])
    np.testing.assert_allclose(metrics["loss"], -log_p[selected + (batch["targets"][selected],)].sum(), rtol=1e-5)
    assert float(metrics["weight"]) == len(selected[0])
    nsp_log_p = np.asarray(jax.nn.log_softmax(nsp_logits))
    np.testing.assert_allclose(metrics["nsp_loss"], -(nsp_log_p[0, 0] + nsp_log_p[1, 1]), rtol=1e-5)
    assert float(metrics["nsp_weight"]) == 2.0
    # Changing a target at an unselected position changes nothing.
    unselected = tuple(np.argwhere(batch["weights"] == 0)[0])
    targets = batch["targets"].copy()
    targets[unselected] += 1
    changed = objectives.masked_lm(
        model, variables["params"], dict(batch, targets=targets), rng=jax.random.PRNGKey(0), deterministic=True
    )
    assert float(changed["loss"]) == float(metrics["loss"])


def test_a_pairs_token_types_reach_the_classifier():
    """Text pairs carry token types (the second text's are 1): the classification loss is the
    cross-entropy of the logits the model gives with them, not without."""
    cfg = tfm.ModelConfig.preset("bert-tiny", dropout_rate=0.0, attention_dropout_rate=0.0, vocab_size=64)
    model = tfm.SequenceClassifier(cfg, num_labels=3)
    rng = np.random.default_rng(1)
    batch = dict(tokens=rng.integers(7, 64, (2, 8)).astype(np.int32), segment_ids=np.ones((2, 8), np.int32),
                 token_types=np.repeat([[0] * 4 + [1] * 4], 2, axis=0).astype(np.int32),
                 labels=np.array([0, 2], np.int32), weights=np.ones(2, np.float32))
    variables = model.init(jax.random.PRNGKey(0), batch["tokens"])
    metrics = objectives.classification(model, variables["params"], batch, rng=jax.random.PRNGKey(0),
                                        deterministic=True)
    for token_types, same in ((batch["token_types"], True), (None, False)):
        log_p = jax.nn.log_softmax(model.apply(variables, batch["tokens"], token_types=token_types))
        expected = -(log_p[0, 0] + log_p[1, 2])
        assert np.isclose(float(metrics["loss"]), float(expected), rtol=1e-5) == same, (metrics["loss"], expected)


def test_question_answering_loss_is_the_mean_of_the_start_and_end_cross_entropies():
    """BERT on SQuAD: (CE(start) + CE(end)) / 2 per real row; a row is correct when both the
    start and the end are its highest logits; a filler row counts nowhere."""
    cfg = tfm.ModelConfig.preset("bert-tiny", dropout_rate=0.0, attention_dropout_rate=0.0, vocab_size=64)
    model = tfm.QuestionAnswering(cfg)
    rng = np.random.default_rng(2)
    batch = dict(tokens=rng.integers(7, 64, (3, 8)).astype(np.int32), segment_ids=np.ones((3, 8), np.int32),
                 token_types=np.repeat([[0] * 3 + [1] * 5], 3, axis=0).astype(np.int32),
                 start_positions=np.array([3, 0, 5], np.int32), end_positions=np.array([4, 0, 7], np.int32),
                 weights=np.array([1, 1, 0], np.float32))
    variables = model.init(jax.random.PRNGKey(0), batch["tokens"])
    start, end = (np.asarray(x) for x in model.apply(variables, batch["tokens"], token_types=batch["token_types"]))
    batch["start_positions"][:2] = start[:2].argmax(1)  # row 0 wholly right, row 1 right at its start only
    batch["end_positions"][0], batch["end_positions"][1] = end[0].argmax(), (end[1].argmax() + 1) % 8
    log_start, log_end = scipy.special.log_softmax(start, axis=1), scipy.special.log_softmax(end, axis=1)
    expected = -sum(log_start[i, batch["start_positions"][i]] + log_end[i, batch["end_positions"][i]]
                    for i in range(2)) / 2
    both = [start[i].argmax() == batch["start_positions"][i] and end[i].argmax() == batch["end_positions"][i]
            for i in range(2)]
    metrics = objectives.question_answering(model, variables["params"], batch, rng=jax.random.PRNGKey(0),
                                            deterministic=True)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert float(metrics["weight"]) == 2.0 and float(metrics["correct"]) == sum(both) == 1


def layer_norm(x, params, epsilon):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + epsilon)
    return x * params["scale"] + params["bias"]


def test_span_boundary_objective_predicts_each_masked_token_from_its_spans_boundaries_by_hand():
    """SpanBERT's SBO: a masked token at offset k of a span is predicted from the encoder states
    just before and after the span and offset k's embedding, through two dense + GELU + layer norm
    layers and the tied output layer (numpy, from the parameters); its loss is summed over the
    masked tokens and counted in their weight, and smoothed like the masked LM's."""
    cfg = tfm.ModelConfig.preset("bert-tiny", dropout_rate=0.0, attention_dropout_rate=0.0, vocab_size=64)
    model = tfm.MaskedLM(cfg, span_boundary_objective=True)
    rng = np.random.default_rng(1)
    boundaries = np.zeros((2, 8, 3), np.int32)
    boundaries[0, 2:5] = [[1, 5, 0], [1, 5, 1], [1, 5, 2]]  # row 0: a span at 2..4
    boundaries[1, 6] = [5, 7, 0]  # row 1: a span at 6
    weights = (boundaries[..., 1] > 0).astype(np.float32)
    batch = dict(tokens=rng.integers(7, 64, (2, 8)).astype(np.int32), targets=rng.integers(7, 64, (2, 8)).astype(np.int32),
                 weights=weights, segment_ids=np.ones((2, 8), np.int32), token_types=np.zeros((2, 8), np.int32),
                 span_boundaries=boundaries)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["tokens"]))
    leaves, tree = jax.tree.flatten(variables)  # every parameter O(1), so that each term shows in the logits
    variables = jax.tree.unflatten(tree, [rng.normal(0, 0.5, leaf.shape).astype(np.float32) for leaf in leaves])
    metrics = objectives.masked_lm(model, variables["params"], batch, rng=jax.random.PRNGKey(0), deterministic=True)
    _, sbo_logits = model.apply(variables, batch["tokens"], token_types=batch["token_types"],
                                span_boundaries=boundaries)

    p = jax.tree.map(np.asarray, variables["params"])
    hidden = np.asarray(model.apply(variables, batch["tokens"], token_types=batch["token_types"],
                                    method=lambda m, tokens, **kw: m.encode(tokens, **kw)))
    gelu = lambda x: 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))  # noqa: E731
    loss = 0.0
    for row, position in zip(*np.nonzero(weights)):
        before, after, offset = boundaries[row, position]
        x = np.concatenate([hidden[row, before], hidden[row, after], p["sbo_offset"]["embedding"][offset]])
        x = layer_norm(gelu(x @ p["sbo_hidden"]["kernel"] + p["sbo_hidden"]["bias"]), p["sbo_hidden_norm"], 1e-12)
        x = layer_norm(gelu(x @ p["sbo_output"]["kernel"] + p["sbo_output"]["bias"]), p["sbo_output_norm"], 1e-12)
        logits = x @ p["embed"]["token"]["embedding"].T + p["mlm_bias"]
        np.testing.assert_allclose(sbo_logits[row, position], logits, rtol=1e-4, atol=1e-4)
        loss -= logits[batch["targets"][row, position]] - scipy.special.logsumexp(logits)
    np.testing.assert_allclose(metrics["sbo_loss"], loss, rtol=1e-4)
    weights_sum = objectives.loss_weights(batch)
    np.testing.assert_allclose(objectives.training_loss(metrics, weights_sum),
                               (metrics["loss"] + metrics["sbo_loss"]) / 4, rtol=1e-6)
    # with label smoothing the step minimises both terms smoothed, and reports them plain
    smoothed = objectives.masked_lm(model, variables["params"], batch, rng=jax.random.PRNGKey(0), deterministic=True,
                                    label_smoothing=0.1)
    np.testing.assert_allclose(smoothed["sbo_loss"], metrics["sbo_loss"], rtol=1e-6)
    assert float(smoothed["smoothed_sbo_loss"]) != float(smoothed["sbo_loss"])
    np.testing.assert_allclose(objectives.training_loss(smoothed, weights_sum),
                               (smoothed["smoothed_loss"] + smoothed["smoothed_sbo_loss"]) / 4, rtol=1e-6)


def test_with_label_smoothing_the_loss_is_still_the_cross_entropy_and_the_step_minimises_the_smoothed_one():
    """Training reports the same cross-entropy as validation (which never smooths); the step's
    objective is the smoothed loss, by hand: -sum over selected positions of
    (1 - ls) log p(target) + ls mean_v log p(v)."""
    model, variables, batch = masked_lm_and_batch()
    run = lambda ls: objectives.masked_lm(  # noqa: E731
        model, variables["params"], batch, rng=jax.random.PRNGKey(0), deterministic=True, label_smoothing=ls)
    plain, smoothed = run(0.0), run(0.1)
    assert "smoothed_loss" not in plain
    np.testing.assert_allclose(smoothed["loss"], plain["loss"], rtol=1e-6)
    mlm_logits = model.apply(variables, batch["tokens"], token_types=batch["token_types"],
                             segment_ids=batch["segment_ids"])[0]
    log_p = np.asarray(jax.nn.log_softmax(mlm_logits))
    selected = np.nonzero(batch["weights"])
    by_hand = -np.sum(0.9 * log_p[selected + (batch["targets"][selected],)] + 0.1 * log_p[selected].mean(-1))
    np.testing.assert_allclose(smoothed["smoothed_loss"], by_hand, rtol=1e-5)
    weights = objectives.loss_weights(batch)
    np.testing.assert_allclose(objectives.training_loss(smoothed, weights),
                               by_hand / len(selected[0]) + plain["nsp_loss"] / 2, rtol=1e-5)


def test_training_loss_is_the_sum_of_each_terms_mean():
    metrics = {"loss": jnp.float32(6.0), "weight": jnp.float32(3.0), "nsp_loss": jnp.float32(1.0)}
    assert float(objectives.training_loss(metrics, {"weight": 4.0, "nsp_weight": 2.0})) == 6.0 / 4 + 1.0 / 2


TOKENS = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]], np.int32)
SEGMENTS = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 0, 0]], np.int32)  # row 0 packs two segments
PREDICTIONS = np.array([[50, 51, 52, 53, 54], [60, 61, 62, 63, 64]], np.int32)  # predictions[t] guesses tokens[t + 1]


@pytest.mark.parametrize("probability, expected", [
    (0.0, TOKENS),
    # Every token that continues its segment becomes the prediction made at the previous position;
    # a segment's first token and padding stay.
    (1.0, [[10, 50, 51, 13, 53], [20, 60, 61, 0, 0]]),
])
def test_scheduled_sampling(probability, expected):
    out = objectives.scheduled_sampling(TOKENS, PREDICTIONS, SEGMENTS, probability, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, expected)


def test_scheduled_sampling_replaces_about_the_given_share():
    tokens = np.zeros((64, 64), np.int32)
    out = objectives.scheduled_sampling(tokens, tokens + 1, np.ones_like(tokens), 0.25, jax.random.PRNGKey(0))
    share = float(np.mean(np.asarray(out)[:, 1:] != 0))
    assert abs(share - 0.25) < 0.02
