"""The Transformer family in JAX/Flax: one attention, one block, three architectures.

Glossary
--------
Shape letters (as in `jax.nn.dot_product_attention`):
    B batch, T query length, S key/value length, N query heads, K key/value heads,
    H head dimension, D model dimension (d_model), F feed-forward dimension (d_ff),
    V vocabulary size, L layers.
Masks: boolean, True = may attend, shaped [B, 1, T, S]; built from positions and segment ids.
Segment ids: [B, T] ints; 0 = padding, equal non-zero ids = the same packed document.
Token ids: 0 pad, 1 unk, 2 BOS, 3 EOS, 4 [CLS], 5 [SEP], 6 [MASK] (tokenizers trained here).
Logical axis names (for sharding): vocab, embed, heads, kv_heads, head_dim, mlp, layers,
positions, token_types, relative_buckets, labels; activations batch, length. The table
mapping them to ("data", "fsdp", "tensor") mesh axes is `transformer.sharding.LOGICAL_AXIS_RULES`
(`axis_rules` adapts it to a model's key/value heads).
Dtypes: parameters in `param_dtype` (float32), compute in `dtype`; softmax, logits and
losses in float32.
"""

from transformer.attention import attention_weights, dot_product_attention
from transformer.cache import DecoderCache, KVCache, init_cache
from transformer.config import (
    PRESETS,
    Activation,
    AttentionImplementation,
    Initialisation,
    ModelConfig,
    Norm,
    NormPosition,
    Pooler,
    PositionEncoding,
    RematPolicy,
)
from transformer.decoding import (
    GenerateOutput,
    GenerationConfig,
    apply_temperature,
    ban_repeated_ngrams,
    beam_search,
    for_decoding,
    generate,
    sample_logits,
    sample_loop,
    top_k_filter,
    top_p_filter,
    unscanned,
)
from transformer.interpret import TextAttention, attention_maps, plot_attention, text_attention
from transformer.layers import Block, BlockInputs, Embedder, FeedForward, MultiHeadAttention, RelativePositionBias
from transformer.masks import (
    AttentionMask,
    causal_mask,
    cross_attention_mask,
    padding_mask,
    segment_mask,
    self_attention_mask,
)
from transformer.models import (
    CausalLM,
    DecoderClassifier,
    EncoderModel,
    MaskedLM,
    QuestionAnswering,
    Seq2SeqLM,
    SequenceClassifier,
    TokenClassifier,
    best_spans,
    merge_pretrained,
    sentence_embedding,
)
from transformer.positions import RelativeBias, apply_rotary, relative_position_bucket, sinusoidal_embedding
from transformer.pretrained import Pretrained, from_pretrained, save_pretrained
from transformer.sampler import Sampler
from transformer.stacks import Stack
from transformer.tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "Activation",
    "AttentionImplementation",
    "AttentionMask",
    "Block",
    "BlockInputs",
    "CausalLM",
    "DecoderCache",
    "DecoderClassifier",
    "Embedder",
    "EncoderModel",
    "FeedForward",
    "GenerateOutput",
    "GenerationConfig",
    "Initialisation",
    "KVCache",
    "MaskedLM",
    "ModelConfig",
    "MultiHeadAttention",
    "Norm",
    "NormPosition",
    "Pooler",
    "PositionEncoding",
    "Pretrained",
    "QuestionAnswering",
    "RelativeBias",
    "RelativePositionBias",
    "RematPolicy",
    "Sampler",
    "Seq2SeqLM",
    "SequenceClassifier",
    "Stack",
    "TextAttention",
    "TokenClassifier",
    "Tokenizer",
    "apply_rotary",
    "apply_temperature",
    "attention_maps",
    "attention_weights",
    "ban_repeated_ngrams",
    "beam_search",
    "best_spans",
    "causal_mask",
    "cross_attention_mask",
    "dot_product_attention",
    "from_pretrained",
    "for_decoding",
    "generate",
    "init_cache",
    "merge_pretrained",
    "padding_mask",
    "plot_attention",
    "relative_position_bucket",
    "sample_logits",
    "sample_loop",
    "save_pretrained",
    "segment_mask",
    "self_attention_mask",
    "sentence_embedding",
    "sinusoidal_embedding",
    "text_attention",
    "top_k_filter",
    "top_p_filter",
    "unscanned",]
