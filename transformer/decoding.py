"""Generation as one compiled program: prefill the prompts, then one decode step in a while loop.

Greedy decoding, sampling (temperature, top-k, top-p) and beam search share the same
`decode_step`: the model applied to one new token per row with the KV cache. The prompt
goes through the model once (prefill); an encoder-decoder model runs its encoder once and
caches the cross-attention keys and values. The options travel as one `GenerationConfig`.

Prompt lengths are rounded up to a bucket (a power of two, at least 16) and prompts are
right-padded to it, so a new prompt of a length already seen reuses the compiled program.
Each distinct (batch size, bucket, `GenerationConfig.static()`) compiles once: temperature,
top_p and length_penalty are traced values.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from transformer.cache import DecoderCache, init_cache
from transformer.layers import is_weight_matrix
from transformer.models import CausalLM, Seq2SeqLM

STRATEGIES = ("greedy", "sample", "beam")
LENGTH_PENALTY_FORMS = ("power", "gnmt")
_NEG_INF = -1e30  # finite, so that arithmetic on eliminated scores stays well defined


# ----------------------------------------------------------------------------- the options


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to generate: one value from the command line (or a caller) to the decode loop.

    Checks what it can alone when built; what needs the model (vocabulary, context length)
    is checked by `generate` before anything compiles. The options of one strategy are None
    unless given (their defaults in brackets); given with another strategy, one is an error.
    """

    max_new_tokens: int = 64  # the loop stops after this many tokens (or when every row has produced eos_id)
    strategy: str = "greedy"  # "greedy" (argmax), "sample" or "beam"
    temperature: float | None = None  # sample [1.0]: < 1 sharpens the distribution, > 1 flattens it
    top_k: int | None = None  # sample [all]: only the k most likely tokens
    top_k_uniform: bool | None = None  # sample [False]: pick uniformly among the top_k tokens, not by probability
    top_p: float | None = None  # sample [all]: only the nucleus of probability p
    num_beams: int | None = None  # beam [4]: W live beams per row
    length_penalty: float | None = None  # beam [1.0] (a): a hypothesis scores sum(log p) / lp(length)
    length_penalty_form: str | None = None  # beam ["power"]: lp = length**a, or "gnmt": ((5 + length) / 6)**a
    early_stopping: bool | str | None = None  # beam ["never"]: True, False or "never": transformers' rules to stop
    no_repeat_ngram_size: int = 0  # n > 0: no n-gram occurs twice in the generated tokens (all strategies)
    eos_id: int | tuple[int, ...] | None = None  # a row stops at this token or any of these (kept); None: never
    pad_id: int | None = None  # pads the prompts and the output after EOS; None: 0
    bos_id: int | None = None  # the first decoder input of an encoder-decoder model
    vocab_size: int | None = None  # only ids below it are generated (embedding rows past a tokenizer); None: all

    def __post_init__(self):
        if isinstance(self.eos_id, (list, tuple)):  # several end tokens (an instruct model's end of turn)
            if not self.eos_id:
                raise ValueError("eos_id must be a token id, a non-empty list of them, or None.")
            object.__setattr__(self, "eos_id", tuple(int(i) for i in self.eos_id))  # hashable: a compile key
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}.")
        for name in ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "top_k"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        for name, strategy in _USED_BY.items():
            if self.strategy != strategy and getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to strategy={strategy!r} only, and this strategy is "
                    f"{self.strategy!r}: set strategy={strategy!r}, or leave {name} out."
                )
        if self.strategy == "sample":
            if self.temperature is not None and not 0 < self.temperature < math.inf:  # inf would void top_k and top_p
                raise ValueError(
                    f"temperature must be a finite number > 0 when sampling, got {self.temperature}; for the most "
                    "likely token use strategy='greedy'."
                )
            if self.top_k is not None and self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
            self._check_top_k_uniform()
        if self.num_beams is not None and self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}.")
        if not (self.early_stopping is None or isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 or None, got {self.vocab_size}.")
        if self.length_penalty is not None and not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}.")
        if self.length_penalty_form is not None and self.length_penalty_form not in LENGTH_PENALTY_FORMS:
            raise ValueError(
                f"length_penalty_form must be one of {', '.join(map(repr, LENGTH_PENALTY_FORMS))}, "
                f"got {self.length_penalty_form!r}."
            )

    def _check_top_k_uniform(self):
        """top_k_uniform=True needs top_k, and leaves no use for temperature and top_p."""
        if self.top_k_uniform is not None and not isinstance(self.top_k_uniform, bool):
            raise ValueError(f"top_k_uniform must be True or False, got {self.top_k_uniform!r}.")
        if not self.top_k_uniform:
            return
        if self.top_k is None:
            raise ValueError("top_k_uniform=True picks uniformly among the top_k tokens: give top_k too.")
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} would have no effect with top_k_uniform=True, which gives each "
                    f"of the top_k tokens the same chance whatever their probabilities: leave {name} out."
                )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids a row stops at: eos_id as a tuple (empty for None)."""
        return _as_ids(self.eos_id)

    def replace(self, **options: Any) -> GenerationConfig:
        """A copy with some options changed (and checked); an unknown option is a TypeError."""
        names = [field.name for field in dataclasses.fields(self)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"Unknown generation option {', '.join(unknown)}; the options are {', '.join(names)}.")
        return dataclasses.replace(self, **options)

    def value(self, name: str) -> Any:
        """An option's value, or its strategy's default where it was not given."""
        value = getattr(self, name)
        return _STRATEGY_DEFAULTS.get(name) if value is None else value

    def static(self) -> GenerationConfig:
        """The options that shape the compiled program: without the traced ones (temperature,
        top_p's value, length_penalty), with the static options' defaults filled in."""
        beam, sample = self.strategy == "beam", self.strategy == "sample"
        return self.replace(
            temperature=None,
            top_k_uniform=self.value("top_k_uniform") if sample else None,
            top_p=None if self.top_p is None else 1.0,
            num_beams=self.value("num_beams") if beam else None,
            length_penalty=None,
            length_penalty_form=self.value("length_penalty_form") if beam else None,
            early_stopping=self.value("early_stopping") if beam else None,
        )


# The options one strategy alone uses (given for another strategy, an error), and the defaults of those not given.
_USED_BY = dict(
    temperature="sample", top_k="sample", top_k_uniform="sample", top_p="sample", num_beams="beam",
    length_penalty="beam", length_penalty_form="beam", early_stopping="beam",
)
_STRATEGY_DEFAULTS = dict(
    temperature=1.0, top_k_uniform=False, num_beams=4, length_penalty=1.0, length_penalty_form="power",
    early_stopping="never",
)


def with_options(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """`config` (default: GenerationConfig()) with the options given by name over it."""
    if config is None:
        config = GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise TypeError(
            f"config must be a GenerationConfig, got {type(config).__name__}; pass the options by name "
            "(e.g. max_new_tokens=20)."
        )
    return config.replace(**options) if options else config


# ----------------------------------------------------------------------------- logit filters


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Divides logits by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (ties with the k-th kept too); the rest -> -inf."""
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p;
    p = 1 keeps every token (the running sum of the others reaches 1.0 in float32 first)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    num_kept = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1: the most likely is always kept
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return jnp.where((logits < threshold) & (p < 1), -jnp.inf, logits)


def ban_repeated_ngrams(logits: jax.Array, history: jax.Array, length: jax.Array | int, n: int) -> jax.Array:
    """logits [..., V] with every token that would repeat an n-gram of history [..., S]'s first
    `length` tokens (the tokens generated so far; unlike Hugging Face's, not the prompt's)
    eliminated: fairseq's no_repeat_ngram_size, the usual cure for the loops of greedy and beam
    search. n = 0: none. Where every token is banned (n = 1 past the vocabulary) any may follow."""
    starts = history.shape[-1] - n + 1  # windows of n - 1 tokens followed by one more
    if n < 1 or starts < 1:
        return logits
    shape, history, logits = logits.shape, history.reshape(-1, history.shape[-1]), logits.reshape(-1, logits.shape[-1])
    rows = history.shape[0]
    last = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)  # [R, n-1]
    match = jnp.broadcast_to(jnp.arange(starts) + n - 1 < length, (rows, starts))  # the next token is written
    for k in range(n - 1):
        match &= history[:, k : k + starts] == last[:, k : k + 1]
    following = history[:, n - 1 :]  # [R, starts]: the token after each window
    hits = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(rows)[:, None], following].add(match.astype(jnp.int32))
    return jnp.where(hits > 0, _NEG_INF, logits).reshape(shape)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_k_uniform: bool = False,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Draws one token per row from temperature-scaled, top-k and top-p filtered logits. [B, V] -> [B].

    top_k_uniform: each of the top_k tokens alike, whatever its logit (eliminated ones, -inf or banned,
    stay out); temperature and top_p then change nothing."""
    logits = logits.astype(jnp.float32)
    if top_k_uniform:
        kept = top_k_filter(logits, top_k)
        return jax.random.categorical(rng, jnp.where(kept > _NEG_INF, 0.0, kept), axis=-1)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1)


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, axis=-1): the first of equal maxima (the first NaN if any), [..., V] -> [...].

    As two plain reductions, a maximum and then a minimum over the positions holding it.
    XLA:CPU runs jnp.argmax's single reduction over (value, index) pairs element by element:
    1.7 ms over GPT-2's 50257 logits at batch 8 (2 cores), against 0.24 ms for these two.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    positions = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, positions, logits.shape[-1]), axis=-1)


def token_log_probs(logits: jax.Array, token: jax.Array) -> jax.Array:
    """log_softmax(logits)[token] per row, [B, V], [B] -> [B] float32, without the [B, V] result.

    The same arithmetic as jax.nn.log_softmax: (x - max) - log(sum(exp(x - max))).
    """
    logits = logits.astype(jnp.float32)
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - log_normalizer


# ----------------------------------------------------------------------------- the decode step


@struct.dataclass
class GenerateOutput:
    """tokens [B, max_new_tokens] (pad_id after EOS), lengths [B] (EOS included), and scores [B]:
    the summed log-probability of the tokens under the model (greedy, sample), or the
    length-normalised beam score (beam); with GenerationConfig.vocab_size, a distribution over
    the ids below it."""

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array


DecodeStep = Callable[[jax.Array, DecoderCache], tuple[jax.Array, DecoderCache]]


def _decode_step(model: nn.Module, variables) -> DecodeStep:
    """token [B] + cache -> next-token logits [B, V] float32 + cache: the one step every strategy uses."""

    def step(token, cache):
        if isinstance(model, Seq2SeqLM):
            logits, cache = model.apply(variables, token[:, None], None, cache=cache, method="decode")
        else:
            logits, cache = model.apply(variables, token[:, None], cache=cache)
        return logits[:, 0], cache

    return step


def _within_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] logits with the ids >= vocab_size at -inf: they are never chosen."""
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


def _limited(step: DecodeStep, vocab_size: int) -> DecodeStep:
    def limited_step(token, cache):
        logits, cache = step(token, cache)
        return _within_vocab(logits, vocab_size), cache

    return limited_step


def unscanned(model: nn.Module, variables):
    """The same model with a Python loop over its layers, and its stacked layer parameters
    split into one tree per layer (`layers` -> `layers_0`, `layers_1`, ...).

    Inside a while loop over tokens, a scanned stack slices every layer's weights out of the
    stacked arrays again at each token; unstacked once before the loop, they are read in place.
    """
    if not model.config.scan_layers:
        return model, variables

    def unstack(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, value in tree.items():
            if key == "layers":
                for i in range(jax.tree.leaves(value)[0].shape[0]):
                    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], value)
            else:
                out[key] = unstack(value)
        return out

    params = unstack(nn.meta.unbox(variables["params"]))
    return model.clone(config=model.config.replace(scan_layers=False)), {**variables, "params": params}


def for_decoding(model: nn.Module, variables):
    """The model and variables laid out for the decode loop, computing what the model does.

    - `unscanned`: the layers' parameters unstacked.
    - A tied output projection gets its own copy of the embedding matrix, transposed ([V, D]
      -> [D, V]), as the `lm_head` kernel of the same model untied (T5's 1/sqrt(D) rescaling
      folded into it). A step's logits read the whole [V, D] matrix (a third of GPT-2
      small's weights) in a product against its transpose, which XLA:CPU runs slower than
      against a [D, V] kernel (GPT-2 small, batch 8, 2 cores: 6.6 against 4.9 ms); on
      accelerators the transpose is free. The logits are the tied model's up to the order
      of a float32 sum.
    - With a compute dtype narrower than the parameters' (bfloat16), the matrices the model
      casts to it at every use (kernels, embedding tables) are cast once here: the same
      values, half the bytes to keep, and no conversion of every weight at every call
      (compiled around cast weights, bfloat16 logits may differ by a rounding or two).

    Each `generate` call prepares its arguments so (nothing changes for prepared ones): a
    caller that keeps the result, as `Sampler` does, pays the copy and the casts once. The
    copy costs the embedding's memory once more.
    """
    model, variables = unscanned(model, variables)
    config = model.config
    given = nn.meta.unbox(variables["params"])
    params = given
    if config.tie_embeddings:
        embedding = params["embed"]["token"]["embedding"]  # [V, D]
        kernel = embedding.T * config.d_model**-0.5 if config.rescale_tied_logits else embedding.T
        params = {**params, "lm_head": {"kernel": kernel}}
        model = model.clone(config=config.replace(tie_embeddings=False))
    params = _cast_matrices(params, jnp.dtype(config.dtype))
    if not config.tie_embeddings and all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(given))):
        return model, variables  # prepared already
    return model, {**variables, "params": params}


def _cast_matrices(params, dtype):
    """The float kernels and embedding tables in `dtype` (those not in it already); not T5's
    relative-position bias table, which the model reads in float32, nor norms and biases."""

    def cast(path, leaf):
        matrix = is_weight_matrix(str(getattr(key, "key", key)) for key in path)
        narrower = jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.finfo(leaf.dtype).bits > jnp.finfo(dtype).bits
        return leaf.astype(dtype) if matrix and narrower else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _prefill(model, variables, prompts, prompt_lengths, cache_length, bos_id):
    """Runs the prompts (encoder-decoder: the source) through the model once.

    Returns the logits [B, V] for the first new token and the filled cache.
    """
    batch, length = prompts.shape
    segment_ids = (jnp.arange(length)[None] < prompt_lengths[:, None]).astype(jnp.int32)
    cache = init_cache(model.config, batch, cache_length)
    if isinstance(model, Seq2SeqLM):
        encoded = model.apply(variables, prompts, segment_ids=segment_ids, method="encode")
        start = jnp.full((batch, 1), bos_id, jnp.int32)
        logits, cache = model.apply(
            variables, start, encoded, source_segment_ids=segment_ids, cache=cache, method="decode"
        )
        return logits[:, 0], cache
    logits, cache = model.apply(variables, prompts, segment_ids=segment_ids, cache=cache, logits_at=prompt_lengths - 1)
    return logits[:, 0], cache


@struct.dataclass
class SamplingState:
    """The greedy or sampling loop's state: the tokens so far, the last of them the next step's input."""

    step: jax.Array  # [] tokens generated so far
    tokens: jax.Array  # [B, max_new_tokens] generated tokens (pad_id from `step` on, and after EOS)
    lengths: jax.Array  # [B] tokens generated per row, EOS included
    scores: jax.Array  # [B] their summed log-probabilities
    done: jax.Array  # [B] whether the row has produced eos_id
    token: jax.Array  # [B] the last token chosen (pad_id for finished rows): the next decode step's input
    cache: DecoderCache  # the decode step's cache, without `token`
    rng: jax.Array  # the key the next draw splits

    @classmethod
    def start(cls, cache, rng, *, batch: int, max_new_tokens: int, pad_id: int) -> SamplingState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            scores=jnp.zeros((batch,), jnp.float32),
            done=jnp.zeros((batch,), bool),
            token=jnp.full((batch,), pad_id, jnp.int32),
            cache=cache,
            rng=rng,
        )


def sample_loop(
    decode_step: DecodeStep,
    logits: jax.Array,
    cache,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_k_uniform: bool = False,
    top_p: float | jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    no_repeat_ngram_size: int = 0,
    on_tokens: Callable[[jax.Array], None] | None = None,
) -> GenerateOutput:
    """Greedy or sampled decoding as one lax.while_loop over `decode_step`.

    logits [B, V]: the distribution of the first new token (from the prefill), chosen before
    the loop; each loop step runs `decode_step` on the last token and chooses the next, so
    max_new_tokens tokens take max_new_tokens - 1 decode steps. The loop stops when every
    row has produced eos_id (or one of several) or after max_new_tokens tokens. `on_tokens`, when given, is
    called with each step's tokens [B] (pad_id for finished rows), e.g. to send them to the
    host with `jax.debug.callback` (streaming). With `no_repeat_ngram_size` n > 0, no n-gram
    occurs twice in a row's tokens; scores stay the model's log-probabilities.
    """

    def choose(state: SamplingState, logits: jax.Array) -> SamplingState:
        """Every row's next token drawn from its logits [B, V], and recorded."""
        allowed = ban_repeated_ngrams(logits, state.tokens, state.step, no_repeat_ngram_size)
        if greedy:  # the key is left as it is: splitting it is a dozen ops a step for nothing
            rng, token = state.rng, argmax(allowed)
        else:
            rng, key = jax.random.split(state.rng)
            token = sample_logits(
                allowed, key, temperature=temperature, top_k=top_k, top_k_uniform=top_k_uniform, top_p=top_p
            )
        token_log_prob = token_log_probs(logits, token)  # [B]
        token = jnp.where(state.done, pad_id, token).astype(jnp.int32)
        if on_tokens is not None:
            on_tokens(token)
        return state.replace(
            step=state.step + 1,
            tokens=state.tokens.at[:, state.step].set(token),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            scores=state.scores + jnp.where(state.done, 0.0, token_log_prob),
            done=state.done | _is_eos(token, eos_id),
            token=token,
            rng=rng,
        )

    def body(state: SamplingState) -> SamplingState:
        logits, cache = decode_step(state.token, state.cache)
        return choose(state.replace(cache=cache), logits)

    start = SamplingState.start(cache, rng, batch=logits.shape[0], max_new_tokens=max_new_tokens, pad_id=pad_id)
    state = jax.lax.while_loop(_unfinished(max_new_tokens), body, choose(start, logits))
    return GenerateOutput(state.tokens, state.lengths, state.scores)


def _as_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    return () if eos_id is None else tuple(eos_id) if isinstance(eos_id, (list, tuple)) else (eos_id,)


def _is_eos(token: jax.Array, eos_id: int | Sequence[int] | None) -> jax.Array:
    """Whether each token is (one of) the EOS id(s); all False for None."""
    ids = _as_ids(eos_id)
    return jnp.isin(token, jnp.asarray(ids, token.dtype)) if ids else jnp.zeros(token.shape, bool)


def _unfinished(steps: int) -> Callable:
    """The decode loops' condition: fewer than `steps` tokens so far, and a row not done."""
    return lambda state: (state.step < steps) & ~jnp.all(state.done)


def _length_penalty(alpha: float | jax.Array, form: str) -> Callable:
    """lp(length), what a hypothesis's summed log-probability is divided by: length**alpha ("power"), or
    GNMT's ((5 + length) / 6)**alpha ("gnmt", Wu et al. 2016); either is monotonic in the length."""
    offset, scale = {"power": (0, 1), "gnmt": (5, 6)}[form]
    return lambda length: ((offset + jnp.asarray(length, jnp.float32)) / scale) ** alpha


@struct.dataclass
class BeamState:
    """The beam search loop's state: W live beams and the W best finished hypotheses per row."""

    step: jax.Array  # [] tokens generated so far
    alive: jax.Array  # [B, W, max_new_tokens] live beams (pad_id from `step` on)
    alive_scores: jax.Array  # [B, W] their summed log-probabilities, best first
    finished: jax.Array  # [B, W, max_new_tokens] finished hypotheses (pad_id after their end)
    finished_scores: jax.Array  # [B, W] their length-normalised scores, best first; _NEG_INF: none yet
    finished_lengths: jax.Array  # [B, W] their lengths, EOS included
    done: jax.Array  # [B] rows that take no more finished hypotheses (see _is_done)
    logits: jax.Array  # [B * W, V] next-token logits of the live beams
    cache: DecoderCache  # B * W rows: row b * W + k holds beam k of row b

    @classmethod
    def start(cls, logits, cache, *, width: int, steps: int, pad_id: int) -> BeamState:
        """W copies of each row's prefill, only the first of them live (they start identical)."""
        batch = logits.shape[0]
        first_beam_only = jnp.where(jnp.arange(width) == 0, 0.0, _NEG_INF)
        return cls(
            step=jnp.zeros((), jnp.int32),
            alive=jnp.full((batch, width, steps), pad_id, jnp.int32),
            alive_scores=jnp.broadcast_to(first_beam_only, (batch, width)),
            finished=jnp.full((batch, width, steps), pad_id, jnp.int32),
            finished_scores=jnp.full((batch, width), _NEG_INF),
            finished_lengths=jnp.zeros((batch, width), jnp.int32),
            done=jnp.zeros((batch,), bool),
            logits=jnp.repeat(logits, width, axis=0),  # [B * W, V]
            cache=cache,
        )


def _is_done(
    step, alive_scores, finished_scores, steps: int, penalty: Callable, early_stopping: bool | str
) -> jax.Array:
    """[B] whether a row, after `step` tokens, takes no more finished hypotheses, by transformers'
    `early_stopping`; once it has W of them (alive_scores and finished_scores [B, W], best first):

    - True: at once;
    - "never": when its best live beam cannot beat the W-th. Log-probabilities are <= 0, so a live
      beam's final score is at most its current sum divided by the largest `penalty(length)` (> 0)
      over the lengths it can still reach, step + 1 .. steps (either form is monotonic in the
      length: at one end, whatever the sign of length_penalty);
    - False: when it cannot by transformers' heuristic, its current sum over penalty(step)
      (with length_penalty > 0, it may stop before a longer hypothesis that would have won).
    """
    full = finished_scores[:, -1] > _NEG_INF
    if early_stopping is True:
        return full
    largest = penalty(step) if early_stopping is False else jnp.maximum(penalty(step + 1), penalty(steps))
    return full & (alive_scores[:, 0] / largest <= finished_scores[:, -1])


def _best_finished(state: BeamState, candidates, scores, length) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The W best of the finished hypotheses and the candidates [B, (1 + E)W, steps] of `length`
    tokens that end now (`scores` [B, (1 + E)W]: their normalised scores, _NEG_INF for the others)."""
    width = state.finished_scores.shape[1]
    sequences = jnp.concatenate([state.finished, candidates], axis=1)
    all_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
    lengths = jnp.concatenate([state.finished_lengths, jnp.full(scores.shape, length, jnp.int32)], axis=1)
    best_scores, keep = jax.lax.top_k(all_scores, width)
    rows = jnp.arange(scores.shape[0])[:, None]
    return sequences[rows, keep], best_scores, lengths[rows, keep]


def beam_search(
    decode_step: DecodeStep,
    logits: jax.Array,
    cache,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float | jax.Array = 1.0,
    length_penalty_form: str = "power",
    early_stopping: bool | str = "never",
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    no_repeat_ngram_size: int = 0,
    select_rows: Callable = lambda cache, rows: cache.select_rows(rows),
) -> GenerateOutput:
    """Beam search over the same decode step: W live beams and W best finished hypotheses per row.

    logits [B, V] and cache (B rows) come from the prefill; `select_rows(cache, rows)` gathers cache
    rows. A hypothesis scores sum(log p) / length**length_penalty, or with length_penalty_form="gnmt"
    over ((5 + length) / 6)**length_penalty, and repeats no n-gram of size `no_repeat_ngram_size`
    (0: off). Each step extends every live beam by every token, keeps the (1 + E)W best (E EOS ids:
    W of them do not end), finishes those ending in EOS (all, at the last step) and continues the W
    best others, until each row is done by `early_stopping` (_is_done).
    """
    (batch, vocab), width, steps, eos_ids = logits.shape, num_beams, max_new_tokens, _as_ids(eos_id)
    rows, penalty = jnp.arange(batch)[:, None], _length_penalty(length_penalty, length_penalty_form)

    def body(state):
        i = state.step
        log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(batch, width, vocab)
        log_probs = ban_repeated_ngrams(log_probs, state.alive, i, no_repeat_ngram_size)
        candidates = (state.alive_scores[:, :, None] + log_probs).reshape(batch, width * vocab)
        scores, index = jax.lax.top_k(candidates, (1 + len(eos_ids)) * width)  # at most E x W of them end in EOS
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        sequences = state.alive[rows, parent].at[:, :, i].set(token)  # [B, (1 + E)W, steps]
        ends = (i + 1 == steps) | _is_eos(token, eos_ids)  # at the length limit live beams finish too

        normalised = jnp.where(ends & ~state.done[:, None], scores / penalty(i + 1), _NEG_INF)
        finished, finished_scores, finished_lengths = _best_finished(state, sequences, normalised, i + 1)

        alive_scores, alive_keep = jax.lax.top_k(jnp.where(ends, _NEG_INF, scores), width)  # [B, W]
        cache = select_rows(state.cache, (rows * width + parent[rows, alive_keep]).reshape(-1))
        logits, cache = decode_step(token[rows, alive_keep].reshape(-1), cache)
        return BeamState(
            step=i + 1,
            alive=sequences[rows, alive_keep],
            alive_scores=alive_scores,
            finished=finished,
            finished_scores=finished_scores,
            finished_lengths=finished_lengths,
            done=state.done | _is_done(i + 1, alive_scores, finished_scores, steps, penalty, early_stopping),
            logits=logits,
            cache=cache,
        )

    cache = select_rows(cache, jnp.repeat(jnp.arange(batch), width))  # row b -> rows b*W .. b*W+W-1
    start = BeamState.start(logits, cache, width=width, steps=steps, pad_id=pad_id)
    state = jax.lax.while_loop(_unfinished(steps), body, start)
    # Every row has a finished hypothesis: the loop ends early only when each row has W of them.
    return GenerateOutput(state.finished[:, 0], state.finished_lengths[:, 0], state.finished_scores[:, 0])


@functools.partial(jax.jit, static_argnames=("model", "config", "cache_length", "stream"))
def _generate(
    model, variables, prompts, prompt_lengths, rng, temperature, top_p, length_penalty, stream_id, *,
    config: GenerationConfig, cache_length: int, stream: bool,
) -> GenerateOutput:
    """The whole generation as one compiled program: prefill, then the strategy's loop.

    `config` is `GenerationConfig.static()`; temperature, top_p and length_penalty are the traced values.
    """
    model, variables = for_decoding(model, variables)
    logits, cache = _prefill(model, variables, prompts, prompt_lengths, cache_length, config.bos_id)
    step = _decode_step(model, variables)
    if config.vocab_size is not None:
        logits, step = _within_vocab(logits, config.vocab_size), _limited(step, config.vocab_size)
    if config.strategy == "beam":
        return beam_search(
            step, logits, cache, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
            length_penalty=length_penalty, length_penalty_form=config.length_penalty_form,
            early_stopping=config.early_stopping, eos_id=config.eos_id,
            pad_id=config.pad_id, no_repeat_ngram_size=config.no_repeat_ngram_size,
        )
    on_tokens = (lambda token: jax.debug.callback(_emit, stream_id, token, ordered=True)) if stream else None
    return sample_loop(
        step, logits, cache, rng, max_new_tokens=config.max_new_tokens, greedy=config.strategy == "greedy",
        temperature=temperature, top_k=config.top_k, top_k_uniform=config.top_k_uniform,
        top_p=None if config.top_p is None else top_p,
        eos_id=config.eos_id, pad_id=config.pad_id, no_repeat_ngram_size=config.no_repeat_ngram_size,
        on_tokens=on_tokens,
    )


# Streaming listeners by id: the compiled program carries the id, not the Python callable,
# so every streaming call of the same shapes reuses one compiled program.
_LISTENERS: dict[int, Callable[[np.ndarray], None]] = {}
_NEXT_STREAM_ID = itertools.count(1)


def _emit(stream_id, tokens) -> None:
    _LISTENERS[int(stream_id)](np.asarray(tokens))


# ----------------------------------------------------------------------------- the public API


def bucket_length(length: int, limit: int) -> int:
    """Rounds a prompt length up to a power of two (at least 16), but not beyond `limit`."""
    return min(max(16, 1 << (length - 1).bit_length()), max(limit, length))


def generate(
    model: CausalLM | Seq2SeqLM,
    variables,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    config: GenerationConfig | None = None,
    *,
    rng: jax.Array | None = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    **options: Any,
) -> GenerateOutput:
    """Continues each prompt (decoder-only) or translates each source (encoder-decoder).

    prompts: token id lists of any lengths, or an array [B, T] (right-padded, with
        `prompt_lengths`, or all of length T). Each row's result equals generating it alone,
        greedy or by beam search (sampling draws a row's randomness by its place in the batch).
    config: the GenerationConfig (default: greedy, 64 new tokens); `options`, its fields by
        name (max_new_tokens=20, strategy="beam", ...), override it.
    rng: the random key of strategy "sample".
    on_tokens: streaming (greedy and sample): called on the host with each step's new tokens
        [B] (pad_id for rows that have finished) while the compiled loop runs.
    Errors on bad arguments are raised before anything compiles.
    """
    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise TypeError(f"generate needs a CausalLM or Seq2SeqLM, got {type(model).__name__}.")
    config = with_options(config, options)
    if config.pad_id is None:
        config = config.replace(pad_id=0)
    rows, lengths = _as_rows(prompts, prompt_lengths)
    _check_arguments(model, rows, lengths, config, rng=rng, streaming=on_tokens is not None)
    max_length, max_new_tokens = model.config.max_length, config.max_new_tokens
    if isinstance(model, Seq2SeqLM):
        padded_length = bucket_length(max(lengths), max_length)
        # BOS and all new tokens but the last are fed; beam search feeds the last too, for logits it
        # never reads (at the context's end that write lands on the last slot, which nothing reads,
        # and a learned position table gives that position NaN: harmless in logits nobody reads).
        cache_length = min(1 + max_new_tokens, max_length)
    else:
        padded_length = bucket_length(max(lengths), max_length - max_new_tokens)
        cache_length = padded_length + max_new_tokens
    padded = np.full((len(rows), padded_length), config.pad_id, np.int32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    stream_id = next(_NEXT_STREAM_ID) if on_tokens is not None else 0
    if on_tokens is not None:
        _LISTENERS[stream_id] = on_tokens
    try:
        output = _generate(
            model, variables, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32),
            jax.random.PRNGKey(0) if rng is None else rng,
            jnp.float32(config.value("temperature")), jnp.float32(1.0 if config.top_p is None else config.top_p),
            jnp.float32(config.value("length_penalty")), jnp.int32(stream_id),
            config=config.static(), cache_length=cache_length, stream=on_tokens is not None,
        )
        if on_tokens is not None:
            jax.block_until_ready(output)
            jax.effects_barrier()
        return output
    finally:
        _LISTENERS.pop(stream_id, None)


def check_arguments(model, prompts, config: GenerationConfig, *, rng: jax.Array | None = None, streaming=False):
    """Raises what `generate` would raise for these arguments before compiling: for a caller that
    must know before it starts, as a stream that shows its prompt first."""
    _check_arguments(model, *_as_rows(prompts, None), config, rng=rng, streaming=streaming)


def _as_rows(prompts, prompt_lengths) -> tuple[list[np.ndarray], list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = _token_ids(prompts)
        if prompts.ndim != 2:
            raise ValueError(f"Prompts must be token id lists or an array [batch, length], got shape {prompts.shape}.")
        lengths = [prompts.shape[1]] * len(prompts) if prompt_lengths is None else [int(n) for n in prompt_lengths]
        if len(lengths) != len(prompts) or any(not 0 <= n <= prompts.shape[1] for n in lengths):
            raise ValueError(
                f"prompt_lengths must give one length per row, each from 0 to the array's {prompts.shape[1]}; "
                f"got {lengths} for {len(prompts)} rows."
            )
        return [row[:n] for row, n in zip(prompts, lengths)], lengths
    rows = [_token_ids(row).reshape(-1) for row in prompts]
    return rows, [len(row) for row in rows]


def _token_ids(ids) -> np.ndarray:
    """`ids` as an integer array; ids of another kind (floats, text) are an error, never cut to integers."""
    array = np.asarray(ids)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"Prompts must hold integer token ids, got {array.dtype} values (e.g. {array.flat[0]!r}).")
    return array.astype(np.int64)


def _check_arguments(model, rows, lengths, config: GenerationConfig, *, rng, streaming: bool):
    """What the GenerationConfig cannot check alone: the prompts and ids against the model."""
    vocab_size, max_length, max_new_tokens = model.config.vocab_size, model.config.max_length, config.max_new_tokens
    if not rows:
        raise ValueError("No prompts given.")
    if min(lengths) == 0:
        raise ValueError(f"Prompt {lengths.index(0)} is empty; every prompt needs at least one token.")
    longest = max(lengths)
    if isinstance(model, Seq2SeqLM):
        if longest > max_length:
            raise ValueError(f"A source of {longest} tokens exceeds the model's context of {max_length}.")
        if max_new_tokens > max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's context of {max_length}.")
        if config.bos_id is None:
            raise ValueError("An encoder-decoder model needs bos_id, the first decoder input.")
    elif longest + max_new_tokens > max_length:
        raise ValueError(
            f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{max_length} tokens; shorten the prompt or generate fewer tokens."
        )
    for i, row in enumerate(rows):
        if len(row) and (row.min() < 0 or row.max() >= vocab_size):
            raise ValueError(f"Prompt {i} has token ids outside the vocabulary [0, {vocab_size}).")
    if config.vocab_size is not None and config.vocab_size > vocab_size:
        raise ValueError(f"GenerationConfig.vocab_size={config.vocab_size} exceeds the model's {vocab_size}.")
    for name, tokens in (("eos_id", config.eos_ids), ("pad_id", [config.pad_id]), ("bos_id", [config.bos_id])):
        for token in tokens:
            if token is not None and not 0 <= token < vocab_size:
                raise ValueError(f"{name}={token} is outside the vocabulary [0, {vocab_size}).")
    if config.strategy == "sample":
        if rng is None:
            raise ValueError("Sampling needs a random key: pass rng=jax.random.PRNGKey(seed).")
        if config.top_k is not None and config.top_k > vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}], got {config.top_k}.")
    if streaming and config.strategy == "beam":
        raise ValueError("Streaming (on_tokens) needs strategy 'greedy' or 'sample': beams are reordered until the end.")
