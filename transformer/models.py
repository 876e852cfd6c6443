"""Task models: thin heads over the shared embedder and stacks.

    CausalLM            decoder-only language model (GPT-2)
    EncoderModel        the encoder body alone: hidden states (BERT's BertModel, sentence encoders)
    MaskedLM            encoder + masked-LM head (+ next-sentence or span boundary head) (BERT,
                        SpanBERT pretraining)
    SequenceClassifier  encoder + pooled [CLS] classifier
    TokenClassifier     encoder + per-token classifier
    QuestionAnswering   encoder + start and end logits of an answer span (extractive QA;
                        `best_spans` reads the answers)
    DecoderClassifier   decoder-only + classifier on the last real token (GPT's classification)
    Seq2SeqLM           encoder-decoder (2017 Transformer, T5), with `encode` and `decode`

Encoder models share the parameter names "embed", "encoder" and "pooler", so a pretrained
body is moved under a new head with `merge_pretrained`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from transformer import sharding as ax
from transformer.cache import DecoderCache
from transformer.config import ModelConfig, PositionEncoding, Pooler
from transformer.layers import Dense, Embedder, activation_fn, initial_stddev, norm
from transformer.positions import segment_positions
from transformer.stacks import Stack


def _inputs(config: ModelConfig, tokens, segment_ids, positions, cache: DecoderCache | None = None):
    """Checks [B, T] tokens and fills in default segment ids (all 1) and positions.

    Default positions count from 0 within each segment (packed documents restart, left
    padding does not shift the text); with a cache they continue after its real tokens.
    """
    if tokens.ndim != 2:
        raise ValueError(f"Expected token ids of shape [batch, length], got shape {tokens.shape}.")
    batch, length = tokens.shape
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None and value.shape != tokens.shape:
            raise ValueError(f"{name} has shape {value.shape}; it must match the tokens' shape {tokens.shape}.")
    _check_ids("tokens", tokens, config.vocab_size, "ModelConfig.vocab_size")
    if positions is not None and config.position == PositionEncoding.LEARNED:
        _check_ids("positions", positions, config.max_length, "the learned position table, ModelConfig.max_length")
    if cache is None and length > config.max_length:
        raise ValueError(
            f"Sequence length {length} exceeds the model's context of {config.max_length} tokens "
            "(ModelConfig.max_length); truncate the input or use a config with a longer max_length."
        )
    if cache is not None:
        end = _concrete(cache.end)
        if cache.segment_ids.shape[0] != batch:
            raise ValueError(f"The cache holds {cache.segment_ids.shape[0]} rows but the tokens have {batch}.")
        if (0 if end is None else end) + length > cache.max_length:
            raise ValueError(
                f"{length} new tokens do not fit the cache: {end or 0} of its {cache.max_length} slots are "
                "used. Allocate a larger cache with init_cache(..., max_length=...)."
            )
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
        if cache is None:
            positions = segment_positions(segment_ids)
        else:
            is_token = (segment_ids != 0).astype(jnp.int32)
            positions = cache.lengths[:, None] + jnp.cumsum(is_token, axis=1) - is_token
    return segment_ids, positions


def _check_ids(name: str, ids, limit: int, table: str) -> None:
    """Called eagerly, ids must index their table: past it the lookup gives NaN, which attention
    spreads to every row (inside jit nothing can check)."""
    lowest, highest = _concrete(jnp.min(ids)), _concrete(jnp.max(ids))
    if highest is not None and (lowest < 0 or highest >= limit):
        raise ValueError(f"{name} run from {lowest} to {highest}, outside [0, {limit}) of {table}.")


def _concrete(value: jax.Array) -> int | None:
    """The value of a scalar when known outside of tracing (eager calls), else None."""
    try:
        return int(value)
    except jax.errors.ConcretizationTypeError:
        return None


def _require(config: ModelConfig, *, encoder: bool = False, decoder: bool = False, model: str):
    if encoder and config.num_encoder_layers == 0:
        raise ValueError(f"{model} needs an encoder: set num_encoder_layers > 0.")
    if decoder and config.num_decoder_layers == 0:
        raise ValueError(f"{model} needs a decoder: set num_decoder_layers > 0.")


def _lm_head(config: ModelConfig, *, use_bias: bool = False) -> nn.Module | None:
    """The untied output projection [D] -> [V] (float32 logits), or None when tied."""
    if config.tie_embeddings:
        return None
    return Dense(config, config.vocab_size, (ax.EMBED, ax.VOCAB), use_bias=use_bias, float32_output=True, name="lm_head")


def _classifier(config: ModelConfig, num_labels: int, name: str) -> nn.Module:
    return Dense(config, num_labels, (ax.EMBED, ax.LABELS), use_bias=True, float32_output=True, name=name)


def _output_logits(module: nn.Module, config: ModelConfig, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32, tied to the embeddings or through `lm_head`."""
    if config.tie_embeddings:
        return module.embed.attend(x)
    return module.lm_head(x)


class CausalLM(nn.Module):
    """Decoder-only language model: logits for the next token at every position."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        _require(cfg, decoder=True, model="CausalLM")
        self.embed = Embedder(cfg)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True, name="decoder")
        self.lm_head = _lm_head(cfg)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
        logits_at: jax.Array | None = None,
    ):
        """tokens [B, T] -> logits [B, T, V] float32; with a cache, (logits, updated cache).

        segment_ids [B, T]: 0 = padding, and packed documents get distinct ids so that they
        never attend to each other. positions [B, T] default to 0..T-1 (after the cached
        tokens when decoding). With a cache, the tokens extend each row of the cache; padding
        (segment 0) at the end of a row is not counted in its length. logits_at [B]: only the
        logits at that index of each row, [B, 1, V] (a prompt's last token, for generation).
        """
        segment_ids, positions = _inputs(self.config, tokens, segment_ids, positions, cache)
        x = self.embed(tokens, positions, deterministic=deterministic)
        x, cache = self.decoder(x, segment_ids, positions, cache=cache, deterministic=deterministic)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        logits = _output_logits(self, self.config, x)
        return logits if cache is None else (logits, cache)


class _EncoderModel(nn.Module):
    """Embedder + encoder stack (+ pooler): the pretrained body of the encoder-only models."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        _require(cfg, encoder=True, model=type(self).__name__)
        self.embed = Embedder(cfg)
        self.encoder = Stack(cfg, cfg.num_encoder_layers, causal=False, name="encoder")
        self.pooler = Dense(cfg, cfg.d_model, (ax.EMBED, ax.MLP), use_bias=True, name="pooler")  # distinct axis names: D x D
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def encode(self, tokens, *, token_types=None, segment_ids=None, positions=None, deterministic=True):
        """tokens [B, T] -> hidden states [B, T, D]."""
        segment_ids, positions = _inputs(self.config, tokens, segment_ids, positions)
        if token_types is not None and self.config.type_vocab_size:
            _check_ids("token_types", token_types, self.config.type_vocab_size, "ModelConfig.type_vocab_size")
        x = self.embed(tokens, positions, token_types, deterministic=deterministic)
        x, _ = self.encoder(x, segment_ids, positions, deterministic=deterministic)
        return x

    def pool(self, hidden: jax.Array) -> jax.Array:
        """The pooled representation act(W h_[CLS] + b) of the first token: BERT's tanh,
        DistilBERT's ReLU (`ModelConfig.pooler`). -> [B, D]."""
        activation = jnp.tanh if self.config.pooler == Pooler.TANH else nn.relu
        return activation(self.pooler(hidden[:, 0]))


class EncoderModel(_EncoderModel):
    """The encoder body without a head: hidden states [B, T, D] float (see `sentence_embedding`).

    The pooler is part of the body (BERT checkpoints carry it); `pool` applies it.
    """

    def __call__(self, tokens, *, token_types=None, segment_ids=None, positions=None, deterministic=True):
        hidden = self.encode(
            tokens, token_types=token_types, segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        if self.is_initializing():  # create the pooler's parameters with the body's
            self.pool(hidden)
        return hidden


def sentence_embedding(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the hidden states over real tokens, L2-normalised (sentence-transformers' MiniLM).

    hidden [B, T, D], mask [B, T] (True or 1 = token) -> [B, D] float32 of unit length.
    """
    weights = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    mean = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


SPAN_OFFSETS = 32  # rows of the span boundary objective's offset table; a longer span's tail shares the last


class MaskedLM(_EncoderModel):
    """Encoder with BERT's masked-LM head, and a next-sentence head or SpanBERT's span boundary
    head when asked for.

    Returns MLM logits [B, T, V] float32; with `next_sentence_prediction=True` (MLM logits, NSP
    logits [B, 2]); with `span_boundary_objective=True` (MLM logits, SBO logits [B, T, V]).
    """

    next_sentence_prediction: bool = False
    span_boundary_objective: bool = False

    def setup(self):
        super().setup()
        cfg = self.config
        width = cfg.embedding_size or cfg.d_model  # back to the embeddings' width (ALBERT's E)
        self.mlm_transform = Dense(cfg, width, (ax.EMBED, ax.MLP), use_bias=True, name="mlm_transform")
        self.mlm_norm = norm(cfg, name="mlm_norm")
        if cfg.tie_embeddings:
            self.mlm_bias = self.param(
                "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, (ax.VOCAB,)),
                (cfg.vocab_size,), cfg.param_dtype,
            )
        self.lm_head = _lm_head(cfg, use_bias=True)
        if self.next_sentence_prediction:
            self.nsp_head = _classifier(cfg, 2, name="nsp_head")
        if self.span_boundary_objective:
            if self.next_sentence_prediction:
                raise ValueError("A MaskedLM has a next-sentence head or a span boundary head, not both (SpanBERT "
                                 "drops next-sentence prediction).")
            self.sbo_offset = nn.Embed(
                SPAN_OFFSETS, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="sbo_offset",
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(initial_stddev(cfg, 1)), (ax.POSITIONS, ax.EMBED)
                ),
            )
            self.sbo_hidden = Dense(cfg, cfg.d_model, (ax.MLP, ax.EMBED), use_bias=True, name="sbo_hidden")
            self.sbo_hidden_norm = norm(cfg, name="sbo_hidden_norm")
            self.sbo_output = Dense(cfg, width, (ax.EMBED, ax.MLP), use_bias=True, name="sbo_output")
            self.sbo_output_norm = norm(cfg, name="sbo_output_norm")

    def __call__(self, tokens, *, token_types=None, segment_ids=None, positions=None, span_boundaries=None,
                 deterministic=True):
        """`span_boundaries` [B, T, 3] (the SBO head's input, see `span_boundary_logits`)."""
        hidden = self.encode(
            tokens, token_types=token_types, segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        logits = self.mlm_logits(hidden)
        if self.next_sentence_prediction:
            return logits, self.nsp_head(self.pool(hidden))
        if self.span_boundary_objective:
            return logits, self.span_boundary_logits(hidden, span_boundaries)
        return logits

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """The masked-LM head: hidden states [B, T, D] -> logits [B, T, V] float32 (what
        `__call__` returns first; distillation reads the states and the logits apart)."""
        act = activation_fn(self.config.activation)
        return self._vocabulary_logits(self.mlm_norm(act(self.mlm_transform(hidden))))

    def _vocabulary_logits(self, h):
        logits = _output_logits(self, self.config, h)
        return logits + self.mlm_bias if self.config.tie_embeddings else logits

    def span_boundary_logits(self, hidden, span_boundaries=None):
        """SpanBERT's span boundary objective: each token predicted from the encoder states just
        before and just after its span and its offset in the span, through two layers, by the
        masked-LM output layer. hidden [B, T, D]; span_boundaries [B, T, 3] int (position before,
        position after, offset; None: all 0, as at init) -> logits [B, T, V] float32."""
        cfg = self.config
        if span_boundaries is None:
            span_boundaries = jnp.zeros(hidden.shape[:2] + (3,), jnp.int32)
        before = jnp.take_along_axis(hidden, span_boundaries[..., 0:1], axis=1)  # [B, T, D]
        after = jnp.take_along_axis(hidden, span_boundaries[..., 1:2], axis=1)
        offset = self.sbo_offset(jnp.minimum(span_boundaries[..., 2], SPAN_OFFSETS - 1))
        act = activation_fn(cfg.activation)
        h = self.sbo_hidden_norm(act(self.sbo_hidden(jnp.concatenate([before, after, offset.astype(hidden.dtype)], -1))))
        return self._vocabulary_logits(self.sbo_output_norm(act(self.sbo_output(h))))


class _Classifier(_EncoderModel):
    num_labels: int = 2

    def setup(self):
        super().setup()
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}.")
        self.classifier = _classifier(self.config, self.num_labels, name="classifier")


class SequenceClassifier(_Classifier):
    """Encoder + pooled [CLS] + linear classifier: logits [B, num_labels] float32."""

    def __call__(self, tokens, *, token_types=None, segment_ids=None, positions=None, deterministic=True):
        hidden = self.encode(
            tokens, token_types=token_types, segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        return self.classifier(self.dropout(self.pool(hidden), deterministic=deterministic))


class TokenClassifier(_Classifier):
    """Encoder + linear classifier on every token: logits [B, T, num_labels] float32."""

    def __call__(self, tokens, *, token_types=None, segment_ids=None, positions=None, deterministic=True):
        hidden = self.encode(
            tokens, token_types=token_types, segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        return self.classifier(self.dropout(hidden, deterministic=deterministic))


class QuestionAnswering(_EncoderModel):
    """Encoder + a linear layer giving each token a start and an end logit (BERT on SQuAD).

    Returns (start logits, end logits), each [B, T] float32; `best_spans` reads answers from them.
    """

    def setup(self):
        super().setup()
        self.qa_head = _classifier(self.config, 2, name="qa_head")

    def __call__(self, tokens, *, token_types=None, segment_ids=None, positions=None, deterministic=True):
        hidden = self.encode(
            tokens, token_types=token_types, segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        logits = self.qa_head(hidden)  # [B, T, 2]
        return logits[..., 0], logits[..., 1]


def best_spans(start_logits: jax.Array, end_logits: jax.Array, context: jax.Array, *, max_length: int = 30,
               starts: jax.Array | None = None):
    """Each row's best answer span: start <= end < start + max_length, both tokens in the context
    (the start also among `starts`, where given), scored start logit + end logit (BERT on SQuAD).

    start_logits, end_logits [B, T] float, context [B, T] bool (the tokens an answer may be),
    starts [B, T] bool (default: context; a window of a long text: the tokens it has the most
    context around, as BERT's `write_predictions` asks of a start only) -> start [B], end [B]
    int32 and score [B] float32 (-inf for a row with no valid span).
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: an answer span holds at least one token.")
    starts = context if starts is None else starts & context
    batch, length = start_logits.shape
    index = jnp.arange(length)
    span = index[None, :] - index[:, None]  # [T start, T end]: end - start
    valid = (span >= 0) & (span < max_length) & starts[:, :, None] & context[:, None, :]  # [B, T, T]
    scores = start_logits[:, :, None].astype(jnp.float32) + end_logits[:, None, :].astype(jnp.float32)
    scores = jnp.where(valid, scores, -jnp.inf).reshape(batch, -1)
    best = jnp.argmax(scores, axis=1)
    return (best // length).astype(jnp.int32), (best % length).astype(jnp.int32), jnp.max(scores, axis=1)


class DecoderClassifier(nn.Module):
    """Decoder-only body + a linear classifier (no bias) on the state of each row's last real
    token, the only one that has read the whole text: GPT's classification head, Hugging Face's
    GPT2ForSequenceClassification and LlamaForSequenceClassification. Logits [B, num_labels] float32.
    """

    config: ModelConfig
    num_labels: int = 2

    def setup(self):
        cfg = self.config
        _require(cfg, decoder=True, model="DecoderClassifier")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}.")
        self.embed = Embedder(cfg)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True, name="decoder")
        self.classifier = Dense(cfg, self.num_labels, (ax.EMBED, ax.LABELS), use_bias=False, float32_output=True,
                                name="classifier")

    def __call__(self, tokens, *, segment_ids=None, positions=None, deterministic=True):
        """tokens [B, T], segment_ids [B, T] (0 = padding, left or right) -> logits [B, num_labels]."""
        segment_ids, positions = _inputs(self.config, tokens, segment_ids, positions)
        x = self.embed(tokens, positions, deterministic=deterministic)
        x, _ = self.decoder(x, segment_ids, positions, deterministic=deterministic)
        index = jnp.arange(tokens.shape[1])
        last = jnp.argmax(jnp.where(segment_ids != 0, index, -1), axis=1)  # [B] the rightmost real token
        return self.classifier(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])


class Seq2SeqLM(nn.Module):
    """Encoder-decoder: the decoder attends causally to itself and fully to the encoder output.

    Source and target share one embedding matrix (and, tied, the output projection).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        _require(cfg, encoder=True, decoder=True, model="Seq2SeqLM")
        self.embed = Embedder(cfg)
        self.encoder = Stack(cfg, cfg.num_encoder_layers, causal=False, name="encoder")
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True, has_cross_attention=True, name="decoder")
        self.lm_head = _lm_head(cfg)

    def encode(self, source, *, segment_ids=None, positions=None, deterministic=True) -> jax.Array:
        """source tokens [B, S] -> encoder output [B, S, D]."""
        segment_ids, positions = _inputs(self.config, source, segment_ids, positions)
        x = self.embed(source, positions, deterministic=deterministic)
        x, _ = self.encoder(x, segment_ids, positions, deterministic=deterministic)
        return x

    def decode(
        self,
        target_in: jax.Array,
        encoded: jax.Array | None,
        *,
        source_segment_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ):
        """Decoder inputs [B, T] (targets shifted right) + encoder output -> logits [B, T, V].

        With a cache, returns (logits, updated cache); the first call passes `encoded` and
        fills the cache with the cross-attention keys and values, later calls pass None.
        """
        segment_ids, positions = _inputs(self.config, target_in, segment_ids, positions, cache)
        x = self.embed(target_in, positions, deterministic=deterministic)
        x, cache = self.decoder(
            x, segment_ids, positions, encoded=encoded, encoded_segment_ids=source_segment_ids,
            cache=cache, deterministic=deterministic,
        )
        logits = _output_logits(self, self.config, x)
        return logits if cache is None else (logits, cache)

    def __call__(
        self,
        source: jax.Array,
        target_in: jax.Array,
        *,
        source_segment_ids: jax.Array | None = None,
        target_segment_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """source [B, S], decoder inputs [B, T] -> logits [B, T, V] float32 (teacher forcing)."""
        encoded = self.encode(source, segment_ids=source_segment_ids, deterministic=deterministic)
        return self.decode(
            target_in, encoded, source_segment_ids=source_segment_ids, segment_ids=target_segment_ids,
            deterministic=deterministic,
        )


def merge_pretrained(params, pretrained) -> tuple[dict, list[str]]:
    """Copies every parameter of `pretrained` whose path also exists in `params`.

    This moves a pretrained body under a new head: e.g. `MaskedLM` parameters into a freshly
    initialised `SequenceClassifier`, whose "embed", "encoder" and "pooler" then come from
    pretraining while "classifier" stays newly initialised. Both trees may be boxed
    (`nn.Partitioned`) or plain. Returns the merged plain tree and the '/'-joined paths that
    kept their fresh initialisation. A shape mismatch on a shared path is an error.
    """
    target = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    source = traverse_util.flatten_dict(nn.meta.unbox(pretrained), sep="/")
    mismatched = [
        f"{path}: pretrained {source[path].shape}, model {value.shape}"
        for path, value in target.items()
        if path in source and source[path].shape != value.shape
    ]
    if mismatched:
        raise ValueError(
            "Pretrained parameters do not fit the model; the two configs differ (vocab_size, d_model, "
            "heads or layers): " + "; ".join(mismatched)
        )
    for module in sorted({p.split("/")[0] for p in target} & {p.split("/")[0] for p in source}):
        if not any(p.split("/")[0] == module and p in source for p in target):  # a module, or a top-level leaf
            raise ValueError(
                f"No pretrained parameter of {module!r} matches the model's layout; were the two models "
                "built with different scan_layers settings?"
            )
    fresh = sorted(path for path in target if path not in source)
    merged = {path: jnp.asarray(source.get(path, value), value.dtype) for path, value in target.items()}
    return traverse_util.unflatten_dict(merged, sep="/"), fresh


def keep_layers(params, layers: list[int], stack: str = "encoder") -> dict:
    """The parameters with only `layers` (indices, in order) of `stack`, renumbered from 0: a
    student initialised from some of its teacher's layers (DistilBERT's, from every other one).
    Scanned stacks (a leading layer axis under "layers") and unscanned ones (layers_0, ...) alike;
    a stack of shared layers (ALBERT) keeps its one layer. Returns a plain tree."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    kept = {}
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) < 2 or parts[0] != stack or not parts[1].startswith("layers"):
            kept[path] = value
        elif parts[1] == "layers":  # scanned: [L, ...]
            kept[path] = value[jnp.asarray(layers)]
        elif int(parts[1].removeprefix("layers_")) in layers:
            index = layers.index(int(parts[1].removeprefix("layers_")))
            kept["/".join([stack, f"layers_{index}", *parts[2:]])] = value
    return traverse_util.unflatten_dict(kept, sep="/")
