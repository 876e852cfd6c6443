"""Hugging Face architectures as this library's models: config fields and one rule per tensor.

    Bert        BERT and its bodies (BertModel, MiniLM sentence encoders), heads: MLM, NSP,
                classifiers, question answering
    Roberta     BERT's body, positions counted from padding_idx + 1; its own MLM and classifier names
    DistilBert  BERT without token types or pooler; a ReLU layer before its classifier
    Albert      factorised embeddings (V -> E -> D), one layer shared by all, sentence-order head
    GPT2        GPT-2 (fused c_attn, Conv1D weights stored [in, out]); LM or classifier (`score`)
    T5          T5 v1.0 (ReLU, tied head) and v1.1 / Flan-T5 (gated tanh-GELU, untied head)
    Llama       Llama, and Mistral (Llama's with a sliding window): rotary positions, RMSNorm,
                SwiGLU, grouped-query attention; LM or classifier (`score`)

A `Rule` says which checkpoint tensor fills which parameter (unscanned layout, '/'-joined)
and how its layout differs. `transformer.pretrained` applies the rules in both directions.
Anything a config.json asks for that `ModelConfig` cannot express is an `UnsupportedCheckpoint`
error naming the field: the library never loads an approximation.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, ClassVar

import numpy as np

from transformer.config import Activation, Initialisation, ModelConfig, Norm, NormPosition, Pooler, PositionEncoding

# Heads a checkpoint can be loaded with (from_pretrained's `head`).
ENCODER, MLM, PRETRAINING, CLASSIFY, TOKEN_CLASSIFY, QA, LM = (
    "encoder", "mlm", "pretraining", "classify", "token_classify", "question_answering", "lm"
)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint option, tensor or architecture the library cannot reproduce exactly."""


class Layout(enum.StrEnum):
    """How a checkpoint tensor is laid out against its parameter."""

    COPY = "copy"  # the same shape
    VECTOR = "vector"  # flat [n], e.g. a bias [N * H] for a parameter [N, H]
    LINEAR = "linear"  # a torch Linear weight [out, in] for a kernel [in..., out...]
    CONV1D = "conv1d"  # GPT-2's Conv1D weight, already [in, out]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint tensor <-> one parameter; `inputs`: how many leading kernel axes are inputs."""

    tensor: str
    param: str
    layout: Layout = Layout.COPY
    inputs: int = 1

    def to_param(self, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        stored = self.to_tensor(np.empty(shape, np.int8)).shape  # what `shape` is saved as
        if value.shape != stored:
            raise ValueError(
                f"{self.tensor} has shape {value.shape}; the model's {self.param} {shape} needs {stored}."
            )
        return (value.T if self.layout == Layout.LINEAR else value).reshape(shape)

    def to_tensor(self, value: np.ndarray) -> np.ndarray:
        if self.layout == Layout.COPY:
            return value
        if self.layout == Layout.VECTOR:
            return value.reshape(-1)
        kernel = value.reshape(math.prod(value.shape[: self.inputs]), -1)  # [in, out]
        return kernel.T if self.layout == Layout.LINEAR else kernel


def linear(tensor: str, param: str, *, layout: Layout = Layout.LINEAR, inputs: int = 1, bias: bool = True) -> list[Rule]:
    """A projection's weight (and bias): `tensor`.weight -> `param`/kernel."""
    rules = [Rule(f"{tensor}.weight", f"{param}/kernel", layout, inputs)]
    return rules + [Rule(f"{tensor}.bias", f"{param}/bias", Layout.VECTOR)] if bias else rules


def norm(tensor: str, param: str, *, bias: bool = True) -> list[Rule]:
    """A LayerNorm (weight, bias) or RMSNorm (weight) -> `param`/scale (and bias)."""
    rules = [Rule(f"{tensor}.weight", f"{param}/scale")]
    return rules + [Rule(f"{tensor}.bias", f"{param}/bias")] if bias else rules


def attention(tensors: dict[str, str], param: str, *, layout: Layout = Layout.LINEAR, bias: bool = True) -> list[Rule]:
    """Query, key, value and output projections, given their tensor names by role."""
    rules = []
    for role in ("query", "key", "value", "out"):
        inputs = 2 if role == "out" else 1  # out: [N, H, D]
        rules += linear(tensors[role], f"{param}/{role}", layout=layout, inputs=inputs, bias=bias)
    return rules


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value is None and default is None:
        raise UnsupportedCheckpoint(f"config.json has no {key!r}, which this architecture needs.")
    return value


def _require(hf: dict[str, Any], key: str, expected: Any, default: Any, why: str) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise UnsupportedCheckpoint(f"config.json sets {key}={value!r}; the library supports only {expected!r} ({why}).")


_ACTIVATIONS = {"gelu": Activation.GELU, "gelu_new": Activation.GELU_TANH, "gelu_pytorch_tanh": Activation.GELU_TANH,
                "gelu_fast": Activation.GELU_TANH, "relu": Activation.RELU}


def _activation(name: str, key: str) -> Activation:
    if name not in _ACTIVATIONS:
        raise UnsupportedCheckpoint(
            f"config.json sets {key}={name!r}; supported activations: {', '.join(sorted(_ACTIVATIONS))}."
        )
    return _ACTIVATIONS[name]


def _hf_activation(activation: Activation) -> str:
    names = {Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_new", Activation.RELU: "relu"}
    return names[activation]


class Architecture:
    """A Hugging Face model family: config.json <-> ModelConfig, and the tensor rules of each head."""

    model_type: ClassVar[str]
    heads: ClassVar[dict[str, str]]  # head -> the transformers class that holds it
    ignored: ClassVar[tuple[str, ...]] = ()  # regexes of buffers that are not parameters
    defaults: ClassVar[dict[str, Any]] = {}  # what transformers' config class assumes where config.json is silent
    # Tensor names after the body's prefix, to check config.json's sizes against the files' index:
    embedding: ClassVar[str]  # the token embedding [V, D]
    layers: ClassVar[dict[str, str]]  # per stack (its layer count's field), a regex capturing a layer's index

    @classmethod
    def model_config(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """ModelConfig fields from config.json, or UnsupportedCheckpoint."""
        raise NotImplementedError

    @classmethod
    def hf_config(cls, config: ModelConfig) -> dict[str, Any]:
        """config.json fields for `config`, or UnsupportedCheckpoint when the family cannot hold it."""
        raise NotImplementedError

    @classmethod
    def rules(cls, config: ModelConfig, head: str, prefix: str) -> list[Rule]:
        """The rules of the body and of `head`; `prefix` is the body's tensor name prefix."""
        raise NotImplementedError

    @classmethod
    def aliases(cls, config: ModelConfig, prefix: str) -> dict[str, str]:
        """Tensors that, when a file holds them, must equal another one (tied weights)."""
        return {}

    @classmethod
    def prefix_in(cls, names: set[str]) -> str:
        """The body's tensor name prefix in a file holding the tensors `names`."""
        return ""

    @classmethod
    def prefix_for(cls, head: str) -> str:
        """The body's tensor name prefix that transformers' class for `head` writes."""
        return ""

    @classmethod
    def head_of(cls, hf: dict[str, Any], names: set[str]) -> str:
        """The head a checkpoint holds: config.json's `architectures`; without one, what the tensors show."""
        heads = {name: head for head, name in cls.heads.items()}
        architectures = hf.get("architectures") or []
        for architecture in architectures:
            if architecture in heads:
                return heads[architecture]
        if architectures:
            raise UnsupportedCheckpoint(
                f"config.json's architectures {architectures} are not supported; a {cls.model_type} checkpoint "
                f"loads as {', '.join(cls.heads.values())} (choose one with head=: {', '.join(cls.heads)})."
            )
        return cls._head_from_tensors(names)

    @classmethod
    def _head_from_tensors(cls, names: set[str]) -> str:
        return next(iter(cls.heads))

    @classmethod
    def split(cls, tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
        """Fused tensors split into the ones the rules name (GPT-2's c_attn)."""
        return tensors

    @classmethod
    def fuse(cls, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors as a checkpoint stores them: the inverse of `split`, and what transformers
        needs that the model lacks."""
        return tensors


# What BERT, GPT-2 and Llama share and T5 does not: logits scaled by 1/sqrt(head_dim), plain tied
# logits, unscaled token embeddings.
_STANDARD_ATTENTION = dict(attention_logit_scaling=True, rescale_tied_logits=False, scale_embeddings=False)
# What only RoBERTa (an offset) and ALBERT (factorised embeddings, shared layers) write.
_PLAIN = dict(position_offset=0, embedding_size=None, share_layers=False)


def _plain_heads(config: ModelConfig) -> dict[str, int]:
    """Every head of size d_model / num_heads, one key/value head each (BERT, GPT-2 config.json)."""
    return dict(num_kv_heads=config.num_heads, head_dim=config.d_model // config.num_heads)


def _decoder_head_rules(config: ModelConfig, head: str) -> list[Rule]:
    """A decoder-only model's head: the untied output projection, or the classifier's `score`."""
    if head == CLASSIFY:
        return [Rule("score.weight", "classifier/kernel", Layout.LINEAR)]
    return [] if config.tie_embeddings else [Rule("lm_head.weight", "lm_head/kernel", Layout.LINEAR)]


def post_norm_layer(ours: str, attention_tensors: dict[str, str], attention_norm: str, wi: str, wo: str,
                    feed_forward_norm: str) -> list[Rule]:
    """A post-LN encoder layer's rules (BERT's, DistilBERT's, ALBERT's), given its tensor names."""
    return [*attention(attention_tensors, f"{ours}/self_attention"),
            *norm(attention_norm, f"{ours}/self_attention_norm"), *linear(wi, f"{ours}/feed_forward/wi"),
            *linear(wo, f"{ours}/feed_forward/wo"), *norm(feed_forward_norm, f"{ours}/feed_forward_norm")]


def _layer_indices(config: ModelConfig, encoder: bool) -> range:
    return range(config.num_encoder_layers if encoder else config.num_decoder_layers)


class Bert(Architecture):
    """BERT, and the tensor names RoBERTa and ALBERT share with it."""

    model_type = "bert"
    heads = {MLM: "BertForMaskedLM", PRETRAINING: "BertForPreTraining", ENCODER: "BertModel",
             CLASSIFY: "BertForSequenceClassification", TOKEN_CLASSIFY: "BertForTokenClassification",
             QA: "BertForQuestionAnswering"}
    ignored = (r"(.*\.)?embeddings\.position_ids",)
    embedding = "embeddings.word_embeddings.weight"
    layers = {"num_encoder_layers": r"encoder\.layer\.(\d+)\."}
    body = "bert"  # the body's tensor name prefix in a checkpoint with a head
    pooler_tensor: ClassVar[str | None] = "pooler.dense"  # None: the family has no pooler
    pair_head: ClassVar[str] = "cls.seq_relationship"  # next-sentence (ALBERT: sentence-order) classifier
    # The masked-LM head: its transform's dense layer and norm, the output decoder and its bias.
    mlm_names: ClassVar[tuple[str, str, str, str]] = (
        "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder",
        "cls.predictions.bias",
    )

    @classmethod
    def model_config(cls, hf):
        _require(hf, "position_embedding_type", "absolute", "absolute", "learned absolute positions")
        _require(hf, "is_decoder", False, False, "an encoder")
        _require(hf, "add_cross_attention", False, False, "an encoder")
        return dict(
            vocab_size=_get(hf, "vocab_size"), d_model=_get(hf, "hidden_size"),
            num_heads=_get(hf, "num_attention_heads"), d_ff=_get(hf, "intermediate_size"),
            num_encoder_layers=_get(hf, "num_hidden_layers"), max_length=_get(hf, "max_position_embeddings"),
            type_vocab_size=hf.get("type_vocab_size", 2), position=PositionEncoding.LEARNED,
            norm=Norm.LAYERNORM, norm_position=NormPosition.POST, norm_epsilon=hf.get("layer_norm_eps", 1e-12),
            embedding_norm=True, activation=_activation(hf.get("hidden_act", "gelu"), "hidden_act"),
            dropout_rate=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
            use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        )

    @classmethod
    def hf_config(cls, config):
        _check_expressible(config, cls.__name__, cls._expected(config), activation=_hf_activation)
        return dict(
            model_type=cls.model_type, vocab_size=config.vocab_size, hidden_size=config.d_model,
            num_attention_heads=config.num_heads, intermediate_size=config.d_ff,
            num_hidden_layers=config.num_encoder_layers, max_position_embeddings=config.max_length,
            type_vocab_size=config.type_vocab_size or 1, layer_norm_eps=config.norm_epsilon,
            hidden_act=_hf_activation(config.activation), hidden_dropout_prob=config.dropout_rate,
            attention_probs_dropout_prob=config.attention_dropout_rate,
            tie_word_embeddings=config.tie_embeddings, position_embedding_type="absolute",
        )

    @classmethod
    def _expected(cls, config: ModelConfig) -> dict[str, Any]:
        """The ModelConfig fields the family's config.json cannot change."""
        return dict(position=PositionEncoding.LEARNED, norm=Norm.LAYERNORM, norm_position=NormPosition.POST,
                    embedding_norm=True, use_bias=True, num_decoder_layers=0, pooler=Pooler.TANH,
                    **_STANDARD_ATTENTION, **_plain_heads(config), **_PLAIN)

    @classmethod
    def prefix_in(cls, names):
        return f"{cls.body}." if any(name.startswith(f"{cls.body}.") for name in names) else ""

    @classmethod
    def fuse(cls, tensors):
        """transformers' BERT always adds a token-type embedding: a model without one gets a single
        zero row (type 0, what every token is given), which adds nothing."""
        prefix = cls.prefix_in(tensors)
        if f"{prefix}embeddings.token_type_embeddings.weight" in tensors:
            return tensors
        words = tensors[f"{prefix}embeddings.word_embeddings.weight"]  # [V, E]
        zero_type = np.zeros((1, words.shape[1]), words.dtype)
        return tensors | {f"{prefix}embeddings.token_type_embeddings.weight": zero_type}

    @classmethod
    def prefix_for(cls, head):
        return "" if head == ENCODER else f"{cls.body}."

    @classmethod
    def _head_from_tensors(cls, names):
        if f"{cls.pair_head}.weight" in names:
            return PRETRAINING
        return MLM if cls.mlm_names[3] in names else ENCODER

    @classmethod
    def rules(cls, config, head, prefix):
        p = prefix
        rules = [
            Rule(f"{p}embeddings.word_embeddings.weight", "embed/token/embedding"),
            Rule(f"{p}embeddings.position_embeddings.weight", "embed/position/embedding"),
            *norm(f"{p}embeddings.LayerNorm", "embed/norm"),
        ]
        if config.type_vocab_size:
            rules.append(Rule(f"{p}embeddings.token_type_embeddings.weight", "embed/token_type/embedding"))
        return rules + cls._layer_rules(config, p) + cls._head_rules(config, head, p)

    @classmethod
    def _layer_rules(cls, config, p):
        rules = []
        for i in _layer_indices(config, encoder=True):
            layer, ours = f"{p}encoder.layer.{i}", f"encoder/layers_{i}"
            names = dict(query=f"{layer}.attention.self.query", key=f"{layer}.attention.self.key",
                         value=f"{layer}.attention.self.value", out=f"{layer}.attention.output.dense")
            rules += post_norm_layer(ours, names, f"{layer}.attention.output.LayerNorm", f"{layer}.intermediate.dense",
                                     f"{layer}.output.dense", f"{layer}.output.LayerNorm")
        return rules

    @classmethod
    def _head_rules(cls, config, head, p):
        """The head's rules, and the pooler's where the head's class has one."""
        pooler = linear(f"{p}{cls.pooler_tensor}", "pooler") if cls.pooler_tensor else []
        if head == QA:
            return linear("qa_outputs", "qa_head")
        if head == TOKEN_CLASSIFY:
            return linear("classifier", "classifier")
        if head in (CLASSIFY, ENCODER):
            return pooler + (linear("classifier", "classifier") if head == CLASSIFY else [])
        dense, layer_norm, decoder, bias = cls.mlm_names
        rules = [*linear(dense, "mlm_transform"), *norm(layer_norm, "mlm_norm")]
        if config.tie_embeddings:
            rules.append(Rule(bias, "mlm_bias"))
        else:
            rules += [Rule(f"{decoder}.weight", "lm_head/kernel", Layout.LINEAR), Rule(bias, "lm_head/bias")]
        return rules + (pooler + linear(cls.pair_head, "nsp_head") if head == PRETRAINING else [])

    @classmethod
    def aliases(cls, config, prefix):
        """The decoder's bias is the head's bias; tied, its weight is the word embeddings."""
        _, _, decoder, bias = cls.mlm_names
        aliases = {f"{decoder}.bias": bias} if f"{decoder}.bias" != bias else {}
        if config.tie_embeddings:
            aliases[f"{decoder}.weight"] = f"{prefix}embeddings.word_embeddings.weight"
        return aliases


class Roberta(Bert):
    """RoBERTa: BERT's body with positions counted from padding_idx + 1, and heads of its own."""

    model_type = "roberta"
    heads = {MLM: "RobertaForMaskedLM", ENCODER: "RobertaModel", CLASSIFY: "RobertaForSequenceClassification",
             TOKEN_CLASSIFY: "RobertaForTokenClassification", QA: "RobertaForQuestionAnswering"}
    body = "roberta"
    mlm_names = ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")

    @classmethod
    def model_config(cls, hf):
        """Positions start at padding_idx + 1 (transformers' create_position_ids_from_input_ids),
        so the table holds that many rows more than the context."""
        pad = hf.get("pad_token_id", 1)  # RobertaConfig's default
        if not isinstance(pad, int) or pad < 0:
            raise UnsupportedCheckpoint(f"config.json sets pad_token_id={pad!r}; RoBERTa counts positions from it + 1, "
                                        "so it must be a token id (RobertaConfig's default: 1).")
        offset = pad + 1
        fields = super().model_config(hf)
        return fields | dict(position_offset=offset, max_length=fields["max_length"] - offset)

    @classmethod
    def hf_config(cls, config):
        if config.position_offset < 1:
            raise UnsupportedCheckpoint("A RoBERTa checkpoint counts positions from pad_token_id + 1 >= 1; "
                                        f"position_offset={config.position_offset} cannot be written as one.")
        fields = super().hf_config(config.replace(position_offset=0))
        return fields | dict(max_position_embeddings=config.max_length + config.position_offset,
                             pad_token_id=config.position_offset - 1)

    @classmethod
    def _head_rules(cls, config, head, p):
        """RobertaClassificationHead reads the first token through dense + tanh (BERT's pooler) and
        out_proj; the other heads are BERT's."""
        if head == CLASSIFY:
            return linear("classifier.dense", "pooler") + linear("classifier.out_proj", "classifier")
        return super()._head_rules(config, head, p)


class DistilBert(Bert):
    """DistilBERT: BERT without token types or pooler; its classifier reads [CLS] through a ReLU layer."""

    model_type = "distilbert"
    heads = {MLM: "DistilBertForMaskedLM", ENCODER: "DistilBertModel",
             CLASSIFY: "DistilBertForSequenceClassification", TOKEN_CLASSIFY: "DistilBertForTokenClassification",
             QA: "DistilBertForQuestionAnswering"}
    layers = {"num_encoder_layers": r"transformer\.layer\.(\d+)\."}
    body = "distilbert"
    pooler_tensor = None
    mlm_names = ("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias")
    _NORM_EPSILON = 1e-12  # fixed in transformers' DistilBERT

    @classmethod
    def model_config(cls, hf):
        """A sinusoidal table (sinusoidal_pos_embds) is stored in the weights like a learned one."""
        d_model = _get(hf, "dim")
        return dict(
            vocab_size=_get(hf, "vocab_size"), d_model=d_model, num_heads=_get(hf, "n_heads"),
            d_ff=hf.get("hidden_dim", 4 * d_model), num_encoder_layers=_get(hf, "n_layers"),
            max_length=_get(hf, "max_position_embeddings"), type_vocab_size=0, position=PositionEncoding.LEARNED,
            norm=Norm.LAYERNORM, norm_position=NormPosition.POST, norm_epsilon=cls._NORM_EPSILON,
            embedding_norm=True, activation=_activation(hf.get("activation", "gelu"), "activation"),
            dropout_rate=hf.get("dropout", 0.1), attention_dropout_rate=hf.get("attention_dropout", 0.1),
            use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), pooler=Pooler.RELU,
        )

    @classmethod
    def hf_config(cls, config):
        expected = cls._expected(config) | dict(type_vocab_size=0, pooler=Pooler.RELU, norm_epsilon=cls._NORM_EPSILON)
        _check_expressible(config, "DistilBERT", expected, activation=_hf_activation)
        return dict(
            model_type=cls.model_type, vocab_size=config.vocab_size, dim=config.d_model, n_heads=config.num_heads,
            hidden_dim=config.d_ff, n_layers=config.num_encoder_layers, max_position_embeddings=config.max_length,
            activation=_hf_activation(config.activation), dropout=config.dropout_rate,
            attention_dropout=config.attention_dropout_rate, sinusoidal_pos_embds=False,
            tie_word_embeddings=config.tie_embeddings,
        )

    @classmethod
    def fuse(cls, tensors):
        return tensors

    @classmethod
    def _layer_rules(cls, config, p):
        rules = []
        for i in _layer_indices(config, encoder=True):
            layer, ours = f"{p}transformer.layer.{i}", f"encoder/layers_{i}"
            names = {role: f"{layer}.attention.{name}_lin" for role, name in
                     (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))}
            rules += post_norm_layer(ours, names, f"{layer}.sa_layer_norm", f"{layer}.ffn.lin1", f"{layer}.ffn.lin2",
                                     f"{layer}.output_layer_norm")
        return rules

    @classmethod
    def _head_rules(cls, config, head, p):
        if head == CLASSIFY:
            return linear("pre_classifier", "pooler") + linear("classifier", "classifier")
        return super()._head_rules(config, head, p)


class Albert(Bert):
    """ALBERT: embeddings of width E projected to d_model, one layer's parameters shared by all
    layers, sentence-order prediction in BERT's next-sentence head."""

    model_type = "albert"
    heads = {PRETRAINING: "AlbertForPreTraining", MLM: "AlbertForMaskedLM", ENCODER: "AlbertModel",
             CLASSIFY: "AlbertForSequenceClassification", TOKEN_CLASSIFY: "AlbertForTokenClassification",
             QA: "AlbertForQuestionAnswering"}
    layers = {}  # one shared layer: the depth is config.json's alone
    body = "albert"
    pooler_tensor = "pooler"
    pair_head = "sop_classifier.classifier"
    mlm_names = ("predictions.dense", "predictions.LayerNorm", "predictions.decoder", "predictions.bias")
    _LAYER = "encoder.albert_layer_groups.0.albert_layers.0"

    @classmethod
    def model_config(cls, hf):
        _require(hf, "num_hidden_groups", 1, 1, "one group of layers, shared by all")
        _require(hf, "inner_group_num", 1, 1, "one layer in the group")
        fields = super().model_config(hf | {"hidden_act": hf.get("hidden_act", "gelu_new")})
        return fields | dict(embedding_size=_get(hf, "embedding_size"), share_layers=True,
                             dropout_rate=hf.get("hidden_dropout_prob", 0.0),
                             attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.0))

    @classmethod
    def hf_config(cls, config):
        if not (config.share_layers and config.embedding_size):
            raise UnsupportedCheckpoint("An ALBERT checkpoint has factorised embeddings (embedding_size) and "
                                        "shared layers (share_layers=True).")
        fields = super().hf_config(config.replace(share_layers=False, embedding_size=None))
        return fields | dict(embedding_size=config.embedding_size, num_hidden_groups=1, inner_group_num=1)

    @classmethod
    def _layer_rules(cls, config, p):
        layer, ours = f"{p}{cls._LAYER}", "encoder/shared_layer"
        names = {role: f"{layer}.attention.{role}" for role in ("query", "key", "value")}
        rules = post_norm_layer(ours, names | {"out": f"{layer}.attention.dense"}, f"{layer}.attention.LayerNorm",
                                f"{layer}.ffn", f"{layer}.ffn_output", f"{layer}.full_layer_layer_norm")
        return linear(f"{p}encoder.embedding_hidden_mapping_in", "embed/projection") + rules


class GPT2(Architecture):
    model_type = "gpt2"
    heads = {LM: "GPT2LMHeadModel", CLASSIFY: "GPT2ForSequenceClassification"}
    ignored = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)
    embedding = "wte.weight"
    layers = {"num_decoder_layers": r"h\.(\d+)\."}
    _ROLES = ("query", "key", "value")

    @classmethod
    def model_config(cls, hf):
        _require(hf, "scale_attn_weights", True, True, "logits divided by sqrt(head_dim)")
        _require(hf, "scale_attn_by_inverse_layer_idx", False, False, "the same logit scale in every layer")
        _require(hf, "add_cross_attention", False, False, "a decoder-only model")
        d_model = _get(hf, "n_embd")
        return dict(
            vocab_size=_get(hf, "vocab_size"), d_model=d_model, num_heads=_get(hf, "n_head"),
            d_ff=hf.get("n_inner") or 4 * d_model, num_decoder_layers=_get(hf, "n_layer"),
            max_length=_get(hf, "n_positions"), position=PositionEncoding.LEARNED, norm=Norm.LAYERNORM,
            norm_position=NormPosition.PRE, norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=_activation(hf.get("activation_function", "gelu_new"), "activation_function"),
            dropout_rate=hf.get("resid_pdrop", 0.1), attention_dropout_rate=hf.get("attn_pdrop", 0.1),
            use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        )

    @classmethod
    def hf_config(cls, config):
        expected = dict(position=PositionEncoding.LEARNED, norm=Norm.LAYERNORM, norm_position=NormPosition.PRE,
                        use_bias=True, num_encoder_layers=0, embedding_norm=False, type_vocab_size=0,
                        **_STANDARD_ATTENTION, **_plain_heads(config), **_PLAIN)
        _check_expressible(config, "GPT-2", expected, activation=_hf_activation)
        return dict(
            model_type="gpt2", vocab_size=config.vocab_size, n_embd=config.d_model, n_head=config.num_heads,
            n_inner=config.d_ff, n_layer=config.num_decoder_layers, n_positions=config.max_length,
            layer_norm_epsilon=config.norm_epsilon, activation_function=_hf_activation(config.activation),
            resid_pdrop=config.dropout_rate, embd_pdrop=config.dropout_rate, attn_pdrop=config.attention_dropout_rate,
            tie_word_embeddings=config.tie_embeddings,
        )

    @classmethod
    def prefix_in(cls, names):
        return "transformer." if any(name.startswith("transformer.") for name in names) else ""

    @classmethod
    def prefix_for(cls, head):
        return "transformer."

    @classmethod
    def rules(cls, config, head, prefix):
        p = prefix
        rules = [Rule(f"{p}wte.weight", "embed/token/embedding"), Rule(f"{p}wpe.weight", "embed/position/embedding"),
                 *norm(f"{p}ln_f", "decoder/final_norm")]
        for i in _layer_indices(config, encoder=False):
            layer, ours = f"{p}h.{i}", f"decoder/layers_{i}"
            names = {role: f"{layer}.attn.c_attn:{role}" for role in cls._ROLES} | {"out": f"{layer}.attn.c_proj"}
            rules += attention(names, f"{ours}/self_attention", layout=Layout.CONV1D)
            rules += norm(f"{layer}.ln_1", f"{ours}/self_attention_norm")
            rules += norm(f"{layer}.ln_2", f"{ours}/feed_forward_norm")
            rules += linear(f"{layer}.mlp.c_fc", f"{ours}/feed_forward/wi", layout=Layout.CONV1D)
            rules += linear(f"{layer}.mlp.c_proj", f"{ours}/feed_forward/wo", layout=Layout.CONV1D)
        return rules + _decoder_head_rules(config, head)

    @classmethod
    def aliases(cls, config, prefix):
        return {"lm_head.weight": f"{prefix}wte.weight"} if config.tie_embeddings else {}

    @classmethod
    def split(cls, tensors, config):
        out = {}
        for name, value in tensors.items():
            match = re.fullmatch(r"(.*\.attn\.c_attn)\.(weight|bias)", name)
            if not match:
                out[name] = value
                continue
            for role, part in zip(cls._ROLES, np.split(value, 3, axis=-1)):  # [D, 3D] -> 3 x [D, D]
                out[f"{match[1]}:{role}.{match[2]}"] = part
        return out

    @classmethod
    def fuse(cls, tensors):
        out = {}
        for name, value in tensors.items():
            match = re.fullmatch(r"(.*\.attn\.c_attn):query\.(weight|bias)", name)
            if match:
                parts = [tensors[f"{match[1]}:{role}.{match[2]}"] for role in cls._ROLES]
                out[f"{match[1]}.{match[2]}"] = np.concatenate(parts, axis=-1)
            elif ":" not in name:
                out[name] = value
        return out


class T5(Architecture):
    model_type = "t5"
    heads = {LM: "T5ForConditionalGeneration"}
    # transformers ignores it too: cross-attention has no position bias
    ignored = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
    embedding = "shared.weight"
    layers = {"num_encoder_layers": r"encoder\.block\.(\d+)\.", "num_decoder_layers": r"decoder\.block\.(\d+)\."}
    _FEED_FORWARD = {"relu": Activation.RELU, "gelu": Activation.GELU, "gated-gelu": Activation.GEGLU_TANH,
                     "gated-silu": Activation.SWIGLU}

    @classmethod
    def model_config(cls, hf):
        projection = hf.get("feed_forward_proj", "relu")
        if projection not in cls._FEED_FORWARD:
            raise UnsupportedCheckpoint(
                f"config.json sets feed_forward_proj={projection!r}; supported: {', '.join(cls._FEED_FORWARD)}."
            )
        gated, act = projection.startswith("gated-"), "gelu_new" if projection == "gated-gelu" else projection.split("-")[-1]
        _require(hf, "is_gated_act", gated, gated, f"what feed_forward_proj={projection!r} implies")
        _require(hf, "dense_act_fn", act, act, f"what feed_forward_proj={projection!r} implies")
        tied = hf.get("tie_word_embeddings", True)
        layers = _get(hf, "num_layers")
        return dict(
            vocab_size=_get(hf, "vocab_size"), d_model=_get(hf, "d_model"), num_heads=_get(hf, "num_heads"),
            head_dim=_get(hf, "d_kv"), d_ff=_get(hf, "d_ff"), num_encoder_layers=layers,
            num_decoder_layers=hf.get("num_decoder_layers") or layers, max_length=hf.get("n_positions", 512),
            position=PositionEncoding.RELATIVE, relative_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128), norm=Norm.RMSNORM,
            norm_position=NormPosition.PRE, norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            activation=cls._FEED_FORWARD[projection], dropout_rate=hf.get("dropout_rate", 0.1),
            attention_dropout_rate=hf.get("dropout_rate", 0.1), feed_forward_dropout_rate=hf.get("dropout_rate", 0.1),
            use_bias=False, tie_embeddings=tied, rescale_tied_logits=tied, attention_logit_scaling=False,
            initialisation=Initialisation.FAN_IN,  # what a head the checkpoint lacks starts from
        )

    @classmethod
    def hf_config(cls, config):
        projections = {activation: name for name, activation in cls._FEED_FORWARD.items()}
        expected = dict(position=PositionEncoding.RELATIVE, norm=Norm.RMSNORM, norm_position=NormPosition.PRE,
                        use_bias=False, attention_logit_scaling=False, rescale_tied_logits=config.tie_embeddings,
                        embedding_norm=False, scale_embeddings=False, type_vocab_size=0, num_kv_heads=config.num_heads,
                        **_PLAIN)
        _check_expressible(config, "T5", expected, activation=projections.__getitem__)
        return dict(
            model_type="t5", vocab_size=config.vocab_size, d_model=config.d_model, num_heads=config.num_heads,
            d_kv=config.head_dim, d_ff=config.d_ff, num_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers, n_positions=config.max_length,
            relative_attention_num_buckets=config.relative_num_buckets,
            relative_attention_max_distance=config.relative_max_distance, layer_norm_epsilon=config.norm_epsilon,
            feed_forward_proj=projections[config.activation], dropout_rate=config.dropout_rate,
            tie_word_embeddings=config.tie_embeddings, is_encoder_decoder=True,
        )

    @classmethod
    def rules(cls, config, head, prefix):
        rules = [Rule("shared.weight", "embed/token/embedding")]
        for stack in ("encoder", "decoder"):
            rules += norm(f"{stack}.final_layer_norm", f"{stack}/final_norm", bias=False)
            rules.append(Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                              f"{stack}/relative_position_bias/embedding"))
            for i in _layer_indices(config, encoder=stack == "encoder"):
                rules += cls._layer_rules(config, f"{stack}.block.{i}", f"{stack}/layers_{i}", stack == "decoder")
        if not config.tie_embeddings:
            rules.append(Rule("lm_head.weight", "lm_head/kernel", Layout.LINEAR))
        return rules

    @classmethod
    def _layer_rules(cls, config, block, ours, cross):
        sublayers = [("SelfAttention", "self_attention")] + [("EncDecAttention", "cross_attention")] * cross
        rules = []
        for index, (theirs, name) in enumerate(sublayers):
            layer = f"{block}.layer.{index}"
            names = dict(query=f"{layer}.{theirs}.q", key=f"{layer}.{theirs}.k", value=f"{layer}.{theirs}.v",
                         out=f"{layer}.{theirs}.o")
            rules += attention(names, f"{ours}/{name}", bias=False)
            rules += norm(f"{layer}.layer_norm", f"{ours}/{name}_norm", bias=False)
        layer = f"{block}.layer.{len(sublayers)}"
        inner = ("wi_0", "wi_1") if config.activation.gated else ("wi",)
        for name in (*inner, "wo"):
            rules += linear(f"{layer}.DenseReluDense.{name}", f"{ours}/feed_forward/{name}", bias=False)
        return rules + norm(f"{layer}.layer_norm", f"{ours}/feed_forward_norm", bias=False)

    @classmethod
    def aliases(cls, config, prefix):
        aliases = {f"{stack}.embed_tokens.weight": "shared.weight" for stack in ("encoder", "decoder")}
        return aliases | ({"lm_head.weight": "shared.weight"} if config.tie_embeddings else {})


class Llama(Architecture):
    model_type = "llama"
    heads = {LM: "LlamaForCausalLM", CLASSIFY: "LlamaForSequenceClassification"}
    ignored = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    embedding = "model.embed_tokens.weight"
    layers = {"num_decoder_layers": r"model\.layers\.(\d+)\."}

    @classmethod
    def model_config(cls, hf):
        scaling = hf.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) != "default":
            raise UnsupportedCheckpoint(
                f"config.json sets rope_scaling={scaling!r}; the library has plain rotary positions only."
            )
        _require(hf, "hidden_act", "silu", "silu", "SwiGLU feed-forward")
        _require(hf, "attention_bias", False, False, "no biases in the attention projections")
        _require(hf, "mlp_bias", False, False, "no biases in the feed-forward")
        heads = _get(hf, "num_attention_heads")
        max_length, window = _get(hf, "max_position_embeddings"), hf.get("sliding_window")
        return dict(
            vocab_size=_get(hf, "vocab_size"), d_model=_get(hf, "hidden_size"), num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
            d_ff=_get(hf, "intermediate_size"), num_decoder_layers=_get(hf, "num_hidden_layers"),
            max_length=min(max_length, window) if window else max_length,  # Mistral: exact within its window
            sliding_window=window or None, position=PositionEncoding.ROPE, rope_theta=hf.get("rope_theta", 10_000.0),
            norm=Norm.RMSNORM, norm_position=NormPosition.PRE, norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            activation=Activation.SWIGLU, dropout_rate=0.0, attention_dropout_rate=hf.get("attention_dropout", 0.0),
            use_bias=False, tie_embeddings=hf.get("tie_word_embeddings", False),
        )

    @classmethod
    def hf_config(cls, config):
        expected = dict(position=PositionEncoding.ROPE, norm=Norm.RMSNORM, norm_position=NormPosition.PRE,
                        activation=Activation.SWIGLU, use_bias=False, num_encoder_layers=0, embedding_norm=False,
                        type_vocab_size=0, sliding_window=None, **_STANDARD_ATTENTION, **_PLAIN)
        _check_expressible(config, "Llama", expected)
        return dict(
            model_type="llama", vocab_size=config.vocab_size, hidden_size=config.d_model,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
            intermediate_size=config.d_ff, num_hidden_layers=config.num_decoder_layers,
            max_position_embeddings=config.max_length, rope_theta=config.rope_theta, rms_norm_eps=config.norm_epsilon,
            hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=config.tie_embeddings,
            attention_dropout=config.attention_dropout_rate,
        )

    @classmethod
    def rules(cls, config, head, prefix):
        rules = [Rule("model.embed_tokens.weight", "embed/token/embedding"),
                 *norm("model.norm", "decoder/final_norm", bias=False)]
        for i in _layer_indices(config, encoder=False):
            layer, ours = f"model.layers.{i}", f"decoder/layers_{i}"
            names = dict(query=f"{layer}.self_attn.q_proj", key=f"{layer}.self_attn.k_proj",
                         value=f"{layer}.self_attn.v_proj", out=f"{layer}.self_attn.o_proj")
            rules += attention(names, f"{ours}/self_attention", bias=False)
            rules += norm(f"{layer}.input_layernorm", f"{ours}/self_attention_norm", bias=False)
            rules += norm(f"{layer}.post_attention_layernorm", f"{ours}/feed_forward_norm", bias=False)
            for theirs, name in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
                rules += linear(f"{layer}.mlp.{theirs}", f"{ours}/feed_forward/{name}", bias=False)
        return rules + _decoder_head_rules(config, head)

    @classmethod
    def aliases(cls, config, prefix):
        return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_embeddings else {}


class Mistral(Llama):
    model_type = "mistral"
    heads = {LM: "MistralForCausalLM", CLASSIFY: "MistralForSequenceClassification"}
    defaults = {"sliding_window": 4096}  # MistralConfig's; only an explicit null means no window

    @classmethod
    def hf_config(cls, config):
        """Llama's fields and the window (a model without one is written as Llama)."""
        if config.sliding_window is None:
            raise UnsupportedCheckpoint("A Mistral checkpoint has a sliding_window; without one, Llama's is written.")
        llama = super().hf_config(config.replace(sliding_window=None))
        return llama | dict(model_type="mistral", sliding_window=config.sliding_window)


WRITTEN = (Bert, Roberta, DistilBert, Albert, GPT2, T5, Llama, Mistral)
ARCHITECTURES: dict[str, type[Architecture]] = {a.model_type: a for a in WRITTEN}
# Families close to one above, and what keeps them out.
NOT_SUPPORTED = {
    "qwen2": "Qwen2 puts biases on the query, key and value projections only, which ModelConfig.use_bias "
             "(all projections or none) cannot express",
}


def _check_expressible(config: ModelConfig, family: str, expected: dict[str, Any], activation=None) -> None:
    """UnsupportedCheckpoint unless `config` has the `expected` field values (and an activation
    `activation` can name): what `family`'s config.json cannot say."""
    plain = lambda value: getattr(value, "value", value)  # noqa: E731 (enums as their strings)
    differing = [f"{name}={plain(getattr(config, name))!r} (needs {plain(value)!r})"
                 for name, value in expected.items() if getattr(config, name) != value]
    if activation is not None:
        try:
            activation(config.activation)
        except KeyError:
            differing.append(f"activation={config.activation.value!r}")
    if differing:
        raise UnsupportedCheckpoint(f"A {family} checkpoint cannot express {', '.join(differing)}.")
