"""The compiled train step: accumulation == big batch, sharded == unsharded, NaN steps skipped."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import transformer as tfm
from conftest import preset
from train import objectives, optim
from train import step as train_step
from train.tasks import TASKS
from transformer.tasks import Task

CONFIG = preset("gpt2-tiny", vocab_size=256)
BATCH, LENGTH = 8, 16


def lm_batch(seed=0):
    tokens = np.random.default_rng(seed).integers(1, CONFIG.vocab_size, (BATCH, LENGTH + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((BATCH, LENGTH), np.int32),
        "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
        "weights": np.ones((BATCH, LENGTH), np.float32),
    }


def set_up(optimizer, *, accumulation=1, mesh_sizes=(1, 1, 1), config=CONFIG, sampling_probability=None):
    """(state, compiled train step, mesh) of a CausalLM (CONFIG's by default)."""
    model = tfm.CausalLM(config)
    mesh = train_step.make_mesh(*mesh_sizes, devices=jax.devices()[: int(np.prod(mesh_sizes))])
    state, shardings = train_step.create_state(
        model, optimizer, (jnp.ones((1, LENGTH), jnp.int32),), jax.random.PRNGKey(0), mesh
    )
    step, _ = train_step.compile_steps(
        model, objectives.causal_lm, optimizer, mesh, shardings, accumulation=accumulation,
        sampling_probability=sampling_probability,
    )
    return state, step, mesh


def train(optimizer, *, accumulation=1, steps=2, batch=None, mesh_sizes=(1, 1, 1), config=CONFIG):
    state, step, mesh = set_up(optimizer, accumulation=accumulation, mesh_sizes=mesh_sizes, config=config)
    losses = []
    for i in range(steps):
        state, metrics = step(state, train_step.global_batch(batch or lm_batch(i), mesh), jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"] / metrics["weight"]))
    return state, losses


def _tiny(name):
    return preset(name, vocab_size=64, num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_ff=32)


def _task_case(task, rng):
    """(model, objective, batch) for a task; token weights differ between rows, so that the
    microbatches of an accumulated step carry different weights, and one row is filler."""

    def tokens():
        return rng.integers(7, 64, (BATCH, LENGTH)).astype(np.int32)

    segments = np.ones((BATCH, LENGTH), np.int32)
    segments[-1] = 0  # a filler row: no loss, no NSP example
    weights = (rng.random((BATCH, LENGTH)) < np.linspace(0.1, 0.9, BATCH)[:, None]).astype(np.float32) * segments
    frozen = None
    if task == "distillation":  # a 1-layer student of a 2-layer teacher: every term, each its own mean
        model, teacher = tfm.MaskedLM(_tiny("bert-tiny")), tfm.MaskedLM(_tiny("bert-tiny").replace(num_encoder_layers=2))
        frozen = nn.meta.unbox(teacher.init(jax.random.PRNGKey(5), tokens()[:1])["params"])
        batch = dict(tokens=tokens(), targets=tokens(), weights=weights, segment_ids=segments,
                     token_types=np.zeros_like(segments))
        objective = functools.partial(objectives.distillation, teacher=teacher, temperature=2.0, kl_weight=5.0,
                                      mlm_weight=2.0, cosine_weight=1.0)
        return model, objective, batch, frozen
    if task == "masked_lm":
        model = tfm.MaskedLM(_tiny("bert-tiny"), next_sentence_prediction=True)
        batch = dict(tokens=tokens(), targets=tokens(), weights=weights, segment_ids=segments,
                     token_types=np.zeros_like(segments), nsp_labels=rng.integers(0, 2, BATCH).astype(np.int32))
    elif task == "seq2seq":
        model = tfm.Seq2SeqLM(_tiny("t5-tiny"))
        batch = dict(source=tokens(), target_in=tokens(), targets=tokens(), weights=weights,
                     source_segment_ids=segments, target_segment_ids=segments)
    elif task == "token_classification":
        model = tfm.TokenClassifier(_tiny("bert-tiny"), num_labels=5)
        batch = dict(tokens=tokens(), segment_ids=segments, labels=rng.integers(0, 5, (BATCH, LENGTH)).astype(np.int32),
                     weights=weights)
    elif task == "classification":
        model = tfm.SequenceClassifier(_tiny("bert-tiny"), num_labels=3)
        batch = dict(tokens=tokens(), segment_ids=segments, labels=rng.integers(0, 3, BATCH).astype(np.int32),
                     weights=segments[:, 0].astype(np.float32))
    elif task == "question_answering":
        model = tfm.QuestionAnswering(_tiny("bert-tiny"))
        positions = np.sort(rng.integers(0, LENGTH, (2, BATCH)).astype(np.int32), axis=0)
        batch = dict(tokens=tokens(), segment_ids=segments, token_types=(np.arange(LENGTH) >= LENGTH // 2)[None]
                     .repeat(BATCH, 0).astype(np.int32), start_positions=positions[0], end_positions=positions[1],
                     weights=segments[:, 0].astype(np.float32))
    else:
        model = tfm.CausalLM(_tiny("gpt2-tiny"))
        positions = np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1))
        batch = dict(tokens=tokens(), targets=tokens(), weights=weights, segment_ids=segments, positions=positions)
    return model, TASKS[task].objective, batch, frozen


# Span corruption and text-to-text train with seq2seq's objective on the same features; text pairs with
# classification's (token types added).
@pytest.mark.parametrize("task", [t for t in Task if t not in (Task.SPAN_CORRUPTION, Task.TEXT_TO_TEXT,
                                                             Task.PAIR_CLASSIFICATION)])
def test_accumulation_equals_one_large_batch_for_every_task(task):
    """k microbatches of unequal weight (and a filler row) give one batch's loss and update
    (plain SGD, so the update is the gradient), for every objective: MLM and NSP each keep their
    own mean over the whole batch, as do a distillation's KL (masked tokens) and cosine (all tokens)."""
    model, objective, batch, frozen = _task_case(task, np.random.default_rng(0))
    inputs = [batch[k][:1] for k in ("source", "target_in") if k in batch] or [batch["tokens"][:1]]
    mesh = train_step.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, shardings = train_step.create_state(model, optax.sgd(1.0), tuple(inputs), jax.random.PRNGKey(0), mesh)
    results = []
    for accumulation in (1, 4):
        step, _ = train_step.compile_steps(model, objective, optax.sgd(1.0), mesh, shardings, accumulation=accumulation,
                                           frozen=frozen)
        copy = jax.tree.map(jnp.copy, state)  # the step donates its input state
        results.append(step(copy, train_step.global_batch(batch, mesh), jax.random.PRNGKey(1)))
    (one, one_metrics), (four, four_metrics) = results
    for name in one_metrics:
        np.testing.assert_allclose(one_metrics[name], four_metrics[name], rtol=1e-5, atol=1e-5, err_msg=name)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, one.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step changed the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), one.params, four.params)


def _mean_token_loss(params, batch, tokens):
    """The weighted mean cross-entropy of CONFIG's CausalLM reading `tokens`, written out."""
    logits = tfm.CausalLM(CONFIG).apply(
        {"params": params}, tokens, segment_ids=batch["segment_ids"], positions=batch["positions"]
    )
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return (nll * batch["weights"]).sum() / batch["weights"].sum()


def _check_sgd_step(batch, sampling_probability=None, inputs=lambda params, tokens: tokens):
    """One compiled SGD step (lr 0.5) equals -0.5 times the gradient of `_mean_token_loss` on
    the inputs `inputs(params, tokens)`; returns the parameters before the step and the gradient."""
    state, step, mesh = set_up(optax.sgd(0.5), sampling_probability=sampling_probability)
    before = jax.tree.map(np.asarray, state.params)
    loss, gradients = jax.jit(jax.value_and_grad(_mean_token_loss))(before, batch, inputs(before, batch["tokens"]))
    state, metrics = step(state, train_step.global_batch(batch, mesh), jax.random.PRNGKey(0))
    np.testing.assert_allclose(metrics["loss"] / metrics["weight"], loss, rtol=1e-6)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, before, gradients)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, expected)
    return before, gradients


SPARSE_BATCH = dict(lm_batch(3), weights=(np.random.default_rng(3).random((BATCH, LENGTH)) < 0.6).astype(np.float32))


def test_a_step_descends_the_gradient_of_the_mean_token_loss():
    """The loss is the weighted mean of the tokens' cross-entropy, the update -lr times its gradient."""
    _check_sgd_step(SPARSE_BATCH)


def test_scheduled_sampling_trains_on_the_models_own_predictions():
    """With probability 1, every input token after a row's first is replaced by the teacher-forced
    pass's prediction of it (its argmax), and the step descends the loss on those inputs."""

    @jax.jit
    def predicted(params, tokens):
        logits = tfm.CausalLM(CONFIG).apply({"params": params}, tokens, segment_ids=SPARSE_BATCH["segment_ids"],
                                            positions=SPARSE_BATCH["positions"])
        return jnp.concatenate([tokens[:, :1], jnp.argmax(logits, -1)[:, :-1]], axis=1).astype(jnp.int32)

    before, sampled = _check_sgd_step(SPARSE_BATCH, optax.constant_schedule(1.0), predicted)
    teacher_forced = jax.jit(jax.grad(_mean_token_loss))(before, SPARSE_BATCH, SPARSE_BATCH["tokens"])  # another update
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), sampled, teacher_forced))) > 1e-4


def test_a_non_finite_step_changes_nothing_and_is_counted():
    optimizer = optim.make_optimizer(optim.learning_rate_schedule("constant", 1e-3, 1, 100))
    state, _ = train(optimizer, steps=2)
    poisoned = dict(lm_batch(5), weights=np.full((BATCH, LENGTH), np.inf, np.float32))
    model = tfm.CausalLM(CONFIG)
    mesh = train_step.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = train_step.state_shardings(state, model, mesh)
    step, _ = train_step.compile_steps(model, objectives.causal_lm, optimizer, mesh, shardings)
    before = jax.tree.map(np.asarray, state.params)
    state, _ = step(state, train_step.global_batch(poisoned, mesh), jax.random.PRNGKey(9))
    jax.tree.map(np.testing.assert_array_equal, before, state.params)
    assert [int(c) for c in optim.nonfinite_counts(state.opt_state)] == [1, 1]


SHARDED_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import test_train_step as t
from train import optim
optimizer = optim.make_optimizer(optim.learning_rate_schedule("constant", 1e-3, 1, 100))
results = {}
for sizes in [(1, 1, 1), (2, 2, 2), (1, 4, 2)]:
    state, losses = t.train(optimizer, steps=3, mesh_sizes=sizes)
    embedding = state.params["embed"]["token"]["embedding"].value
    kernel = state.params["decoder"]["layers"]["feed_forward"]["wi"]["kernel"].value
    key = state.params["decoder"]["layers"]["self_attention"]["key"]["kernel"].value
    results[str(sizes)] = dict(losses=losses, embedding=str(embedding.sharding.spec), wi=str(kernel.sharding.spec),
                               key=str(key.sharding.spec))
state, step, mesh = t.set_up(optimizer, accumulation=4, mesh_sizes=(2, 1, 1))
traced = step.trace(state, t.train_step.global_batch(t.lm_batch(0), mesh), jax.random.PRNGKey(0))
program = traced.lower().compile().as_text()
for kv_heads in (2, 1):  # grouped-query attention: K/V heads split where they divide evenly
    grouped = t.CONFIG.replace(num_kv_heads=kv_heads)
    for sizes in [(1, 1, 1), (1, 1, 2)]:
        state, losses = t.train(optimizer, steps=3, mesh_sizes=sizes, config=grouped)
        key = state.params["decoder"]["layers"]["self_attention"]["key"]["kernel"].value
        results[f"kv{kv_heads} {sizes}"] = dict(losses=losses, key=str(key.sharding.spec),
                                               key_bytes=key.addressable_shards[0].data.nbytes)
results["accumulated"] = dict(losses=t.train(optimizer, steps=3, mesh_sizes=(2, 1, 1), accumulation=4)[1],
                              all_to_all=program.count("all-to-all("))
print(json.dumps(results))
"""


def test_sharded_training_matches_one_device():
    """On 8 fake CPU devices, meshes (2,2,2) and (1,4,2) give the 1-device losses (float32,
    rtol 1e-5) and the parameters are sharded as the logical axis rules say (key and value
    kernels too, which every tensor shard held whole). Accumulating 4 microbatches on 2 devices
    gives them too, without moving rows between devices (contiguous microbatches took 30
    all-to-alls a step). Grouped-query key/value heads split over "tensor" where they divide
    evenly (every shard held them all), and multi-query attention's one head stays whole."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    output = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, os.path.dirname(__file__)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    results = json.loads(output.strip().splitlines()[-1])
    for kv_heads, spec in ((2, "P(None, 'fsdp', 'tensor', None)"), (1, "P(None, 'fsdp', None, None)")):
        one, two = results.pop(f"kv{kv_heads} (1, 1, 1)"), results.pop(f"kv{kv_heads} (1, 1, 2)")
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
        assert two["key"] == spec and two["key_bytes"] == one["key_bytes"] // (2 if kv_heads == 2 else 1)
    baseline = results.pop("(1, 1, 1)")["losses"]
    accumulated = results.pop("accumulated")
    np.testing.assert_allclose(accumulated["losses"], baseline, rtol=1e-5)
    assert accumulated["all_to_all"] == 0  # each device's rows split into microbatches where they are
    for sizes, result in results.items():
        np.testing.assert_allclose(result["losses"], baseline, rtol=1e-5, err_msg=sizes)
        assert result["embedding"] == "P('tensor', 'fsdp')", sizes  # vocab x embed
        assert result["wi"] == "P(None, 'fsdp', 'tensor')", sizes  # layers x embed x mlp
        # layers x embed x heads x head_dim: as many key heads as query heads split over "tensor" too
        assert result["key"] == "P(None, 'fsdp', 'tensor', None)", sizes


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="needs 4 devices"):
        train_step.make_mesh(2, 2, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="At most one mesh axis"):
        train_step.make_mesh(-1, -1, 1)


def test_the_batch_axes_must_split_over_the_processes():
    """Each process reads its own rows of a batch: a mesh whose data x fsdp shards cannot be
    shared out among the processes (tensor parallelism across hosts) is refused, never fed
    different rows as one replicated batch (two CPU processes with mesh (1, 1, 4) did that)."""
    mesh = train_step.make_mesh(devices=jax.devices()[:1])
    train_step.check_batch_axes(mesh, process_count=1)
    with pytest.raises(ValueError, match=r"data x fsdp = 1 shard\(s\), which 2 processes cannot share"):
        train_step.check_batch_axes(mesh, process_count=2)
