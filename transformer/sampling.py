"""Generation as one compiled program: prefill the prompts, then one decode step in a while loop.

Greedy decoding, sampling (temperature, top-k, top-p) and beam search share the same
`decode_step`: the model applied to one new token per row with the KV cache. The prompt
goes through the model once (prefill); an encoder-decoder model runs its encoder once and
caches the cross-attention keys and values.

Prompt lengths are rounded up to a bucket (a power of two, at least 16) and prompts are
right-padded to it, so a new prompt of a length already seen reuses the compiled program.
Each distinct (batch size, bucket, max_new_tokens, strategy, top_k, num_beams) compiles once.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from transformer.cache import DecoderCache, init_cache
from transformer.models import CausalLM, Seq2SeqLM

STRATEGIES = ("greedy", "sample", "beam")
_NEG_INF = -1e30  # finite, so that arithmetic on eliminated scores stays well defined


# ----------------------------------------------------------------------------- logit filters


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Divides logits by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (ties with the k-th kept too); the rest -> -inf."""
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    num_kept = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1: the most likely is always kept
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Draws one token per row from temperature-scaled, top-k and top-p filtered logits. [B, V] -> [B]."""
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1)


# ----------------------------------------------------------------------------- the decode step


@struct.dataclass
class GenerateOutput:
    """tokens [B, max_new_tokens] (pad_id after EOS), lengths [B] (EOS included), and scores [B]:
    the summed log-probability of the tokens under the model (greedy, sample), or the
    length-normalised beam score (beam)."""

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
    logits, cache = model.apply(variables, prompts, segment_ids=segment_ids, cache=cache)
    return jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0], cache


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
    top_p: float | jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_tokens: Callable[[jax.Array], None] | None = None,
) -> GenerateOutput:
    """Greedy or sampled decoding as one lax.while_loop over `decode_step`.

    logits [B, V]: the distribution of the first new token (from the prefill); the loop stops
    when every row has produced eos_id or after max_new_tokens tokens. `on_tokens`, when
    given, is called in the loop body with each step's tokens [B] (pad_id for finished rows),
    e.g. to send them to the host with `jax.debug.callback` (streaming).
    """
    batch = logits.shape[0]

    def body(state):
        i, tokens, lengths, scores, done, logits, cache, rng = state
        rng, key = jax.random.split(rng)
        if greedy:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        scores += jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0])
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        tokens = tokens.at[:, i].set(token)
        if on_tokens is not None:
            on_tokens(token)
        lengths += (~done).astype(jnp.int32)
        if eos_id is not None:
            done |= token == eos_id
        logits, cache = decode_step(token, cache)
        return i + 1, tokens, lengths, scores, done, logits, cache, rng

    def cond(state):
        i, done = state[0], state[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    state = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), bool),
        logits,
        cache,
        rng,
    )
    _, tokens, lengths, scores, *_ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, lengths, scores)


def _length_penalty(length: jax.Array, alpha: float | jax.Array) -> jax.Array:
    return jnp.asarray(length, jnp.float32) ** alpha


@struct.dataclass
class BeamState:
    """The beam search loop's state: W live beams and the W best finished hypotheses per row."""

    step: jax.Array  # [] tokens generated so far
    alive: jax.Array  # [B, W, max_new_tokens] live beams (pad_id from `step` on)
    alive_scores: jax.Array  # [B, W] their summed log-probabilities, best first
    finished: jax.Array  # [B, W, max_new_tokens] finished hypotheses (pad_id after their end)
    finished_scores: jax.Array  # [B, W] their length-normalised scores, best first; _NEG_INF: none yet
    finished_lengths: jax.Array  # [B, W] their lengths, EOS included
    logits: jax.Array  # [B * W, V] next-token logits of the live beams
    cache: DecoderCache  # B * W rows: row b * W + k holds beam k of row b


def beam_search(
    decode_step: DecodeStep,
    logits: jax.Array,
    cache,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float | jax.Array = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    select_rows: Callable = lambda cache, rows: cache.select_rows(rows),
) -> GenerateOutput:
    """Beam search over the same decode step: W live beams and W best finished hypotheses per row.

    logits [B, V] and cache (B rows) come from the prefill; `select_rows(cache, rows)` gathers
    cache rows. A hypothesis scores sum(log p) / length**length_penalty. Each step expands every
    live beam by every token, keeps the 2W best candidates, moves those ending in EOS (at the
    last step, all of them) to the finished set and continues the W best others. The loop stops
    once no live beam can beat the W-th best finished hypothesis, or after max_new_tokens.
    """
    batch, width, steps = logits.shape[0], num_beams, max_new_tokens
    cache = select_rows(cache, jnp.repeat(jnp.arange(batch), width))  # row b -> rows b*W .. b*W+W-1
    logits = jnp.repeat(logits, width, axis=0)  # [B * W, V]
    vocab = logits.shape[-1]
    rows = jnp.arange(batch)[:, None]

    def body(state):
        i = state.step
        log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(batch, width, vocab)
        candidates = (state.alive_scores[:, :, None] + log_probs).reshape(batch, width * vocab)
        scores, index = jax.lax.top_k(candidates, 2 * width)  # [B, 2W]: at most W of them end in EOS
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        sequences = state.alive[rows, parent].at[:, :, i].set(token)  # [B, 2W, steps]
        ends = jnp.full(token.shape, i + 1 == steps)  # at the length limit live beams finish too
        if eos_id is not None:
            ends |= token == eos_id

        normalised = scores / _length_penalty(i + 1, length_penalty)
        all_finished = jnp.concatenate([state.finished, sequences], axis=1)
        all_scores = jnp.concatenate([state.finished_scores, jnp.where(ends, normalised, _NEG_INF)], axis=1)
        all_lengths = jnp.concatenate([state.finished_lengths, jnp.full(token.shape, i + 1, jnp.int32)], axis=1)
        finished_scores, finished_keep = jax.lax.top_k(all_scores, width)

        alive_scores, alive_keep = jax.lax.top_k(jnp.where(ends, _NEG_INF, scores), width)  # [B, W]
        cache = select_rows(state.cache, (rows * width + parent[rows, alive_keep]).reshape(-1))
        logits, cache = decode_step(token[rows, alive_keep].reshape(-1), cache)
        return BeamState(
            step=i + 1,
            alive=sequences[rows, alive_keep],
            alive_scores=alive_scores,
            finished=all_finished[rows, finished_keep],
            finished_scores=finished_scores,
            finished_lengths=all_lengths[rows, finished_keep],
            logits=logits,
            cache=cache,
        )

    def cond(state):
        # Log-probabilities are <= 0, so a live beam's final score is at most its current sum divided by
        # the largest length**length_penalty over the lengths it can still reach, step + 1 .. steps
        # (monotonic in the length: at one end, whatever the sign of length_penalty).
        largest_penalty = jnp.maximum(
            _length_penalty(state.step + 1, length_penalty), _length_penalty(steps, length_penalty)
        )
        best_alive = state.alive_scores[:, 0] / largest_penalty
        return (state.step < steps) & jnp.any(best_alive > state.finished_scores[:, -1])

    first_beam_only = jnp.where(jnp.arange(width) == 0, 0.0, _NEG_INF)  # the W beams start identical
    state = jax.lax.while_loop(
        cond,
        body,
        BeamState(
            step=jnp.zeros((), jnp.int32),
            alive=jnp.full((batch, width, steps), pad_id, jnp.int32),
            alive_scores=jnp.broadcast_to(first_beam_only, (batch, width)),
            finished=jnp.full((batch, width, steps), pad_id, jnp.int32),
            finished_scores=jnp.full((batch, width), _NEG_INF),
            finished_lengths=jnp.zeros((batch, width), jnp.int32),
            logits=logits,
            cache=cache,
        ),
    )
    # Every row has a finished hypothesis: the loop ends early only when each row has W of them.
    return GenerateOutput(state.finished[:, 0], state.finished_lengths[:, 0], state.finished_scores[:, 0])


@functools.partial(
    jax.jit,
    static_argnames=(
        "model", "strategy", "max_new_tokens", "cache_length", "top_k", "use_top_p", "num_beams", "eos_id",
        "pad_id", "bos_id", "stream",
    ),
)
def _generate(
    model, variables, prompts, prompt_lengths, rng, temperature, top_p, length_penalty, stream_id, *,
    strategy, max_new_tokens, cache_length, top_k, use_top_p, num_beams, eos_id, pad_id, bos_id, stream,
) -> GenerateOutput:
    """The whole generation as one compiled program: prefill, then the strategy's loop."""
    model, variables = unscanned(model, variables)
    logits, cache = _prefill(model, variables, prompts, prompt_lengths, cache_length, bos_id)
    step = _decode_step(model, variables)
    if strategy == "beam":
        return beam_search(
            step, logits, cache, num_beams=num_beams, max_new_tokens=max_new_tokens,
            length_penalty=length_penalty, eos_id=eos_id, pad_id=pad_id,
        )
    on_tokens = (lambda token: jax.debug.callback(_emit, stream_id, token, ordered=True)) if stream else None
    return sample_loop(
        step, logits, cache, rng, max_new_tokens=max_new_tokens, greedy=strategy == "greedy",
        temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None, eos_id=eos_id, pad_id=pad_id,
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
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
    rng: jax.Array | None = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
) -> GenerateOutput:
    """Continues each prompt (decoder-only) or translates each source (encoder-decoder).

    prompts: token id lists of any lengths, or an array [B, T] (right-padded, with
        `prompt_lengths`, or all of length T). Each row's result equals generating it alone.
    strategy: "greedy" (argmax), "sample" (temperature, top_k, top_p; needs `rng`), or
        "beam" (num_beams, length_penalty: score = sum log p / length**length_penalty).
    eos_id: a row stops at this token (kept in the output; padded with pad_id after it);
        the loop ends when every row has stopped or after max_new_tokens.
    bos_id: the first decoder input of an encoder-decoder model.
    on_tokens: streaming (greedy and sample): called on the host with each step's new tokens
        [B] (pad_id for rows that have finished) while the compiled loop runs.
    Errors on bad arguments are raised before anything compiles.
    """
    config = model.config
    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise TypeError(f"generate needs a CausalLM or Seq2SeqLM, got {type(model).__name__}.")
    rows, lengths = _as_rows(prompts, prompt_lengths)
    _check_arguments(
        config, rows, lengths, max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
        top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, eos_id=eos_id, pad_id=pad_id,
        rng=rng, encoder_decoder=isinstance(model, Seq2SeqLM), bos_id=bos_id,
    )
    if isinstance(model, Seq2SeqLM):
        padded_length = bucket_length(max(lengths), config.max_length)
        cache_length = 1 + max_new_tokens
    else:
        padded_length = bucket_length(max(lengths), config.max_length - max_new_tokens)
        cache_length = padded_length + max_new_tokens
    padded = np.full((len(rows), padded_length), pad_id, np.int32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    prompts, lengths = jnp.asarray(padded), jnp.asarray(lengths, jnp.int32)
    if on_tokens is not None and strategy == "beam":
        raise ValueError("Streaming (on_tokens) needs strategy 'greedy' or 'sample': beams are reordered until the end.")
    stream_id = next(_NEXT_STREAM_ID) if on_tokens is not None else 0
    if on_tokens is not None:
        _LISTENERS[stream_id] = on_tokens
    try:
        output = _generate(
            model, variables, prompts, lengths,
            jax.random.PRNGKey(0) if rng is None else rng,
            jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p), jnp.float32(length_penalty),
            jnp.int32(stream_id),
            strategy=strategy, max_new_tokens=max_new_tokens, cache_length=cache_length, top_k=top_k,
            use_top_p=top_p is not None, num_beams=num_beams, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
            stream=on_tokens is not None,
        )
        if on_tokens is not None:
            jax.block_until_ready(output)
            jax.effects_barrier()
        return output
    finally:
        _LISTENERS.pop(stream_id, None)


def _as_rows(prompts, prompt_lengths) -> tuple[list[np.ndarray], list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise ValueError(f"Prompts must be token id lists or an array [batch, length], got shape {prompts.shape}.")
        lengths = [prompts.shape[1]] * len(prompts) if prompt_lengths is None else [int(n) for n in prompt_lengths]
        if len(lengths) != len(prompts) or any(n > prompts.shape[1] for n in lengths):
            raise ValueError("prompt_lengths must give one length per row, none longer than the array.")
        return [row[:n] for row, n in zip(prompts, lengths)], lengths
    rows = [np.asarray(row, np.int64).reshape(-1) for row in prompts]
    return rows, [len(row) for row in rows]


def _check_arguments(
    config, rows, lengths, *, max_new_tokens, strategy, temperature, top_k, top_p, num_beams, length_penalty, eos_id,
    pad_id, rng, encoder_decoder, bos_id,
):
    if not rows:
        raise ValueError("No prompts given.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if min(lengths) == 0:
        raise ValueError(f"Prompt {lengths.index(0)} is empty; every prompt needs at least one token.")
    longest = max(lengths)
    if encoder_decoder:
        if longest > config.max_length:
            raise ValueError(f"A source of {longest} tokens exceeds the model's context of {config.max_length}.")
        if max_new_tokens > config.max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's context of {config.max_length}.")
        if bos_id is None:
            raise ValueError("An encoder-decoder model needs bos_id, the first decoder input.")
    elif longest + max_new_tokens > config.max_length:
        raise ValueError(
            f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{config.max_length} tokens; shorten the prompt or generate fewer tokens."
        )
    for i, row in enumerate(rows):
        if len(row) and (row.min() < 0 or row.max() >= config.vocab_size):
            raise ValueError(f"Prompt {i} has token ids outside the vocabulary [0, {config.vocab_size}).")
    for name, token in (("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id)):
        if token is not None and not 0 <= token < config.vocab_size:
            raise ValueError(f"{name}={token} is outside the vocabulary [0, {config.vocab_size}).")
    if strategy == "sample":
        if rng is None:
            raise ValueError("Sampling needs a random key: pass rng=jax.random.PRNGKey(seed).")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use strategy='greedy'.")
        if top_k is not None and not 1 <= top_k <= config.vocab_size:
            raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if strategy == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    if strategy == "beam" and not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}.")
