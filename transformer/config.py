"""ModelConfig: the architecture of every model in the library, and its named presets.

The config holds the architecture only. Modes such as training versus inference
(`deterministic`) or decoding (a cache) are call arguments, never config fields.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import typing
from typing import Any

import jax.numpy as jnp


class PositionEncoding(enum.StrEnum):
    SINUSOIDAL = "sinusoidal"  # fixed sin/cos added to the embeddings (2017 paper)
    LEARNED = "learned"  # a trained table added to the embeddings (BERT, GPT-2)
    ROPE = "rope"  # rotary, applied to queries and keys (RoFormer, LLaMA)
    RELATIVE = "relative"  # T5 bucketed relative-position bias on the attention logits


class Norm(enum.StrEnum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class NormPosition(enum.StrEnum):
    PRE = "pre"  # x + f(norm(x)), with a final norm after the stack (GPT-2, T5)
    POST = "post"  # norm(x + f(x)) (2017 paper, BERT)


class Activation(enum.StrEnum):
    RELU = "relu"
    GELU = "gelu"  # exact erf GELU (BERT)
    GELU_TANH = "gelu_tanh"  # tanh approximation (GPT-2)
    SWIGLU = "swiglu"  # gated: silu(x W) * (x V)
    GEGLU = "geglu"  # gated: gelu(x W) * (x V)
    GEGLU_TANH = "geglu_tanh"  # gated with the tanh GELU (T5 v1.1, Flan-T5)

    @property
    def gated(self) -> bool:
        return self in (Activation.SWIGLU, Activation.GEGLU, Activation.GEGLU_TANH)


class AttentionImplementation(enum.StrEnum):
    REFERENCE = "reference"  # plain einsums, the ground truth for the others
    XLA = "xla"  # jax.nn.dot_product_attention, XLA lowering
    CUDNN = "cudnn"  # jax.nn.dot_product_attention, cuDNN flash attention (NVIDIA only)
    CHUNKED = "chunked"  # online softmax over blocks: memory linear in length


class Pooler(enum.StrEnum):
    """How an encoder's classifier reads the first token's state h: act(h W + b)."""

    TANH = "tanh"  # BERT's pooler, RoBERTa's and ALBERT's classification heads
    RELU = "relu"  # DistilBERT's pre_classifier


class Initialisation(enum.StrEnum):
    """How weight matrices and tables start: normal draws of a fixed or a fan-in scale."""

    NORMAL = "normal"  # N(0, 0.02) (BERT, GPT)
    FAN_IN = "fan_in"  # N(0, 1 / fan_in) matrices, N(0, 1) embeddings (T5, Mesh TensorFlow)


class RematPolicy(enum.StrEnum):
    NONE = "none"  # keep every activation
    FULL = "full"  # recompute the whole block in the backward pass
    DOTS = "dots"  # keep matmul outputs, recompute the rest
    DOTS_NO_BATCH = "dots_no_batch"  # keep weight matmuls, recompute attention


_ENUM_FIELDS = {
    "position": PositionEncoding,
    "norm": Norm,
    "norm_position": NormPosition,
    "activation": Activation,
    "attention_implementation": AttentionImplementation,
    "remat_policy": RematPolicy,
    "pooler": Pooler,
    "initialisation": Initialisation,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of an encoder-only, decoder-only or encoder-decoder Transformer.

    `num_encoder_layers` and `num_decoder_layers` say which stacks exist: BERT has
    only an encoder, GPT-2 only a decoder, T5 and the 2017 Transformer both.
    """

    vocab_size: int
    d_model: int
    num_heads: int
    d_ff: int
    num_encoder_layers: int = 0
    num_decoder_layers: int = 0
    num_kv_heads: int | None = None  # fewer than num_heads = grouped/multi-query; None -> num_heads
    head_dim: int | None = None  # H; None -> d_model // num_heads
    max_length: int = 512  # longest sequence (learned table size, generation limit)
    # Mistral's window: a position attends to the last `sliding_window` ones. Computed exactly within
    # it only (full attention), so max_length <= sliding_window; None: no window.
    sliding_window: int | None = None
    position: PositionEncoding = PositionEncoding.LEARNED
    rope_theta: float = 10_000.0
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    norm: Norm = Norm.LAYERNORM
    norm_position: NormPosition = NormPosition.PRE
    norm_epsilon: float = 1e-5
    embedding_norm: bool = False  # normalize the summed embeddings (BERT)
    activation: Activation = Activation.GELU
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    feed_forward_dropout_rate: float = 0.0  # on the feed-forward's hidden activations (T5)
    initialisation: Initialisation = Initialisation.NORMAL
    scale_residual_init: bool = False  # residual projections' initial scale divided by sqrt(2L) (GPT-2)
    use_bias: bool = True  # biases in attention and feed-forward projections
    tie_embeddings: bool = True  # output logits use the token embedding matrix
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (2017 paper)
    rescale_tied_logits: bool = False  # multiply by d_model**-0.5 before tied logits (T5)
    attention_logit_scaling: bool = True  # divide logits by sqrt(head_dim); T5 does not (its init does)
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0 = none
    # Learned positions are rows position + offset of a table of max_length + offset rows:
    # RoBERTa's tables start after its padding id (padding_idx + 1 = 2).
    position_offset: int = 0
    # Factorised embeddings (ALBERT): tokens embedded in E dims, projected to d_model (and the
    # masked-LM head back to E); None: embedded in d_model directly.
    embedding_size: int | None = None
    share_layers: bool = False  # one set of layer parameters used by every layer of a stack (ALBERT)
    pooler: Pooler = Pooler.TANH
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: str = "float32"
    scan_layers: bool = True  # nn.scan over layers: compile time independent of depth
    # Under nn.scan, keeping every activation stacks each layer's elementwise intermediates too
    # (five [B, T, F] arrays for GELU), written and read back through the loop: 10% slower
    # training steps on a CPU than recomputing them (20% on an H100), and more memory. Unrolled
    # layers (scan_layers=False) train fastest with "none" where memory allows: GPT-2 small on
    # an H100, 46 against 54 ms a step (recomputing cuDNN attention costs more than it saves).
    remat_policy: RematPolicy = RematPolicy.DOTS_NO_BATCH
    attention_implementation: AttentionImplementation = AttentionImplementation.XLA

    def __post_init__(self):
        for name, kind in _SCALAR_FIELDS.items():
            object.__setattr__(self, name, _scalar(name, kind, getattr(self, name)))
        for name, enum_type in _ENUM_FIELDS.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                choices = ", ".join(repr(m.value) for m in enum_type)
                raise ValueError(
                    f"ModelConfig.{name}={value!r} is not supported; choose one of {choices}."
                ) from None
        for name in ("dtype", "param_dtype"):
            try:
                dtype = jnp.dtype(getattr(self, name))
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r} is not a floating dtype; "
                    "use 'float32', 'bfloat16' or 'float16'."
                )
            object.__setattr__(self, name, dtype.name)  # a plain string, e.g. for JSON
        self._check_sizes("vocab_size", "d_model", "num_heads", "d_ff", "max_length")
        self._resolve_sizes()
        self._check()

    def _check_sizes(self, *names: str):
        """Each size within `SIZES` (a None sliding_window is no window)."""
        for name in names:
            value, (low, high) = getattr(self, name), SIZES[name]
            if value is not None and not low <= value <= high:
                raise ValueError(f"ModelConfig.{name}={value!r} is out of range: it must be in [{low}, {high}].")

    def _resolve_sizes(self):
        """None head sizes -> ints: num_kv_heads = num_heads, head_dim = d_model // num_heads.

        Which of them were defaulted is kept (`_defaulted`): `replace` derives them again from
        the new fields and `to_dict` writes them as None, so a default stays a default.
        """
        defaulted = {name for name in ("num_kv_heads", "head_dim") if getattr(self, name) is None}
        object.__setattr__(self, "_defaulted", frozenset(defaulted))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                    "choose num_heads dividing d_model, or set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)

    def _check(self):
        self._check_sizes(*SIZES)
        if self.num_encoder_layers == 0 and self.num_decoder_layers == 0:
            raise ValueError(
                "ModelConfig has no layers: set num_encoder_layers (encoder-only), "
                "num_decoder_layers (decoder-only) or both (encoder-decoder)."
            )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "(grouped-query attention shares each key/value head among num_heads // num_kv_heads "
                "query heads); use a divisor of num_heads, or None for num_heads."
            )
        if self.position == PositionEncoding.ROPE and not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 0 (the rotary base; Llama's: 10000).")
        if self.position == PositionEncoding.ROPE and self.head_dim % 2:
            raise ValueError(
                f"Rotary position encoding needs an even head dimension, got {self.head_dim}; "
                "change head_dim (or d_model / num_heads)."
            )
        if self.position_offset and self.position != PositionEncoding.LEARNED:
            raise ValueError(
                f"ModelConfig.position_offset={self.position_offset} shifts a learned position table; with "
                f"position={self.position.value!r} there is none. Set position_offset=0."
            )
        if self.position == PositionEncoding.SINUSOIDAL and self.d_model % 2:
            raise ValueError(f"Sinusoidal positions need an even d_model, got {self.d_model}.")
        if self.position == PositionEncoding.RELATIVE and self.relative_num_buckets < 4:
            raise ValueError("ModelConfig.relative_num_buckets must be >= 4.")
        if self.position == PositionEncoding.RELATIVE and self.relative_max_distance <= self.relative_num_buckets // 2:
            raise ValueError(
                f"ModelConfig.relative_max_distance={self.relative_max_distance} must exceed "
                f"relative_num_buckets // 2 = {self.relative_num_buckets // 2} (exact buckets end there)."
            )
        for name in ("dropout_rate", "attention_dropout_rate", "feed_forward_dropout_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {rate}.")
        if self.norm_epsilon <= 0:
            raise ValueError(f"ModelConfig.norm_epsilon must be positive, got {self.norm_epsilon}.")
        if self.sliding_window is not None and self.max_length > self.sliding_window:
            raise ValueError(
                f"ModelConfig.max_length={self.max_length} exceeds sliding_window={self.sliding_window}: past it the "
                "model attends to a window, which the library does not compute. Use max_length <= the window."
            )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (and validated); unknown fields are an error.

        Sizes that were defaulted (head_dim, num_kv_heads left None) are derived again from the
        new fields unless given; sizes set by hand stay.
        """
        _check_keys(changes)
        return dataclasses.replace(self, **{**dict.fromkeys(self._defaulted), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (enums as strings), suitable for JSON or YAML; defaulted sizes as None."""
        return {
            f.name: None if f.name in self._defaulted else (v.value if isinstance(v, enum.Enum) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`; unknown keys are an error naming the valid ones."""
        _check_keys(values)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), optionally with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}.")
        return PRESETS[name].replace(**changes)


# The valid sizes, [low, high]. The upper bounds are far past any published model, so that a
# typo (zeros too many) is an error here, not a failed allocation or a trace of 100,000 layers:
# tokens (vocabulary, context) 2**24, 64 times Gemma's 256k vocabulary and past Llama 4's 10M
# context; widths 2**16, 3.5 times PaLM's d_model of 18,432; d_ff 2**18, 3.5 times PaLM's 73,728;
# layers 2**12, 4 times DeepNet's 1,000.
MAX_TOKENS, MAX_WIDTH, MAX_D_FF, MAX_LAYERS = 2**24, 2**16, 2**18, 2**12
SIZES = {
    "vocab_size": (1, MAX_TOKENS),
    "d_model": (1, MAX_WIDTH),
    "num_heads": (1, MAX_WIDTH),
    "head_dim": (1, MAX_WIDTH),
    "d_ff": (1, MAX_D_FF),
    "num_encoder_layers": (0, MAX_LAYERS),
    "num_decoder_layers": (0, MAX_LAYERS),
    "max_length": (1, MAX_TOKENS),
    "sliding_window": (1, MAX_TOKENS),
    "relative_num_buckets": (1, MAX_WIDTH),
    "relative_max_distance": (1, MAX_TOKENS),
    "type_vocab_size": (0, MAX_WIDTH),
    "position_offset": (0, MAX_TOKENS),
    "embedding_size": (1, MAX_WIDTH),
}

# The int, float and bool fields (and `int | None`), whose values are type-checked.
_SCALAR_FIELDS = {
    name: kind for name, kind in typing.get_type_hints(ModelConfig).items() if kind in (int, float, bool, int | None)
}


def coerce_scalar(label: str, kind, value):
    """`value` as an int, float, bool or `int | None` (`kind`), or a ValueError naming `label`.

    Shared by the configs: YAML 1.1 reads 1e-6 (no dot) as a string, and an int is a valid float.
    """
    if value is None and kind == int | None:
        return None
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is bool and isinstance(value, bool):
        return value
    if kind in (int, int | None) and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    expected = "int or None" if kind == int | None else kind.__name__
    raise ValueError(f"{label} must be of type {expected}, got {value!r}.")


def _scalar(name: str, kind, value):
    """A ModelConfig field's value in its type, and finite when a float."""
    value = coerce_scalar(f"ModelConfig.{name}", kind, value)
    if kind is float and not math.isfinite(value):
        raise ValueError(f"ModelConfig.{name} must be a finite number, got {value!r}.")
    return value


def _check_keys(values: dict[str, Any]) -> None:
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"Unknown ModelConfig field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(sorted(valid))}."
        )


# Reference architectures. Parameter counts are checked against the published
# implementations in tests/test_presets.py.
_BERT = dict(
    vocab_size=30_522,
    type_vocab_size=2,
    max_length=512,
    position=PositionEncoding.LEARNED,
    norm=Norm.LAYERNORM,
    norm_position=NormPosition.POST,
    norm_epsilon=1e-12,
    embedding_norm=True,
    activation=Activation.GELU,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
# RoBERTa: BERT's architecture with a byte-level BPE vocabulary, one token type and positions
# counted from its padding id + 1 (roberta-base's config.json).
_ROBERTA = {**_BERT, "vocab_size": 50_265, "type_vocab_size": 1, "norm_epsilon": 1e-5, "position_offset": 2}
# ALBERT v2: 128-wide embeddings, one layer's parameters shared by all, no dropout.
_ALBERT = {**_BERT, "vocab_size": 30_000, "activation": Activation.GELU_TANH, "embedding_size": 128,
           "share_layers": True, "dropout_rate": 0.0, "attention_dropout_rate": 0.0}
# DistilBERT: BERT's vocabulary, no token types; its classifier reads [CLS] through a ReLU layer.
_DISTILBERT = {**_BERT, "type_vocab_size": 0, "pooler": Pooler.RELU}
_GPT2 = dict(
    vocab_size=50_257,
    max_length=1024,
    position=PositionEncoding.LEARNED,
    norm=Norm.LAYERNORM,
    norm_position=NormPosition.PRE,
    norm_epsilon=1e-5,
    activation=Activation.GELU_TANH,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
_T5 = dict(
    vocab_size=32_128,
    max_length=512,
    position=PositionEncoding.RELATIVE,
    norm=Norm.RMSNORM,
    norm_position=NormPosition.PRE,
    norm_epsilon=1e-6,
    activation=Activation.RELU,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,  # T5 drops out attention weights and feed-forward activations too
    feed_forward_dropout_rate=0.1,
    use_bias=False,
    rescale_tied_logits=True,
    attention_logit_scaling=False,
    initialisation=Initialisation.FAN_IN,  # with unscaled attention logits, the query's fan-in init carries 1/sqrt(H)
)
_TRANSFORMER_2017 = dict(
    vocab_size=37_000,  # shared source/target BPE vocabulary (the paper: "about 37000 tokens")
    max_length=1024,
    position=PositionEncoding.SINUSOIDAL,
    norm=Norm.LAYERNORM,
    norm_position=NormPosition.POST,
    norm_epsilon=1e-6,
    activation=Activation.RELU,
    dropout_rate=0.1,
    scale_embeddings=True,
)

# Tiny versions of each architecture, for tests and CPU demos: 2 layers per stack, D = 64.
_TINY = dict(vocab_size=1024, d_model=64, num_heads=4, d_ff=256)


def _tiny(family: dict, *, max_length: int = 128, **layers: int) -> ModelConfig:
    return ModelConfig(**{**family, **_TINY, "max_length": max_length, **layers})


PRESETS: dict[str, ModelConfig] = {
    "bert-base": ModelConfig(**_BERT, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=12),
    "bert-large": ModelConfig(**_BERT, d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=24),
    "bert-tiny": _tiny(_BERT, num_encoder_layers=2),
    # SpanBERT changes the pretraining, not the model: BERT with BERT's cased vocabulary.
    "spanbert-base": ModelConfig(**{**_BERT, "vocab_size": 28_996}, d_model=768, num_heads=12, d_ff=3072,
                                 num_encoder_layers=12),
    "spanbert-large": ModelConfig(**{**_BERT, "vocab_size": 28_996}, d_model=1024, num_heads=16, d_ff=4096,
                                  num_encoder_layers=24),
    "roberta-base": ModelConfig(**_ROBERTA, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=12),
    "roberta-large": ModelConfig(**_ROBERTA, d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=24),
    "roberta-tiny": _tiny(_ROBERTA, num_encoder_layers=2),
    "albert-base": ModelConfig(**_ALBERT, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=12),
    "albert-large": ModelConfig(**_ALBERT, d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=24),
    "albert-tiny": _tiny({**_ALBERT, "embedding_size": 32}, num_encoder_layers=4),
    "distilbert-base": ModelConfig(**_DISTILBERT, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=6),
    "distilbert-tiny": _tiny(_DISTILBERT, num_encoder_layers=2),
    "gpt2-small": ModelConfig(**_GPT2, d_model=768, num_heads=12, d_ff=3072, num_decoder_layers=12),
    "gpt2-medium": ModelConfig(**_GPT2, d_model=1024, num_heads=16, d_ff=4096, num_decoder_layers=24),
    "gpt2-tiny": _tiny(_GPT2, max_length=256, num_decoder_layers=2),
    "t5-small": ModelConfig(**_T5, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6),
    "t5-base": ModelConfig(**_T5, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=12, num_decoder_layers=12),
    "t5-tiny": _tiny(_T5, num_encoder_layers=2, num_decoder_layers=2),
    "transformer-base": ModelConfig(
        **_TRANSFORMER_2017, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6
    ),
    "transformer-big": ModelConfig(
        **{**_TRANSFORMER_2017, "dropout_rate": 0.3},
        d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=6, num_decoder_layers=6,
    ),
    "transformer-tiny": _tiny(_TRANSFORMER_2017, num_encoder_layers=2, num_decoder_layers=2),
    # A modern decoder-only recipe: rotary positions, RMSNorm, SwiGLU, grouped-query attention.
    "llama-tiny": ModelConfig(
        vocab_size=1024,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        d_ff=192,
        num_decoder_layers=2,
        max_length=256,
        position=PositionEncoding.ROPE,
        norm=Norm.RMSNORM,
        norm_position=NormPosition.PRE,
        norm_epsilon=1e-6,
        activation=Activation.SWIGLU,
        dropout_rate=0.0,
        use_bias=False,
        tie_embeddings=False,
    ),
}
