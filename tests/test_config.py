"""ModelConfig: presets build, bad configs fail early with a useful message, round trips."""

import dataclasses

import pytest
import yaml

from transformer.config import (
    PRESETS,
    SIZES,
    Activation,
    AttentionImplementation,
    ModelConfig,
    Norm,
    PositionEncoding,
)

TINY = dict(vocab_size=32, d_model=16, num_heads=4, d_ff=32, num_decoder_layers=1)


def tiny(**changes):
    return ModelConfig(**{**TINY, **changes})


def test_preset_applies_changes():
    """preset(name, **changes) is the preset with those fields replaced, validated."""
    config = ModelConfig.preset("gpt2-tiny", num_decoder_layers=1, dropout_rate=0.0)
    assert config.num_decoder_layers == 1 and config.dropout_rate == 0.0
    assert config.replace(num_decoder_layers=2, dropout_rate=0.1) == PRESETS["gpt2-tiny"]
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig.preset("gpt2-tiny", num_heads=5)


def test_unknown_preset_lists_valid_names():
    """A typo in a preset name says which names exist."""
    with pytest.raises(ValueError, match="gpt2-smal") as info:
        ModelConfig.preset("gpt2-smal")
    message = str(info.value)
    for name in PRESETS:
        assert name in message


def test_head_dim_must_divide_d_model_unless_explicit():
    """d_model % num_heads != 0 is an error naming both fields, unless head_dim is set."""
    with pytest.raises(ValueError, match="d_model=18.*num_heads=4"):
        tiny(d_model=18)
    config = tiny(d_model=18, head_dim=8)
    assert config.head_dim == 8
    assert tiny().head_dim == 4


@pytest.mark.parametrize("num_kv_heads", [3, 0, 8])
def test_num_kv_heads_must_divide_num_heads(num_kv_heads):
    """Grouped-query attention needs num_kv_heads to be a divisor of num_heads."""
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny(num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("num_kv_heads", [None, 1, 2, 4])
def test_valid_num_kv_heads(num_kv_heads):
    """Divisors of num_heads (and None = num_heads) are accepted; None resolves to num_heads."""
    assert tiny(num_kv_heads=num_kv_heads).num_kv_heads == (num_kv_heads or 4)


def test_none_sizes_resolve_to_ints_and_stay_defaults_through_yaml():
    """None head sizes become ints in the config; its dict (and YAML) keeps them as defaults, so a
    config read back and changed derives them again; sizes set by hand are written as set."""
    config = tiny(d_model=32, num_heads=4, num_kv_heads=None, head_dim=None)
    assert (config.num_kv_heads, config.head_dim) == (4, 8)
    values = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert (values["num_kv_heads"], values["head_dim"]) == (None, None)
    assert ModelConfig.from_dict(values) == config
    assert ModelConfig.from_dict({**values, "num_heads": 2}).head_dim == 16
    explicit = tiny(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8).to_dict()
    assert (explicit["num_kv_heads"], explicit["head_dim"]) == (2, 8)
    assert ModelConfig.from_dict({**explicit, "num_heads": 8}).head_dim == 8


def test_replace_recomputes_defaulted_sizes_from_their_sources():
    """A defaulted head_dim and num_kv_heads follow a change of their sources; values set by hand,
    now or before, stay, even when they equal the default."""
    small = ModelConfig.preset("gpt2-small")  # D 768, N 12, H 64
    assert small.replace(d_model=512, num_heads=8).head_dim == 64
    assert small.replace(d_model=384).head_dim == 32
    assert small.replace(num_heads=8).num_kv_heads == 8
    assert small.replace(num_heads=8, head_dim=32).head_dim == 32  # given in the change: wins
    assert small.replace(num_heads=4, num_kv_heads=2).num_kv_heads == 2
    assert ModelConfig.preset("gpt2-small", d_model=512, num_heads=8).head_dim == 64
    explicit = tiny(d_model=18, head_dim=8)  # 18 // 4 != 8: set by hand, kept
    assert explicit.replace(d_model=20).head_dim == 8
    grouped = ModelConfig.preset("llama-tiny")  # N 4, K 2: grouped by hand, kept
    assert grouped.replace(num_heads=8).num_kv_heads == 2
    assert grouped.replace(d_model=128).replace(d_model=64) == grouped
    by_hand = ModelConfig.preset("gpt2-tiny", head_dim=16)  # equal to d_model // num_heads, but set
    assert by_hand.replace(d_model=128).head_dim == 16
    uneven = tiny(d_model=18, head_dim=4)  # 18 // 4 == 4, set by hand since 18 % 4 != 0
    assert uneven.replace(num_heads=2).head_dim == 4


@pytest.mark.parametrize(
    "field, enum_type",
    [
        ("activation", Activation),
        ("position", PositionEncoding),
        ("norm", Norm),
        ("attention_implementation", AttentionImplementation),
    ],
)
def test_unknown_choice_lists_choices(field, enum_type):
    """An unsupported string for an enum field names the field and every valid choice."""
    with pytest.raises(ValueError, match=field) as info:
        tiny(**{field: "bogus"})
    message = str(info.value)
    assert "bogus" in message
    for member in enum_type:
        assert repr(member.value) in message


def test_config_needs_layers():
    """A config with neither encoder nor decoder layers is rejected."""
    with pytest.raises(ValueError, match="num_encoder_layers"):
        tiny(num_decoder_layers=0)


def test_every_size_has_bounds():
    """Every whole-number field but num_kv_heads (a divisor of num_heads) has a finite range."""
    whole = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", "int | None")}
    assert set(SIZES) == whole - {"num_kv_heads"}


@pytest.mark.parametrize(
    "field, value, bounds",
    [
        ("d_model", 1_000_000, "[1, 65536]"),
        ("vocab_size", 2_000_000_000, "[1, 16777216]"),
        ("num_decoder_layers", 100_000, "[0, 4096]"),
        ("num_encoder_layers", -1, "[0, 4096]"),
        ("d_ff", 0, "[1, 262144]"),
        ("num_heads", 2**17, "[1, 65536]"),
        ("head_dim", 2**17, "[1, 65536]"),
        ("max_length", 2**25, "[1, 16777216]"),
        ("sliding_window", 0, "[1, 16777216]"),
        ("type_vocab_size", 2**20, "[0, 65536]"),
    ],
)
def test_a_size_out_of_range_names_the_field_and_its_bounds(field, value, bounds):
    """A size with zeros too many is refused when the config is built, before anything is traced."""
    with pytest.raises(ValueError) as error:
        tiny(**{field: value})
    assert str(error.value) == f"ModelConfig.{field}={value} is out of range: it must be in {bounds}."


@pytest.mark.parametrize("field", ["dropout_rate", "attention_dropout_rate"])
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_outside_unit_interval(field, rate):
    """Dropout rates must lie in [0, 1)."""
    with pytest.raises(ValueError, match=field):
        tiny(**{field: rate})


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
@pytest.mark.parametrize("dtype", ["int32", "bool", "not-a-dtype"])
def test_dtype_must_be_floating(field, dtype):
    """Compute and parameter dtypes must be floating point."""
    with pytest.raises(ValueError, match=field):
        tiny(**{field: dtype})


def test_floating_dtypes_accepted():
    """bfloat16 and float16 are valid compute dtypes."""
    assert tiny(dtype="bfloat16").dtype == "bfloat16"
    assert tiny(dtype="float16", param_dtype="bfloat16").param_dtype == "bfloat16"


def test_rope_needs_even_head_dim():
    """Rotary embeddings rotate pairs of dimensions, so the head dimension must be even."""
    with pytest.raises(ValueError, match="even head dimension"):
        tiny(position="rope", d_model=12, num_heads=4)  # head dim 3
    with pytest.raises(ValueError, match="even head dimension"):
        tiny(position="rope", head_dim=5)
    assert tiny(position="rope").head_dim == 4
    with pytest.raises(ValueError, match="rope_theta=-10000.0 must be > 0"):
        tiny(position="rope", rope_theta=-10000.0)


def test_replace_unknown_key_is_named():
    """replace() with a misspelt field names it instead of silently ignoring it."""
    with pytest.raises(ValueError, match="'num_head'"):
        tiny().replace(num_head=2)


def test_from_dict_unknown_key_is_named():
    """from_dict() with an unknown key names it and lists the valid fields."""
    values = {**tiny().to_dict(), "dropout": 0.1}
    with pytest.raises(ValueError, match="'dropout'") as info:
        ModelConfig.from_dict(values)
    assert "dropout_rate" in str(info.value)


def test_replace_validates():
    """replace() goes through the same checks as construction."""
    with pytest.raises(ValueError, match="dropout_rate"):
        tiny().replace(dropout_rate=2.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name):
    """to_dict gives plain values (enums as str) and from_dict restores an equal config."""
    config = PRESETS[name]
    values = config.to_dict()
    assert set(values) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert all(type(v) in (int, float, str, bool, type(None)) for v in values.values())
    assert ModelConfig.from_dict(values) == config


def test_enum_fields_accept_strings():
    """Enum fields accept plain strings, are converted to the enum, and compare equal to str."""
    config = tiny(position="rope", norm="rmsnorm", activation="swiglu", attention_implementation="chunked")
    assert config.position is PositionEncoding.ROPE
    assert config.norm is Norm.RMSNORM
    assert config.activation is Activation.SWIGLU and config.activation.gated
    assert config.attention_implementation is AttentionImplementation.CHUNKED
    assert config.position == "rope" and config.norm == "rmsnorm"
    assert config == tiny(
        position=PositionEncoding.ROPE,
        norm=Norm.RMSNORM,
        activation=Activation.SWIGLU,
        attention_implementation=AttentionImplementation.CHUNKED,
    )


def test_config_is_frozen():
    """A config cannot be mutated in place; replace() returns a new one."""
    config = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 32
    assert config.replace(d_model=32).d_model == 32
    assert config.d_model == 16


def test_config_is_keyword_only():
    """Fields are keyword-only, so a reordering of fields cannot silently swap values."""
    with pytest.raises(TypeError):
        ModelConfig(32, 16, 4, 32)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("d_model", "abc", "int"),
        ("d_model", 16.0, "int"),
        ("num_decoder_layers", True, "int"),
        ("head_dim", "4", "int or None"),
        ("dropout_rate", "high", "float"),
        ("use_bias", 1, "bool"),
        ("scan_layers", "yes", "bool"),
    ],
)
def test_field_of_the_wrong_type_names_field_and_type(field, value, expected):
    """A value of the wrong type is a ValueError naming the field and its type, not a TypeError later."""
    with pytest.raises(ValueError) as info:
        tiny(**{field: value})
    assert str(info.value) == f"ModelConfig.{field} must be of type {expected}, got {value!r}."


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_float_fields_must_be_finite(value):
    """NaN or infinity in a float field is refused, naming the field."""
    with pytest.raises(ValueError, match="ModelConfig.norm_epsilon must be a finite number"):
        tiny(norm_epsilon=value)


def test_numbers_are_coerced_to_the_field_type():
    """An int for a float field, and YAML 1.1's string for 1e-6, become floats; None head_dim resolves."""
    config = tiny(dropout_rate=0, norm_epsilon="1e-6", head_dim=None)
    assert type(config.dropout_rate) is float and config.norm_epsilon == 1e-6 and config.head_dim == 4
    assert config == tiny(dropout_rate=0.0, norm_epsilon=1e-6)
