"""TrainConfig: every numeric field has a valid range, checked before anything is built, and bad
values or files are one-line errors naming the field (or file) and the fix; a train state too
large for the devices' memory is refused before anything is allocated."""

import math
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from train import config as config_lib
from train import objectives
from train import step as train_step
from train.config import RANGES, Range, TrainConfig
from transformer.config import ModelConfig
from transformer.tasks import Task


def numeric_fields() -> set[str]:
    return {name for name, value in config_lib.to_dict(TrainConfig()).items() if type(value) in (int, float)}


def test_every_numeric_field_has_a_range():
    assert set(RANGES) == numeric_fields()
    assert "resume_step" in RANGES and TrainConfig().resume_step == 0


def test_range_membership_and_text():
    assert str(Range(0, 1)) == "[0, 1)" and 0 in Range(0, 1) and 1 not in Range(0, 1)
    assert str(Range(0, low_open=True)) == "(0, inf)" and 0 not in Range(0, low_open=True)
    assert str(Range(0, 1, high_open=False)) == "[0, 1]" and 1.0 in Range(0, 1, high_open=False)
    assert all(v not in Range(0) for v in (float("nan"), float("inf"), -1e-9))
    mesh = RANGES["mesh_data"]
    assert -1 in mesh and 1 in mesh and 0 not in mesh and -2 not in mesh
    assert str(mesh) == "[1, 1048576], or -1 (the remaining devices)"


def test_every_count_has_an_upper_bound():
    """A count with zeros too many (batch_size=1000000000) is refused here, not a hang later."""
    counts = [name for name in numeric_fields() if type(getattr(TrainConfig(), name)) is int]
    assert counts and all(RANGES[name].high < math.inf for name in counts)


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=-1", "learning_rate=-1.0 is out of range: it must be in (0, inf)."),
        ("learning_rate=.nan", "learning_rate=nan is out of range: it must be in (0, inf)."),
        ("learning_rate=.inf", "learning_rate=inf is out of range: it must be in (0, inf)."),
        ("grad_clip=-1", "grad_clip=-1.0 is out of range: it must be in [0, inf)."),
        ("adam_b1=2", "adam_b1=2.0 is out of range: it must be in [0, 1)."),
        ("adam_b2=1", "adam_b2=1.0 is out of range: it must be in [0, 1)."),
        ("adam_eps=0", "adam_eps=0.0 is out of range: it must be in (0, inf)."),
        ("warmup_steps=-5", "warmup_steps=-5 is out of range: it must be in [0, 2147483647]."),
        ("eval_batches=-1", "eval_batches=-1 is out of range: it must be in [0, 2147483647]."),
        ("weight_decay=-0.1", "weight_decay=-0.1 is out of range: it must be in [0, inf)."),
        ("seed=-1", "seed=-1 is out of range: it must be in [0, 4294967294]."),
        ("seed=4294967295", "seed=4294967295 is out of range: it must be in [0, 4294967294]."),
        ("mesh_data=0", "mesh_data=0 is out of range: it must be in [1, 1048576], or -1 (the remaining devices)."),
        ("mesh_tensor=-2",
         "mesh_tensor=-2 is out of range: it must be in [1, 1048576], or -1 (the remaining devices)."),
        ("resume_step=-1", "resume_step=-1 is out of range: it must be in [0, 2147483647]."),
        ("steps=0", "steps=0 is out of range: it must be in [1, 2147483647]."),
        ("accumulation=0", "accumulation=0 is out of range: it must be in [1, 1048576]."),
        ("label_smoothing=1", "label_smoothing=1.0 is out of range: it must be in [0, 1)."),
        ("scheduled_sampling=1.5", "scheduled_sampling=1.5 is out of range: it must be in [0, 1]."),
        ("process_id=-2", "process_id=-2 is out of range: it must be in [-1, 1048575]."),
        ("peak_flops=-1", "peak_flops=-1.0 is out of range: it must be in [0, inf)."),
        ("batch_size=1000000000", "batch_size=1000000000 is out of range: it must be in [1, 1048576]."),
        ("steps=2147483648", "steps=2147483648 is out of range: it must be in [1, 2147483647]."),
        ("seq_length=100000000", "seq_length=100000000 is out of range: it must be in [1, 16777216]."),
        ("bleu_beams=5000", "bleu_beams=5000 is out of range: it must be in [0, 1024]."),
    ],
)
def test_out_of_range_value_names_field_and_range(override, message):
    with pytest.raises(ValueError) as error:
        config_lib.parse_args([override])
    assert str(error.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["warmup_steps=0", "grad_clip=0", "eval_batches=0", "mesh_data=-1", "adam_b1=0"],
        ["mesh_data=2", "mesh_fsdp=-1", "scheduled_sampling=1", "process_id=-1", "num_processes=0"],
        ["seed=4294967294", "resume_step=7", "sample_tokens=0", "bleu_examples=0", "peak_flops=0"],
        ["steps=2147483647", "batch_size=1048576", "accumulation=1048576", "bleu_beams=1024"],
    ],
)
def test_edge_values_are_valid(overrides):
    config = config_lib.parse_args(overrides)
    for item in overrides:
        key, _, value = item.partition("=")
        assert getattr(config, key) == float(value)


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match=r"^learning_rate=-1\.0 is out of range"):
        TrainConfig(learning_rate=-1)
    with pytest.raises(ValueError, match="^learning_rate must be of type float, got 'fast'"):
        TrainConfig(learning_rate="fast")
    config = TrainConfig(learning_rate=1, train_files=["a.txt"])  # coerced as from YAML
    assert config.learning_rate == 1.0 and config.train_files == ("a.txt",)


def test_masked_lm_row_options_are_checked():
    """Pairs (NSP, SOP), packing across documents and span masking: masked LM only, one at a time,
    pairs need two token types, span masking no pairs, the span boundary objective span masking."""
    bert = ["bert-tiny-mlm"]
    with pytest.raises(ValueError, match="^sentence_order_prediction applies to task=masked_lm only"):
        config_lib.parse_args(["sentence_order_prediction=true"])
    with pytest.raises(ValueError, match="^next_sentence_prediction and full_sentences exclude each other"):
        config_lib.parse_args([*bert, "full_sentences=true"])
    with pytest.raises(ValueError, match="^sentence_order_prediction needs two token types"):
        config_lib.parse_args([*bert, "next_sentence_prediction=false", "sentence_order_prediction=true",
                               "model.type_vocab_size=1"])
    config = config_lib.parse_args([*bert, "next_sentence_prediction=false", "sentence_order_prediction=true"])
    assert config.pair_head and not config.next_sentence_prediction
    # SpanBERT's options: masked LM, unpaired rows, the boundary head over masked spans.
    with pytest.raises(ValueError, match="^span_masking applies to task=masked_lm only"):
        config_lib.parse_args(["span_masking=true"])
    with pytest.raises(ValueError, match="^span_masking \\(SpanBERT\\) takes rows of one segment, without "
                                         "next_sentence_prediction"):
        config_lib.parse_args([*bert, "span_masking=true"])
    with pytest.raises(ValueError, match="^span_boundary_objective predicts masked spans .* set span_masking=True"):
        config_lib.parse_args(["spanbert-tiny", "span_masking=false"])


def test_span_corruption_options_are_checked():
    """Span corruption's targets fill seq_length exactly (the error gives the length); its noise
    settings belong to it alone; sentinels go only into a tokenizer the run trains."""
    t5 = ["t5-tiny-denoise"]
    with pytest.raises(ValueError, match=r"makes targets of exactly 14 tokens: set seq_length=14\.$"):
        config_lib.parse_args([*t5, "source_length=64"])
    with pytest.raises(ValueError, match=r"^source_length=8 is too short for span corruption"):
        config_lib.parse_args([*t5, "source_length=8"])
    assert config_lib.parse_args([*t5, "source_length=64", "seq_length=14"]).seq_length == 14
    assert config_lib.parse_args([*t5, "noise_density=0.3", "seq_length=65"]).noise_density == 0.3
    with pytest.raises(ValueError, match="^noise_density and mean_span_length apply to task=span_corruption only"):
        config_lib.parse_args(["transformer-tiny-en-fr", "mean_span_length=2"])
    with pytest.raises(ValueError, match=r"^tokenizer_extra_ids=100 adds sentinels to a tokenizer the run trains"):
        config_lib.parse_args([*t5, "init_from=runs/t5"])


def test_yaml_nan_names_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: .nan\n")
    with pytest.raises(ValueError, match=r"^learning_rate=nan is out of range: it must be in \(0, inf\)\.$"):
        config_lib.load_yaml(path)


def test_model_field_of_the_wrong_type_names_it():
    with pytest.raises(ValueError, match="^ModelConfig.d_model must be of type int, got 'abc'.$"):
        config_lib.parse_args(["model.d_model=abc"])
    with pytest.raises(ValueError, match="^ModelConfig.use_bias must be of type bool, got 3.$"):
        config_lib.parse_args(["model=gpt2-tiny", "model.use_bias=3"])


def test_binary_yaml_file_names_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"steps: 3\n\xff\xfe\x00\x81 binary\n")
    with pytest.raises(ValueError) as error:
        config_lib.parse_args([str(path)])
    assert str(error.value) == (
        f"Config file {path} is not a text YAML file (it holds bytes that are not UTF-8); "
        "pass a YAML file of key: value lines."
    )


def test_directory_as_yaml_file_names_it(tmp_path):
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory; pass a YAML file in it"):
        config_lib.parse_args([str(folder)])


def test_text_settings_on_the_command_line_are_taken_verbatim(tmp_path):
    """YAML would read these as a mapping, an octal number, a boolean and a comment."""
    config = config_lib.parse_args(["sample_prompt=ROMEO:", "run_dir=runs/010", "tokenizer=yes", "init_from=a #1"])
    assert (config.sample_prompt, config.run_dir, config.tokenizer, config.init_from) == (
        "ROMEO:", "runs/010", "yes", "a #1")
    assert config_lib.parse_args(["run_dir=010"]).run_dir == "010"
    config = config_lib.parse_args(["seed=010", "steps=0100", "model.d_model=064"])
    assert (config.seed, config.steps, config.model.d_model) == (10, 100, 64)  # decimal, not YAML's octal
    assert config_lib.parse_args(["train_files=[a.txt, b.txt]"]).train_files == ("a.txt", "b.txt")  # lists as YAML
    (tmp_path / "config.yaml").write_text("sample_prompt:\n  ROMEO: thou\n")
    with pytest.raises(ValueError, match="sample_prompt must be text.*quote it"):
        config_lib.parse_args([str(tmp_path / "config.yaml")])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "10"], "write steps=10, not --steps 10."),
        (["gpt-tiny", "--eval-every=5"], "write eval_every=5, not --eval-every=5."),
        (["--log-every", "seed=3"], "write log_every=VALUE, not --log-every."),
    ],
)
def test_flags_get_the_key_value_form_to_write(args, message):
    """Options written as other tools take them (--steps 10) name the setting to write instead."""
    with pytest.raises(ValueError, match="Settings are key=value words") as error:
        config_lib.parse_args(args)
    assert str(error.value).endswith(message)


# ----------------------------------------------------------------------------- memory


def create_state(config: ModelConfig, microbatch: int, length: int = 128):
    model = Task.CAUSAL_LM.model(config)
    inputs = Task.CAUSAL_LM.example_inputs(length)
    return train_step.create_state(model, optax.adamw(1e-3), inputs, jax.random.PRNGKey(0), train_step.make_mesh(),
                                   microbatch=microbatch)


class Allocated(Exception):
    """What jax.jit raises in these tests: the train state passed the checks and would be allocated."""


@pytest.fixture
def nothing_allocated(monkeypatch):
    def allocate(*args, **kwargs):
        raise Allocated

    monkeypatch.setattr(jax, "jit", allocate)


def gib(name: str, message: str) -> float:
    return float(re.search(rf"{name} ([\d,.]+) GiB", message)[1].replace(",", ""))


def test_a_model_too_large_for_any_device_is_refused_before_anything_is_allocated(nothing_allocated):
    """The largest sizes within the ranges need petabytes per device: refused with the figures and
    the settings to lower (`model.d_model=1000000` used to wait for ever at the state's first read)."""
    config = ModelConfig.preset("gpt2-tiny", d_model=2**16, num_heads=64, d_ff=2**18, num_decoder_layers=2**12)
    with pytest.raises(ValueError, match="^Training needs about ") as error:
        create_state(config, microbatch=1)
    message = str(error.value)
    assert gib("needs about", message) > 2**20  # a petabyte
    assert gib("optimizer state", message) == pytest.approx(3 * gib("gradients", message), rel=1e-3)  # Adam: 2 moments
    assert "but the host's memory shared by its 1 cpu device(s) gives each" in message
    for setting in ("model.d_model", "model.num_decoder_layers", "batch_size", "accumulation", "mesh_fsdp"):
        assert setting in message


def test_a_batch_too_large_for_the_memory_is_refused_before_anything_is_allocated(monkeypatch, nothing_allocated):
    """A microbatch whose activations exceed a device's memory is refused (batch_size=1000000000
    used to hang in the data pipeline, after the state was made); in 2**15 microbatches
    (accumulation) the same batch fits."""
    monkeypatch.setattr(train_step, "device_memory", lambda device: (2**30, "each test device holds"))
    config = ModelConfig.preset("gpt2-tiny")
    with pytest.raises(Allocated):
        create_state(config, microbatch=32)
    with pytest.raises(ValueError, match=r"but each test device holds 1\.0 GiB\. Lower") as error:
        create_state(config, microbatch=2**20)
    assert gib("activations of a microbatch", str(error.value)) > 1000


def test_a_devices_share_of_the_state_is_its_largest_shard():
    """Each leaf counts its shard on one device, a dimension that does not divide rounding up."""
    mesh = AbstractMesh((2, 4, 3), train_step.MESH_AXES)
    leaves = {"split": jax.ShapeDtypeStruct((10, 7), np.float32), "whole": jax.ShapeDtypeStruct((5,), np.int8)}
    shardings = {"split": NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor")),
                 "whole": NamedSharding(mesh, PartitionSpec())}
    assert train_step.shard_bytes(leaves, shardings) == 2 * 3 * 4 + 5  # [10 / 8, 7 / 3] rounded up, float32


def test_the_activation_estimate_is_near_what_xla_plans():
    """The rough estimate of the activations and gradients is within a factor of 1.5 of the
    memory XLA plans for a compiled gradient."""
    model = Task.CAUSAL_LM.model(ModelConfig.preset("gpt2-tiny", num_decoder_layers=1))
    batch, length = 16, 128
    inputs = Task.CAUSAL_LM.example_inputs(length)

    def loss(params, features):
        metrics = objectives.causal_lm(model, params, features, rng=jax.random.PRNGKey(0), deterministic=False)
        return objectives.training_loss(metrics, objectives.loss_weights(features))

    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    tokens = jax.ShapeDtypeStruct((batch, length), np.int32)
    features = dict(tokens=tokens, targets=tokens, segment_ids=tokens, positions=tokens,
                    weights=jax.ShapeDtypeStruct((batch, length), np.float32))
    planned = jax.jit(jax.grad(loss)).lower(params, features).compile().memory_analysis()
    gradients = planned.output_size_in_bytes
    estimate = train_step.activation_bytes(model, inputs, batch) + gradients
    assert 1 / 1.5 < estimate / (planned.temp_size_in_bytes + gradients) < 1.5
