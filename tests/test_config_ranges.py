"""TrainConfig: every numeric field has a valid range, checked before anything is built, and bad
values or files are one-line errors naming the field (or file) and the fix."""

import pytest

from train import config as config_lib
from train.config import RANGES, Range, TrainConfig


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
    assert str(mesh) == "[1, inf), or -1 (the remaining devices)"


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
        ("warmup_steps=-5", "warmup_steps=-5 is out of range: it must be in [0, inf)."),
        ("eval_batches=-1", "eval_batches=-1 is out of range: it must be in [0, inf)."),
        ("weight_decay=-0.1", "weight_decay=-0.1 is out of range: it must be in [0, inf)."),
        ("seed=-1", "seed=-1 is out of range: it must be in [0, 4294967294]."),
        ("seed=4294967295", "seed=4294967295 is out of range: it must be in [0, 4294967294]."),
        ("mesh_data=0", "mesh_data=0 is out of range: it must be in [1, inf), or -1 (the remaining devices)."),
        ("mesh_tensor=-2", "mesh_tensor=-2 is out of range: it must be in [1, inf), or -1 (the remaining devices)."),
        ("resume_step=-1", "resume_step=-1 is out of range: it must be in [0, inf)."),
        ("steps=0", "steps=0 is out of range: it must be in [1, inf)."),
        ("accumulation=0", "accumulation=0 is out of range: it must be in [1, inf)."),
        ("label_smoothing=1", "label_smoothing=1.0 is out of range: it must be in [0, 1)."),
        ("scheduled_sampling=1.5", "scheduled_sampling=1.5 is out of range: it must be in [0, 1]."),
        ("process_id=-2", "process_id=-2 is out of range: it must be in [-1, inf)."),
        ("peak_flops=-1", "peak_flops=-1.0 is out of range: it must be in [0, inf)."),
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
