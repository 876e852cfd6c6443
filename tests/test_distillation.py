"""Knowledge distillation (DistilBERT): the softened KL and cosine terms against numpy, the
objective's terms and the loss a step minimises by hand, a student started from every other
teacher layer, a teacher identical to its student scoring zero, and the errors for a teacher
that does not fit its student."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import preset
from flax import traverse_util
from processes import ROOT

import flax.linen as nn
import transformer as tfm
from train import config as config_lib
from train import loop, objectives
from train.step import global_batch
from transformer.architectures import MLM
from transformer.models import keep_layers
from transformer.pretrained import from_pretrained
from transformer.runs import load_run

FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"
WORDS = "the dog barked fast children came birds fish clouds dark evening bread water river".split()


def flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(params), sep="/").items()}


def test_softened_kl_and_cosine_match_numpy():
    """KL(softmax(t / T) || softmax(s / T)) x T^2, zero for equal logits; cos along the last axis."""
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 3, 11)) * 3, rng.normal(size=(2, 3, 11)) * 3
    p, q = scipy.special.softmax(teacher / 2, -1), scipy.special.softmax(student / 2, -1)
    expected = (p * (np.log(p) - np.log(q))).sum(-1) * 4
    np.testing.assert_allclose(objectives.softened_kl(jnp.asarray(teacher), jnp.asarray(student), 2.0), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(objectives.softened_kl(jnp.asarray(teacher), jnp.asarray(teacher), 2.0), 0, atol=1e-6)
    cos = (teacher * student).sum(-1) / np.linalg.norm(teacher, axis=-1) / np.linalg.norm(student, axis=-1)
    np.testing.assert_allclose(objectives.cosine_similarity(jnp.asarray(teacher), jnp.asarray(student)), cos,
                               rtol=1e-5)


def models_and_batch():
    """A 2-layer teacher, a 1-layer student of its width, their parameters and a batch whose last
    row is padding after 5 tokens."""
    teacher = tfm.MaskedLM(preset("bert-tiny", vocab_size=64, num_encoder_layers=2))
    student = tfm.MaskedLM(teacher.config.replace(num_encoder_layers=1))
    rng = np.random.default_rng(0)
    segments = np.ones((3, 8), np.int32)
    segments[2, 5:] = 0
    batch = dict(
        tokens=rng.integers(7, 64, (3, 8)).astype(np.int32), targets=rng.integers(7, 64, (3, 8)).astype(np.int32),
        weights=(rng.random((3, 8)) < 0.4).astype(np.float32) * segments, segment_ids=segments,
        token_types=np.zeros((3, 8), np.int32),
    )
    teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(0), batch["tokens"])["params"]
    student_params = jax.jit(student.init)(jax.random.PRNGKey(1), batch["tokens"])["params"]
    return teacher, nn.meta.unbox(teacher_params), student, nn.meta.unbox(student_params), batch


def distil(student, params, batch, teacher, frozen, kl_weight=5.0):
    """The objective's metric sums, compiled as one program (as the step runs it)."""
    def metrics(params, frozen):
        return objectives.distillation(student, params, batch, rng=jax.random.PRNGKey(0), deterministic=True,
                                       frozen=frozen, teacher=teacher, temperature=2.0, kl_weight=kl_weight,
                                       mlm_weight=2.0, cosine_weight=1.0)

    return jax.jit(metrics)(params, frozen)


def test_each_term_and_the_loss_a_step_minimises_by_hand():
    """kl_loss sums the softened KL over the masked tokens, cosine_loss 1 - cos of the last hidden
    states over the real tokens (padding left out), loss the student's masked-LM cross-entropy; the
    step minimises 2 x loss / masked + 5 x kl / masked + 1 x cosine / real tokens."""
    teacher, frozen, student, params, batch = models_and_batch()
    metrics = distil(student, params, batch, teacher, frozen)

    def states_and_logits(model, variables):
        @jax.jit
        def forward(variables):
            hidden = model.apply({"params": variables}, batch["tokens"], segment_ids=batch["segment_ids"], method="encode")
            return hidden, model.apply({"params": variables}, batch["tokens"], segment_ids=batch["segment_ids"])

        return jax.tree.map(np.asarray, forward(variables))

    (h_t, logits_t), (h_s, logits_s) = states_and_logits(teacher, frozen), states_and_logits(student, params)
    masked, real = batch["weights"] > 0, batch["segment_ids"] > 0
    p, q = scipy.special.softmax(logits_t / 2, -1), scipy.special.softmax(logits_s / 2, -1)
    kl = (p * (np.log(p) - np.log(q))).sum(-1) * 4
    np.testing.assert_allclose(metrics["kl_loss"], kl[masked].sum(), rtol=1e-4)
    cos = (h_t * h_s).sum(-1) / np.linalg.norm(h_t, axis=-1) / np.linalg.norm(h_s, axis=-1)
    np.testing.assert_allclose(metrics["cosine_loss"], (1 - cos)[real].sum(), rtol=1e-4)
    assert float(metrics["token_weight"]) == real.sum() == 21
    log_q = scipy.special.log_softmax(logits_s, -1)
    np.testing.assert_allclose(metrics["loss"], -np.take_along_axis(log_q, batch["targets"][..., None], -1)[masked].sum(),
                               rtol=1e-5)
    total = objectives.training_loss(metrics, objectives.loss_weights(batch))
    expected = (2 * metrics["loss"] + 5 * metrics["kl_loss"]) / masked.sum() + metrics["cosine_loss"] / real.sum()
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert "kl_loss" not in distil(student, params, batch, teacher, frozen, kl_weight=0.0)


def test_a_teacher_identical_to_the_student_scores_zero_kl_and_cosine():
    """The student's own parameters as its teacher: nothing to learn from it (and a student
    that differs scores above zero)."""
    teacher, frozen, _, _, batch = models_and_batch()
    same = distil(teacher, frozen, batch, teacher, frozen)
    assert abs(float(same["kl_loss"])) < 1e-5 and abs(float(same["cosine_loss"])) < 1e-5
    nudged = jax.tree.map(lambda x: x * 1.1, frozen)
    other = distil(teacher, nudged, batch, teacher, frozen)
    assert float(other["kl_loss"]) > 1e-3 and float(other["cosine_loss"]) > 1e-4


@pytest.mark.parametrize("scan", [True, False])
def test_keep_layers_takes_the_chosen_layers_of_a_scanned_or_unscanned_stack(scan):
    """A 2-layer model from layers 0 and 2 of a 4-layer one computes what the 4-layer model's
    blocks 0 and 2 compute: the same as a 2-layer model given those blocks by hand."""
    config = preset("bert-tiny", vocab_size=64, num_encoder_layers=4, scan_layers=scan)
    deep, shallow = tfm.EncoderModel(config), tfm.EncoderModel(config.replace(num_encoder_layers=2))
    tokens = np.arange(7, 15, dtype=np.int32)[None]
    rng = np.random.default_rng(0)  # any values: each parameter is its own draw (no init program to compile)
    shapes = nn.meta.unbox(jax.eval_shape(deep.init, jax.random.PRNGKey(0), tokens)["params"])
    params = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), shapes)
    kept = flat(keep_layers(params, [0, 2]))
    source = flat(params)
    for name, value in kept.items():
        if scan and name.startswith("encoder/layers/"):
            np.testing.assert_array_equal(value, source[name][[0, 2]], err_msg=name)
        elif not scan and name.startswith("encoder/layers_"):
            layer = {"0": "0", "1": "2"}[name.split("/")[1].removeprefix("layers_")]
            np.testing.assert_array_equal(value, source[name.replace(name.split("/")[1], f"layers_{layer}")])
        else:
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    shapes = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(shallow.init, jax.random.PRNGKey(0), tokens)),
                                        sep="/")
    assert {name: value.shape for name, value in kept.items()} == {
        name.removeprefix("params/"): value.shape for name, value in shapes.items()}  # it fits the 2-layer model


@pytest.mark.parametrize("teacher_layers, student, expected", [
    (6, 0, [0, 2, 4]), (12, 0, [0, 2, 4, 6, 8, 10]), (6, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (1, 0, [0]),
])
def test_a_student_takes_every_other_teacher_layer_by_default(teacher_layers, student, expected):
    config = config_lib.parse_args(["minilm-distil", f"student_layers={student}"])
    assert loop.student_layers(config, teacher_layers) == expected


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("distillation-text")
    rng = np.random.default_rng(0)
    paths = {}
    for split, documents in (("train", 8), ("validation", 2)):
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text("\n\n".join("\n".join(" ".join(rng.choice(WORDS, 7)) + "." for _ in range(5))
                                            for _ in range(documents)) + "\n")
    return paths


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> pathlib.Path:
    """The tiny random BertForPreTraining (2 layers, a masked-LM head), copied."""
    return pathlib.Path(shutil.copytree(FIXTURES / "bert", tmp_path_factory.mktemp("hf") / "bert"))


def distillation_args(teacher, text, run_dir, *extra) -> list[str]:
    return [
        "minilm-distil", f"teacher={teacher}", f"train_files=[{text['train']}]", f"validation_files=[{text['validation']}]",
        "distill_kl_weight=5", "distill_mlm_weight=2", "seq_length=16", "batch_size=4", "steps=2", "warmup_steps=1",
        "log_every=1", "eval_every=2", "eval_batches=1", "checkpoint_every=2", "model.dropout_rate=0.0",
        "model.attention_dropout_rate=0.0", f"run_dir={run_dir}", *extra,
    ]


def set_up(args) -> loop.Job:
    config = loop.resolve_init_from(config_lib.parse_args(args))
    config.run_path.mkdir(parents=True)
    job = loop.set_up(config, config.run_path, resuming=False)
    job.state = loop.load_pretrained(job, say=lambda *_: None)
    return job


def test_the_student_starts_from_every_other_teacher_layer_and_trains(teacher, text, tmp_path):
    """Half the teacher's 2 layers: its layer 0, with its embeddings and masked-LM head, nothing
    new; the run trains and reports the KL and cosine terms; the student reopens as a masked LM
    (which fine-tunes as any masked-LM run does)."""
    config = loop.resolve_init_from(config_lib.parse_args(distillation_args(teacher, text, tmp_path / "run")))
    assert (config.model.num_encoder_layers, config.model.d_model, config.model.vocab_size) == (1, 32, 200)
    job = set_up(distillation_args(teacher, text, tmp_path / "run"))
    expected = flat(keep_layers(from_pretrained(teacher, MLM, scan_layers=config.model.scan_layers).params, [0]))
    started = flat(job.state.params)
    assert set(started) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(started[name], value, err_msg=name)
    result = loop.run(config_lib.parse_args(distillation_args(teacher, text, tmp_path / "trained")), progress=False)
    assert result.step == 2 and result.validation["kl_loss"] > 0 and result.validation["cosine_loss"] > 0
    student = load_run(tmp_path / "trained")
    assert isinstance(student.model, tfm.MaskedLM) and student.model.config.num_encoder_layers == 1


def test_a_student_as_deep_as_its_teacher_starts_at_zero_kl_and_cosine(teacher, text, tmp_path):
    """student_layers = the teacher's: the student starts as the teacher, and the job's own
    evaluation step measures no KL and no cosine distance between them."""
    job = set_up(distillation_args(teacher, text, tmp_path / "run", "student_layers=2"))
    batch = next(iter(loop.validation_batches(job.data.validation, job.config)))
    sums = jax.device_get(job.eval_step(job.state.params, global_batch(batch, job.mesh)))
    assert sums["weight"] > 0 and abs(sums["kl_loss"]) < 1e-4 and abs(sums["cosine_loss"]) < 1e-4


@pytest.mark.parametrize("extra, message", [
    (("init_from={roberta}",), r"another vocabulary than the student .*300 pieces"),
    (("teacher={bert_body}",), r"no masked-LM head .*distill_kl_weight=0"),
    (("student_layers=3",), r"student_layers=3, but the teacher .* has 2 layers"),
    (("teacher={gpt2}",), r"teacher=.* decoder only .*task=distillation needs an encoder only .*distil an encoder"),
])
def test_a_teacher_that_does_not_fit_the_student_is_refused_before_training(teacher, text, tmp_path, extra, message):
    fixtures = {name.replace("-", "_"): FIXTURES / name for name in ("roberta", "bert-body", "gpt2")}
    args = distillation_args(teacher, text, tmp_path / "run", *(e.format(**fixtures) for e in extra))
    with pytest.raises(ValueError, match=message):
        loop.run(config_lib.parse_args(args), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_whose_pieces_differ_at_some_id_is_refused(teacher, text, tmp_path):
    """The same number of pieces is not the same vocabulary: two words' ids swapped are named."""
    swapped = pathlib.Path(shutil.copytree(teacher, tmp_path / "swapped"))
    layout = json.loads((swapped / "tokenizer.json").read_text())
    vocab = layout["model"]["vocab"]
    vocab["dog"], vocab["fish"] = vocab["fish"], vocab["dog"]
    (swapped / "tokenizer.json").write_text(json.dumps(layout))
    (swapped / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    args = distillation_args(teacher, text, tmp_path / "run", f"init_from={swapped}")
    first = min(vocab["dog"], vocab["fish"])
    with pytest.raises(ValueError, match=rf"id {first} is '(dog|fish)' to the teacher"):
        loop.run(config_lib.parse_args(args), progress=False)


@pytest.mark.parametrize("args, message", [
    (["bert-tiny-mlm", "teacher=runs/x"], "teacher apply to task=distillation only"),
    (["minilm-distil", "teacher="], "task=distillation needs a teacher"),
    (["minilm-distil", "distill_kl_weight=0", "distill_mlm_weight=0", "distill_cosine_weight=0"], "all 0"),
])
def test_distillation_settings_are_checked(args, message):
    with pytest.raises(ValueError, match=message):
        config_lib.parse_args(args)
