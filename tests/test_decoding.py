"""Generation: one compiled loop, every strategy checked against an independent computation."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm

RNG = jax.random.PRNGKey(0)


@functools.cache
def decoder():
    cfg = tfm.ModelConfig.preset("llama-tiny", max_length=64)
    model = tfm.CausalLM(cfg)
    return model, jax.jit(model.init)(RNG, jnp.ones((1, 4), jnp.int32))


@functools.cache
def seq2seq():
    cfg = tfm.ModelConfig.preset("t5-tiny", dropout_rate=0.0, max_length=64)
    model = tfm.Seq2SeqLM(cfg)
    return model, jax.jit(model.init)(RNG, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
forward = jax.jit(lambda model, variables, tokens: model.apply(variables, tokens), static_argnums=0)


def next_logits(model, variables, sequence, width=32):
    """[V] logits after `sequence` from a full forward pass, the prefix padded to one width (one
    compiled program for every prefix: the decoder is causal, so what follows it is unread)."""
    return forward(model, variables, jnp.array([sequence + [0] * (width - len(sequence))]))[0, len(sequence) - 1]


def stepwise_argmax(model, variables, prompt, steps):
    """Greedy decoding the slow way: a full forward pass over the whole prefix for every token."""
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(jnp.argmax(next_logits(model, variables, sequence))))
    return sequence[len(prompt) :]


def test_greedy_equals_stepwise_argmax_of_full_forward_passes():
    """Each row of a ragged batch equals greedy decoding of that prompt alone, without a cache."""
    model, variables = decoder()
    out = tfm.generate(model, variables, PROMPTS, max_new_tokens=8)
    for row, prompt in enumerate(PROMPTS):
        assert out.tokens[row].tolist() == stepwise_argmax(model, variables, prompt, 8)
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])


def test_seq2seq_greedy_equals_stepwise_argmax():
    """Encoder-decoder: cached decoding (encoder once, cross K/V cached) equals full decode passes."""
    model, variables = seq2seq()
    out = tfm.generate(model, variables, PROMPTS, max_new_tokens=6, bos_id=2)
    decode = jax.jit(lambda s, t: model.apply(variables, s, t))
    for row, source in enumerate(PROMPTS):
        target = [2]
        for _ in range(6):  # one target length (the decoder is causal: what follows a position is unread)
            logits = decode(jnp.array([source]), jnp.array([target + [0] * (7 - len(target))]))
            target.append(int(jnp.argmax(logits[0, len(target) - 1])))
        assert out.tokens[row].tolist() == target[1:]


def test_seq2seq_generates_up_to_its_whole_context():
    """max_new_tokens = max_length: BOS and the first max_length - 1 tokens fill the decoder's
    context, and the last token is the argmax of a full pass over them; beam search's best
    hypothesis scores its log-probability under a full pass, over its length (penalty 1)."""
    cfg = tfm.ModelConfig.preset("t5-tiny", dropout_rate=0.0, max_length=8)
    model = tfm.Seq2SeqLM(cfg)
    source = jnp.array([[5, 6, 7]])
    variables = jax.jit(model.init)(RNG, source, source)
    out = tfm.generate(model, variables, source, max_new_tokens=8, bos_id=2)
    assert out.tokens.shape == (1, 8)
    target = jnp.concatenate([jnp.array([[2]]), out.tokens[:, :7]], axis=1)
    assert int(out.tokens[0, 7]) == int(jnp.argmax(model.apply(variables, source, target)[0, -1]))
    beams = tfm.generate(model, variables, source, max_new_tokens=8, bos_id=2, strategy="beam", num_beams=2)
    assert beams.tokens.shape == (1, 8)
    target = jnp.concatenate([jnp.array([[2]]), beams.tokens[:, :7]], axis=1)
    log_p = jax.nn.log_softmax(model.apply(variables, source, target)[0], axis=-1)  # [8, V]
    expected = float(jnp.sum(log_p[jnp.arange(8), beams.tokens[0]])) / 8
    np.testing.assert_allclose(float(beams.scores[0]), expected, rtol=1e-5)


def test_each_row_of_a_batch_equals_the_prompt_alone():
    model, variables = decoder()
    together = tfm.generate(model, variables, PROMPTS, max_new_tokens=5, strategy="beam", num_beams=3)
    for row, prompt in enumerate(PROMPTS):
        alone = tfm.generate(model, variables, [prompt], max_new_tokens=5, strategy="beam", num_beams=3)
        np.testing.assert_array_equal(together.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(together.scores[row], alone.scores[0], rtol=1e-5)


def test_top_k_1_sampling_equals_greedy():
    model, variables = decoder()
    greedy = tfm.generate(model, variables, PROMPTS, max_new_tokens=6)
    sampled = tfm.generate(model, variables, PROMPTS, max_new_tokens=6, strategy="sample", top_k=1, rng=RNG)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_gnmt_length_penalty_reaches_the_beam_search_of_generate():
    """Each row's beam score is its log-probability under full forward passes over GNMT's
    ((5 + 5) / 6)**0.6 (5 tokens, no EOS), not 5**0.6."""
    model, variables = decoder()
    out = tfm.generate(
        model, variables, PROMPTS, max_new_tokens=5, strategy="beam", num_beams=3, length_penalty=0.6,
        length_penalty_form="gnmt",
    )
    for row, prompt in enumerate(PROMPTS):
        sequence = prompt + out.tokens[row].tolist()
        log_p = sum(
            float(jax.nn.log_softmax(next_logits(model, variables, sequence[:n]))[sequence[n]])
            for n in range(len(prompt), len(sequence))
        )
        np.testing.assert_allclose(out.scores[row], log_p / (10 / 6) ** 0.6, rtol=1e-5)


def test_one_beam_equals_greedy():
    model, variables = decoder()
    greedy = tfm.generate(model, variables, PROMPTS, max_new_tokens=6)
    beam = tfm.generate(model, variables, PROMPTS, max_new_tokens=6, strategy="beam", num_beams=1, length_penalty=0.0)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


def test_a_rows_sample_is_fixed_by_the_rng_and_its_place_in_the_batch():
    """What generate promises of sampling: the same rng gives the same tokens, call after call; a
    row's tokens depend on the rng and its place, not on the other rows (row 1 changed, rows 0 and 2
    keep theirs), so the same prompt in two places draws two samples; another rng, other tokens."""
    model, variables = decoder()
    sample = functools.partial(tfm.generate, model, variables, max_new_tokens=8, strategy="sample")
    tokens = np.asarray(sample(PROMPTS, rng=RNG).tokens)
    np.testing.assert_array_equal(sample(PROMPTS, rng=RNG).tokens, tokens)
    twice = np.asarray(sample([PROMPTS[0], PROMPTS[0], PROMPTS[2]], rng=RNG).tokens)
    np.testing.assert_array_equal(twice[[0, 2]], tokens[[0, 2]])
    assert (twice[0] != twice[1]).any()
    assert (np.asarray(sample(PROMPTS, rng=jax.random.PRNGKey(1)).tokens) != tokens).any(axis=1).all()


@pytest.mark.parametrize("several", [False, True])
def test_eos_stops_a_row_and_pads_the_rest(several):
    """A row stops at EOS (kept), or at the first of several EOS ids, is padded after it, and the
    others go on."""
    model, variables = decoder()
    free = tfm.generate(model, variables, PROMPTS, max_new_tokens=8)
    eos = [int(free.tokens[1, 2])]  # make the 3rd token of row 1 the end-of-sequence token
    if several:
        eos = [int(t) for t in free.tokens[0, 4:6] if t not in eos] + eos  # and row 0's 5th or 6th
    out = tfm.generate(model, variables, PROMPTS, max_new_tokens=8, eos_id=eos if several else eos[0], pad_id=0)
    first_eos = [int(np.argmax(np.isin(row, eos))) if np.isin(row, eos).any() else 8 for row in np.asarray(free.tokens)]
    assert not several or first_eos[0] < 6
    for row in range(len(PROMPTS)):
        length = min(first_eos[row] + 1, 8)
        assert int(out.lengths[row]) == length
        np.testing.assert_array_equal(out.tokens[row, :length], free.tokens[row, :length])
        assert (np.asarray(out.tokens[row, length:]) == 0).all()


# A Markov "model" with exactly known next-token distributions: the decode step looks up the
# log-probabilities of the token after the previous one. Token 0 starts every sequence.
#   start -> A (0.6) or B (0.4);  A -> any of 5 tokens (0.2 each);  B -> C (0.9) or EOS (0.1);
#   C and the 5 tokens -> EOS (0.95) or C (0.05)
A, B, C, EOS = 1, 2, 3, 9
VOCAB = 10


def markov_table():
    probs = np.full((VOCAB, VOCAB), 1e-6)
    probs[0, [A, B]] = [0.6, 0.4]
    probs[A, 4:9] = 0.2
    probs[B, [C, EOS]] = [0.9, 0.1]
    probs[C, [EOS, C]] = [0.95, 0.05]
    probs[4:9, EOS] = 0.95
    probs[4:9, C] = 0.05
    probs[EOS, EOS] = 1.0
    return jnp.log(probs / probs.sum(-1, keepdims=True))


def markov_step(token, cache):
    """token [B] -> (log-probabilities of the next token [B, V], cache = last tokens [B])."""
    return markov_table()[token], token


def take_rows(cache, rows):
    return cache[rows]


def test_beam_search_beats_myopic_greedy_on_a_known_model():
    """Greedy takes A (0.6) and then at best 0.2; beam search finds B C (0.4 * 0.9 = 0.36)."""
    start = jnp.zeros((1,), jnp.int32)
    logits, cache = markov_step(start, start)
    greedy = tfm.sample_loop(markov_step, logits, cache, RNG, max_new_tokens=3, greedy=True, eos_id=EOS)
    beam = tfm.beam_search(
        markov_step, logits, cache, num_beams=2, max_new_tokens=3, length_penalty=0.0, eos_id=EOS,
        select_rows=take_rows,
    )
    assert greedy.tokens[0, :2].tolist() == [A, 4]
    assert beam.tokens[0].tolist() == [B, C, EOS]
    np.testing.assert_allclose(beam.scores[0], np.log(0.4 * 0.9 * 0.95), rtol=1e-4)
    assert beam.scores[0] > greedy.scores[0]


# Batches of Markov chains over a tiny vocabulary: row b's next token depends only on the last
# one through its table chains[b] [V, V] of log-probabilities; token 0 starts every row.
CHAIN_EOS = 3


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_beams", "max_new_tokens", "eos_id", "no_repeat_ngram_size", "early_stopping", "length_penalty_form"
    ),
)
def chain_beam_search(
    chains, length_penalty, *, num_beams, max_new_tokens, eos_id=CHAIN_EOS, no_repeat_ngram_size=0,
    early_stopping="never", length_penalty_form="power",
):
    """Beam search on chains [B, V, V]; the cache is each row's chain index [B]."""

    def step(token, chain):
        return chains[chain, token], chain

    chain = jnp.arange(chains.shape[0])
    logits, cache = step(jnp.zeros_like(chain), chain)
    return tfm.beam_search(
        step, logits, cache, num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        length_penalty_form=length_penalty_form, early_stopping=early_stopping, eos_id=eos_id, select_rows=take_rows,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )


def hypotheses(vocab, max_new_tokens, eos=(CHAIN_EOS,)):
    """Every finished hypothesis: a sequence ending at its first EOS, or one of max_new_tokens tokens."""
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if not set(eos) & set(tokens[:-1]) and (tokens[-1] in eos or length == max_new_tokens):
                yield tokens


def penalty(length, alpha, form="power"):
    """What a beam hypothesis's sum(log p) is divided by: length**alpha, or GNMT's ((5 + length) / 6)**alpha."""
    return (length if form == "power" else (5 + length) / 6) ** alpha


def hypothesis_score(chain, tokens, length_penalty, form="power"):
    """sum(log p) / penalty(length) of tokens following chain [V, V] from token 0, in float64."""
    chain = np.asarray(chain, np.float64)
    return sum(chain[a, b] for a, b in zip((0,) + tokens, tokens)) / penalty(len(tokens), length_penalty, form)


def assert_brute_force_best(out, chains, max_new_tokens, length_penalty, eos=(CHAIN_EOS,), form="power"):
    """Each row's output is a finished hypothesis (padded with 0) that scores as high as the best of all.

    Scores are compared, not tokens: in a Markov chain, reorderings of a path can tie exactly."""
    for row, chain in enumerate(chains):
        length = int(out.lengths[row])
        tokens = tuple(out.tokens[row, :length].tolist())
        every = list(hypotheses(len(chain), max_new_tokens, eos))
        assert tokens in set(every), f"row {row}: {tokens}"
        assert not out.tokens[row, length:].any()
        best = max(hypothesis_score(chain, other, length_penalty, form) for other in every)
        np.testing.assert_allclose(out.scores[row], best, rtol=1e-5, err_msg=f"row {row}")
        np.testing.assert_allclose(hypothesis_score(chain, tokens, length_penalty, form), best, rtol=1e-5)


def two_step_chain(first, after_a):
    """A chain [1, 4, 4] with the given next-token probabilities after the start and after A = 1."""
    probs = np.full((4, 4), 0.25)
    probs[0], probs[1] = first, after_a
    return jnp.log(jnp.asarray(probs[None], jnp.float32) + 1e-9)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_live_beam_at_the_length_limit_competes_with_finished_ones(length_penalty):
    """start -> EOS (0.4) or A (0.6), A -> A (0.99): A A A, cut by the length limit, beats EOS alone."""
    chains = two_step_chain(first=[0.0, 0.6, 0.0, 0.4], after_a=[0.0, 0.99, 0.0, 0.01])
    out = chain_beam_search(chains, length_penalty, num_beams=2, max_new_tokens=3)
    assert out.tokens[0].tolist() == [1, 1, 1]
    assert_brute_force_best(out, chains, 3, length_penalty)


def test_a_live_beam_survives_when_several_eos_ids_lead():
    """EOS ids 2 and 3 are the two likeliest first tokens: one beam keeps the third, A (0.31), whose
    A A A cut at the limit wins under length penalty 2 (the 2W best candidates were both EOS)."""
    chains = two_step_chain(first=[0.0, 0.31, 0.34, 0.35], after_a=[0.0, 0.99, 0.005, 0.005])
    out = chain_beam_search(chains, 2.0, num_beams=1, max_new_tokens=3, eos_id=(2, 3))
    assert out.tokens[0].tolist() == [1, 1, 1]
    assert_brute_force_best(out, chains, 3, 2.0, eos=(2, 3))


def test_a_negative_length_penalty_does_not_stop_too_early():
    """Penalty -1 (score = sum log p * length): after EOS (0.3) the live A (0.6) can still end
    at length 2 with 2 log(0.6 * 0.99) > log 0.3; a bound taken at length 3 would give up on it."""
    chains = two_step_chain(first=[0.1, 0.6, 0.0, 0.3], after_a=[0.0, 0.01, 0.0, 0.99])
    out = chain_beam_search(chains, -1.0, num_beams=1, max_new_tokens=3)
    assert out.tokens[0].tolist() == [1, CHAIN_EOS, 0]
    assert_brute_force_best(out, chains, 3, -1.0)


def test_gnmt_length_penalty_scores_and_stops_by_its_own_form():
    """GNMT's penalty ((5 + length) / 6)**-1 (score = sum log p * (5 + length) / 6): after EOS (0.4,
    score log 0.4 = -0.92) the live A (0.5) can still end at length 2 with log(0.5 * 0.99) * 7/6 =
    -0.82, and wins. The power form would score it 2 log(0.5 * 0.99) = -1.41 and stop at EOS: its
    bound for A, over the largest of 2**-1 and 3**-1, is 2 log 0.5 = -1.39 (GNMT's, log 0.5 * 7/6)."""
    chains = two_step_chain(first=[0.1, 0.5, 0.0, 0.4], after_a=[0.0, 0.01, 0.0, 0.99])
    out = chain_beam_search(chains, -1.0, num_beams=1, max_new_tokens=3, length_penalty_form="gnmt")
    assert out.tokens[0].tolist() == [1, CHAIN_EOS, 0]
    np.testing.assert_allclose(out.scores[0], np.log(0.5 * 0.99) * 7 / 6, rtol=1e-5)
    assert_brute_force_best(out, chains, 3, -1.0, form="gnmt")


@pytest.mark.parametrize(
    "length_penalty, form", [(0.0, "power"), (0.6, "power"), (1.0, "power"), (-0.5, "power"), (0.6, "gnmt"),
                             (-0.5, "gnmt")]
)
def test_exhaustive_beam_search_finds_the_brute_force_best(length_penalty, form):
    """With (V - 1)**(max_new_tokens - 1) beams every live prefix stays in the beam, so beam search
    must return the best of all hypotheses (those ending in EOS and those cut at the limit)."""
    vocab, max_new_tokens = 4, 4
    chains = jax.nn.log_softmax(2.0 * jax.random.normal(RNG, (16, vocab, vocab)), axis=-1)
    out = chain_beam_search(
        chains, length_penalty, num_beams=(vocab - 1) ** (max_new_tokens - 1), max_new_tokens=max_new_tokens,
        length_penalty_form=form,
    )
    assert_brute_force_best(out, chains, max_new_tokens, length_penalty, form=form)
    assert {1, max_new_tokens} < set(out.lengths.tolist())  # short and cut hypotheses both win somewhere


def reference_beam_search(chain, num_beams, max_new_tokens, length_penalty, early_stopping):
    """The best hypothesis of a plain beam search on one chain [V, V] from token 0, in float64.

    Each step keeps the 2W best extensions of the live beams, finishes those ending in EOS (all
    of them at the last step; the W best finished are kept) and continues the W best others.
    Once W have finished, it stops (transformers' BeamHypotheses.is_done): True, at once; False,
    when the best live sum over the current length**length_penalty cannot beat the W-th; "never",
    when it cannot over the length that favours it most (the limit if length_penalty > 0).
    """
    chain = np.asarray(chain, np.float64)
    live, finished = [((), 0.0)], []  # (tokens, sum of log p) best first; (score, tokens) best first
    for length in range(1, max_new_tokens + 1):
        extensions = [(t + (k,), s + chain[t[-1] if t else 0, k]) for t, s in live for k in range(len(chain))]
        extensions = sorted(extensions, key=lambda e: -e[1])[: 2 * num_beams]
        last = length == max_new_tokens
        ends = [(s / length**length_penalty, t) for t, s in extensions if t[-1] == CHAIN_EOS or last]
        finished = sorted(finished + ends, reverse=True)[:num_beams]
        live = [(t, s) for t, s in extensions if t[-1] != CHAIN_EOS][:num_beams]
        if len(finished) == num_beams:
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
            if early_stopping is True or live[0][1] / best_length**length_penalty <= finished[-1][0]:
                break
    return finished[0][1]


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_stops_as_a_plain_reference_by_early_stopping(early_stopping):
    """Each row equals a plain beam search with the same stop rule, though a row that stops takes
    no more finished hypotheses while others go on. Two rows tell the modes apart (one beam, length
    penalty 1: the mean log p): start -> EOS or A, A -> A (0.99), A A A cut at the limit.

    - EOS 0.4, A 0.6: True stops at EOS; False and "never" go on, as A's log 0.6 beats log 0.4.
    - EOS 0.6, A 0.3: True and False stop at EOS, as log 0.3 < log 0.6; "never" sees that A can
      still reach (log 0.3 + 2 log 0.99) / 3 > log 0.6 at the limit, and goes on to A A A.
    """
    chains = jnp.concatenate([
        two_step_chain(first=[0.0, 0.6, 0.0, 0.4], after_a=[0.0, 0.99, 0.0, 0.01]),
        two_step_chain(first=[0.05, 0.3, 0.05, 0.6], after_a=[0.0, 0.99, 0.0, 0.01]),
        jax.nn.log_softmax(2.0 * jax.random.normal(RNG, (14, 4, 4)), axis=-1),
    ])
    out = chain_beam_search(chains, 1.0, num_beams=1, max_new_tokens=3, early_stopping=early_stopping)
    stop, a_a_a = [CHAIN_EOS, 0, 0], [1, 1, 1]
    expected = {True: [stop, stop], False: [a_a_a, stop], "never": [a_a_a, a_a_a]}[early_stopping]
    assert out.tokens[:2].tolist() == expected
    for row, chain in enumerate(chains):
        tokens = tuple(out.tokens[row, : int(out.lengths[row])].tolist())
        assert tokens == reference_beam_search(chain, 1, 3, 1.0, early_stopping), f"row {row}"


def repeated_ngram_bans(history, length, n, vocab):
    """The tokens each row may not take next: those completing an n-gram already in its first
    `length` tokens (plain Python)."""
    bans = np.zeros((len(history), vocab), bool)
    for row, tokens in enumerate(np.asarray(history)[:, :length].tolist()):
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n - 1] == tokens[len(tokens) - n + 1 :]:
                bans[row, tokens[i + n - 1]] = True
    return bans


def has_repeated_ngram(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ban_repeated_ngrams_bans_exactly_the_tokens_that_repeat_an_ngram(n):
    history = jax.random.randint(RNG, (64, 10), 0, 4)  # 4 tokens: many repeats
    logits = jax.random.normal(RNG, (64, 4))
    for length in (0, 1, n, 6, 10):
        out = np.asarray(tfm.ban_repeated_ngrams(logits, history, length, n))
        bans = repeated_ngram_bans(history, length, n, 4)
        assert bans.any() or length < n
        np.testing.assert_array_equal(out < -1e29, bans)
        np.testing.assert_array_equal(out[~bans], np.asarray(logits)[~bans])


def test_greedy_without_repeated_ngrams_equals_the_stepwise_argmax_over_allowed_tokens():
    """The compiled loop takes, at every step, the most likely token that does not repeat a
    trigram of what it generated (checked against full forward passes); the plain greedy
    continuation of this model does repeat one."""
    model, variables = decoder()
    prompt, steps, n = [5, 6, 7], 24, 3
    assert has_repeated_ngram(stepwise_argmax(model, variables, prompt, steps), n)
    sequence = list(prompt)
    for step in range(steps):
        logits = np.array(next_logits(model, variables, sequence))
        generated = np.array([sequence[len(prompt) :] + [0]])
        logits[repeated_ngram_bans(generated, step, n, len(logits))[0]] = -np.inf
        sequence.append(int(np.argmax(logits)))
    out = tfm.generate(model, variables, [prompt], max_new_tokens=steps, no_repeat_ngram_size=n)
    assert out.tokens[0].tolist() == sequence[len(prompt) :]
    assert not has_repeated_ngram(sequence[len(prompt) :], n)


@pytest.mark.parametrize("options", [dict(strategy="beam", num_beams=3), dict(strategy="sample", temperature=0.05)])
def test_beam_search_and_sampling_repeat_no_ngram_when_asked(options):
    """generate passes the option to every strategy: with it no row repeats a bigram; without
    it, these (peaked) searches on this model do."""
    model, variables = decoder()
    prompts, rng = [[5, 6, 7], [20]], jax.random.PRNGKey(1)
    plain = tfm.generate(model, variables, prompts, max_new_tokens=24, rng=rng, **options)
    assert any(has_repeated_ngram(row.tolist(), 2) for row in plain.tokens)
    banned = tfm.generate(model, variables, prompts, max_new_tokens=24, rng=rng, no_repeat_ngram_size=2, **options)
    assert not any(has_repeated_ngram(row[:n].tolist(), 2) for row, n in zip(banned.tokens, banned.lengths))


@pytest.mark.parametrize("n", [1, 2])
def test_exhaustive_beam_search_without_repeated_ngrams_finds_the_brute_force_best(n):
    """With every live prefix kept, beam search returns the best hypothesis among those that
    repeat no n-gram."""
    vocab, max_new_tokens = 4, 4
    chains = jax.nn.log_softmax(2.0 * jax.random.normal(RNG, (16, vocab, vocab)), axis=-1)
    out = chain_beam_search(
        chains, 1.0, num_beams=(vocab - 1) ** (max_new_tokens - 1), max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=n,
    )
    for row, chain in enumerate(chains):
        tokens = tuple(out.tokens[row, : int(out.lengths[row])].tolist())
        allowed = [h for h in hypotheses(vocab, max_new_tokens) if not has_repeated_ngram(h, n)]
        assert tokens in allowed
        best = max(hypothesis_score(chain, h, 1.0) for h in allowed)
        np.testing.assert_allclose(out.scores[row], best, rtol=1e-5, err_msg=f"row {row}")
    unbanned = chain_beam_search(chains, 1.0, num_beams=27, max_new_tokens=max_new_tokens)
    assert not np.array_equal(out.tokens, unbanned.tokens)  # the ban changed some answers


def test_sampling_follows_the_known_distribution():
    """From the start state, sampled first tokens are A about 60% and B about 40% of the time."""
    start = jnp.zeros((4000,), jnp.int32)
    logits, cache = markov_step(start, start)
    out = tfm.sample_loop(markov_step, logits, cache, RNG, max_new_tokens=1, greedy=False)
    share_of_a = float(jnp.mean(out.tokens[:, 0] == A))
    assert abs(share_of_a - 0.6) < 0.03  # 4000 draws: standard deviation 0.008
    assert set(np.unique(out.tokens).tolist()) <= {A, B}


def test_top_k_never_emits_outside_the_top_k():
    logits = jax.random.normal(RNG, (64, 50))
    allowed = jax.lax.top_k(logits, 5)[1]
    for seed in range(5):
        tokens = tfm.sample_logits(logits, jax.random.PRNGKey(seed), top_k=5, temperature=3.0)
        assert jnp.all(jnp.any(tokens[:, None] == allowed, axis=-1))


def test_top_p_never_emits_outside_the_nucleus():
    probs = jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = jnp.log(probs).repeat(2000, axis=0)
    tokens = tfm.sample_logits(logits, RNG, top_p=0.75)
    assert set(np.unique(tokens).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.1 is outside
    filtered = tfm.top_p_filter(jnp.log(probs), 0.85)
    assert jnp.isfinite(filtered).tolist() == [[True, True, True, False, False]]
    assert jnp.isfinite(tfm.top_p_filter(jnp.log(probs), 0.01)).sum() == 1  # the top token always stays
    # p = 1 keeps all: GPT-2's 50257 tokens at a sharp temperature, whose tail the float32 sum of
    # the others reaches 1.0 before (43,904 were kept)
    sharp = 4.0 * jax.random.normal(RNG, (50257,))
    assert bool(jnp.isfinite(tfm.top_p_filter(sharp, 1.0)).all())


def sampling_distribution(logits, top_k, temperature=1.0, top_p=1.0, top_k_uniform=False):
    """The distribution sampling draws from, in float64 and in transformers' order: softmax of
    logits / temperature over its top_k largest (with top_k_uniform, the same for each), then over
    the nucleus, the fewest most likely of those whose probability reaches top_p."""
    z = np.asarray(logits, np.float64) / temperature
    z[np.argsort(-z)[top_k:]] = -np.inf
    if top_k_uniform:
        z[np.isfinite(z)] = 0.0
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # the probability of the more likely tokens
    probs[order[before >= top_p]] = 0.0
    return probs / probs.sum()


FIRST_LOGITS = [3.0, 2.0, 1.0, 0.5, -0.5, -1.0]  # of ids 0..5 after PROMPTS[0], by designed_decoder()


def designed_decoder():
    """decoder() whose logits of ids 0..5 after PROMPTS[0] are FIRST_LOGITS: their columns of the
    output projection are the column of its largest logit, scaled to those values (logits are
    linear in the columns)."""
    model, variables = decoder()
    logits = forward(model, variables, jnp.array([PROMPTS[0]]))[0, -1]  # [V]
    largest = int(jnp.argmax(jnp.abs(logits)))
    boxed = variables["params"]["lm_head"]["kernel"]  # [D, V], with its logical axes
    unit = boxed.value[:, largest] / logits[largest]  # [D]: the last hidden state . unit = 1
    kernel = boxed.value.at[:, : len(FIRST_LOGITS)].set(unit[:, None] * jnp.array(FIRST_LOGITS))
    return model, {"params": {**variables["params"], "lm_head": {"kernel": boxed.replace_boxed(kernel)}}}


def test_sampled_tokens_follow_the_temperature_then_top_k_then_top_p():
    """1000 rows of one prompt draw 1000 independent first tokens, whose counts match the
    distribution computed by hand (a chi-square bound; exactly its support appears), from the
    logits of a full forward pass: [3, 2, 1, 0.5, -0.5, -1] (ids past 5 never generated), top_k=4.

    - temperature 3, top_p 0.75: the top 4 of logits / 3 have probabilities [.38, .27, .19, .16],
      a nucleus of 3 tokens (.64 < .75 <= .84). Filtering before the temperature, or ignoring it,
      keeps 2 (the nucleus of the logits' top 4 [.63, .23, .09, .05], or of all 6 [.61, .23, ...]);
      top-p before top-k keeps 4 (the nucleus of all 6 logits / 3 [.31, .22, .16, .13, .10, .08]).
    - temperature 0.7, top_p 1: [.75, .18, .04, .02], against [.63, .23, .09, .05] at temperature 1.
    - top_k_uniform: 1/4 each of the top 4, whatever their logits.
    """
    model, variables = designed_decoder()
    logits = np.asarray(forward(model, variables, jnp.array([PROMPTS[0]]))[0, -1, : len(FIRST_LOGITS)])
    np.testing.assert_allclose(logits, FIRST_LOGITS, atol=1e-4)
    rows = 1000
    config = tfm.GenerationConfig(max_new_tokens=1, strategy="sample", top_k=4, vocab_size=len(FIRST_LOGITS))
    for seed, options in enumerate(
        [dict(temperature=3.0, top_p=0.75), dict(temperature=0.7, top_p=1.0), dict(top_k_uniform=True)]
    ):
        expected = sampling_distribution(logits, 4, **options)
        out = tfm.generate(model, variables, [PROMPTS[0]] * rows, config, rng=jax.random.PRNGKey(seed), **options)
        counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=len(FIRST_LOGITS))
        support = expected > 0
        assert (counts > 0).tolist() == support.tolist(), (options, counts)
        chi_square = np.sum((counts[support] - rows * expected[support]) ** 2 / (rows * expected[support]))
        assert chi_square < 25, (options, counts, rows * expected)  # P < 2e-5 by chance (<= 3 degrees)


def test_uniform_top_k_leaves_out_eliminated_tokens():
    """Where the top k hold eliminated tokens (an id past vocab_size at -inf, a banned n-gram's), the
    uniform pick is among the others: here ids 0, 2 and 4 of the top 4 (id 3 banned), 1/3 each."""
    logits = tfm.ban_repeated_ngrams(jnp.array([[2.0, -jnp.inf, 1.0, 5.0, -3.0]]), jnp.array([[3]]), 1, 1)
    tokens = tfm.sample_logits(logits.repeat(3000, axis=0), RNG, top_k=4, top_k_uniform=True)
    counts = np.bincount(np.asarray(tokens), minlength=5)
    assert counts[[1, 3]].tolist() == [0, 0]
    np.testing.assert_allclose(counts[[0, 2, 4]] / 3000, 1 / 3, atol=0.04)  # standard deviation 0.009


def test_a_new_prompt_length_in_the_same_bucket_does_not_recompile():
    model, variables = decoder()
    tfm.generate(model, variables, [[1, 2, 3]], max_new_tokens=4)
    compiled = tfm.decoding._generate._cache_size()
    tfm.generate(model, variables, [[4, 5, 6, 7, 8, 9]], max_new_tokens=4)
    assert tfm.decoding._generate._cache_size() == compiled


def test_changing_traced_options_does_not_recompile():
    """temperature, top_p and length_penalty are traced; a static option given at its default
    (top_k_uniform, length_penalty_form) compiles nothing new."""
    model, variables = decoder()
    sample = tfm.GenerationConfig(max_new_tokens=4, strategy="sample", top_p=0.9)
    tfm.generate(model, variables, [[1, 2, 3]], sample, rng=RNG)
    tfm.generate(model, variables, [[1, 2, 3]], max_new_tokens=4, strategy="beam", num_beams=2)
    tfm.generate(model, variables, [[1, 2, 3]], max_new_tokens=4)
    compiled = tfm.decoding._generate._cache_size()
    tfm.generate(model, variables, [[1, 2, 3]], sample, rng=RNG, temperature=0.5, top_p=0.7)
    tfm.generate(model, variables, [[1, 2, 3]], max_new_tokens=4, strategy="beam", num_beams=2, length_penalty=0.3)
    tfm.generate(model, variables, [[1, 2, 3]], sample, rng=RNG, top_k_uniform=False)
    beam = dict(max_new_tokens=4, strategy="beam", num_beams=2)
    tfm.generate(model, variables, [[1, 2, 3]], **beam, length_penalty_form="power")
    assert tfm.decoding._generate._cache_size() == compiled


def test_a_config_and_options_by_name_generate_the_same():
    model, variables = decoder()
    config = tfm.GenerationConfig(
        max_new_tokens=5, strategy="beam", num_beams=3, length_penalty=0.6, early_stopping="never"  # the default
    )
    by_name = tfm.generate(model, variables, PROMPTS, max_new_tokens=5, strategy="beam", num_beams=3, length_penalty=0.6)
    for out in (tfm.generate(model, variables, PROMPTS, config),
                tfm.generate(model, variables, PROMPTS, tfm.GenerationConfig(max_new_tokens=9), **vars(config))):
        np.testing.assert_array_equal(out.tokens, by_name.tokens)
        np.testing.assert_array_equal(out.scores, by_name.scores)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(strategy="nucleus"), "Unknown strategy 'nucleus'; use one of greedy, sample, beam"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(strategy="sample", temperature=-1.0), "temperature must be a finite number > 0 when sampling"),
        (dict(strategy="sample", temperature=float("inf")), "temperature must be a finite number > 0 .*got inf"),
        (dict(strategy="sample", temperature=float("nan")), "temperature must be a finite number > 0 .*got nan"),
        (dict(strategy="sample", top_k=0), "top_k must be >= 1, got 0"),
        (dict(strategy="sample", top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(strategy="beam", num_beams=0), "num_beams must be >= 1"),
        (dict(strategy="beam", length_penalty=float("inf")), "length_penalty must be a finite number"),
        # an option of another strategy would be ignored: it is an error naming the strategy it needs,
        # given at its default too
        (dict(temperature=3.0), "temperature=3.0 applies to strategy='sample' only, and this strategy is 'greedy'"),
        (dict(temperature=1.0), "temperature=1.0 applies to strategy='sample' only"),
        (dict(strategy="greedy", num_beams=4), "num_beams=4 applies to strategy='beam' only"),
        (dict(strategy="sample", length_penalty=1.0), "length_penalty=1.0 applies to strategy='beam' only"),
        (dict(early_stopping="never"), "early_stopping='never' applies to strategy='beam' only"),
        (dict(strategy="beam", early_stopping="always"), "early_stopping must be True, False or 'never', got 'always'"),
        (dict(strategy="beam", early_stopping=1), "early_stopping must be True, False or 'never', got 1"),
        (dict(strategy="greedy", top_k=40), "top_k=40 applies to strategy='sample' only"),
        (dict(strategy="beam", top_p=0.9), "top_p=0.9 applies to strategy='sample' only, and this strategy is 'beam'"),
        (dict(strategy="sample", num_beams=8), "num_beams=8 applies to strategy='beam' only"),
        (dict(length_penalty=0.6), "length_penalty=0.6 applies to strategy='beam' only.*set strategy='beam'"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
        (dict(strategy="beam", num_beams=2.0), "num_beams must be a whole number"),
        (dict(strategy="beam", length_penalty_form="wu"),
         "length_penalty_form must be one of 'power', 'gnmt', got 'wu'"),
        (dict(length_penalty_form="gnmt"), "length_penalty_form='gnmt' applies to strategy='beam' only"),
        (dict(strategy="sample", top_k_uniform=True), "top_k_uniform=True picks uniformly among .*: give top_k"),
        (dict(strategy="sample", top_k=5, top_k_uniform=True, temperature=0.7),
         "temperature=0.7 would have no effect with top_k_uniform=True"),
        (dict(strategy="sample", top_k=5, top_k_uniform=True, top_p=0.9), "top_p=0.9 would have no effect"),
        (dict(strategy="sample", top_k=5, top_k_uniform=1), "top_k_uniform must be True or False, got 1"),
        (dict(strategy="beam", top_k_uniform=False), "top_k_uniform=False applies to strategy='sample'"),
    ],
)
def test_a_generation_config_checks_itself(options, message):
    with pytest.raises(ValueError, match=message):
        tfm.GenerationConfig(**options)
    with pytest.raises(ValueError, match=message):
        tfm.GenerationConfig().replace(**options)


def test_an_unknown_option_is_a_type_error_naming_the_options():
    model, variables = decoder()
    with pytest.raises(TypeError, match="Unknown generation option beams; the options are max_new_tokens, strategy"):
        tfm.generate(model, variables, PROMPTS, max_new_tokens=4, beams=2)
    with pytest.raises(TypeError, match="config must be a GenerationConfig, got int"):
        tfm.generate(model, variables, PROMPTS, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1] * 60], max_new_tokens=8), "exceeds the model's context"),
        (dict(prompts=[[1, 2], []], max_new_tokens=4), "Prompt 1 is empty"),
        (dict(prompts=[[5.7, 6]]), "Prompts must hold integer token ids, got float64 values"),
        (dict(prompts=np.array([[5.0, 6.0]])), "Prompts must hold integer token ids"),
        (dict(prompts=np.array([[5, 17, 42]]), prompt_lengths=[-1]), r"each from 0 to the array's 3; got \[-1\]"),
        (dict(strategy="sample", temperature=0.0, rng=RNG), "temperature must be a finite number > 0"),
        (dict(strategy="sample", top_p=1.5, rng=RNG), r"top_p must be in \(0, 1\]"),
        (dict(strategy="sample", top_p=0.0, rng=RNG), r"top_p must be in \(0, 1\]"),
        (dict(strategy="beam", num_beams=0), "num_beams must be >= 1"),
        (dict(strategy="beam", length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(prompts=[[1, 5000]]), r"outside the vocabulary \[0, 1024\)"),
        (dict(strategy="sample"), "needs a random key"),
        (dict(strategy="nucleus"), "Unknown strategy"),
        (dict(strategy="sample", top_k=2000, rng=RNG), r"top_k must be in \[1, 1024\], got 2000"),
        (dict(eos_id=1024), r"eos_id=1024 is outside the vocabulary \[0, 1024\)"),
    ],
)
def test_bad_arguments_fail_before_compiling(kwargs, message):
    model, variables = decoder()
    arguments = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        tfm.generate(model, variables, arguments.pop("prompts"), **arguments)


def test_seq2seq_needs_a_start_token():
    model, variables = seq2seq()
    with pytest.raises(ValueError, match="bos_id"):
        tfm.generate(model, variables, [[1, 2]], max_new_tokens=3)


@pytest.mark.parametrize("make", [decoder, seq2seq], ids=["decoder", "encoder_decoder"])
def test_unscanned_model_computes_what_the_scanned_one_does(make):
    """Generation unstacks scanned layers (`layers` -> `layers_i`) before its loop: same outputs."""
    model, variables = make()
    assert model.config.scan_layers
    loop_model, loop_variables = tfm.unscanned(model, variables)
    assert not loop_model.config.scan_layers and "layers_1" in str(jax.tree_util.tree_structure(loop_variables))
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    inputs = (tokens, tokens[:, :4]) if isinstance(model, tfm.Seq2SeqLM) else (tokens,)
    np.testing.assert_allclose(
        loop_model.apply(loop_variables, *inputs), model.apply(variables, *inputs), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- what makes the loop fast


def test_argmax_is_jnp_argmax_with_ties_infinities_and_nan():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, jnp.nan, 5.0, jnp.nan], [-jnp.inf, -jnp.inf, -1.0, -jnp.inf]])
    np.testing.assert_array_equal(tfm.decoding.argmax(logits), jnp.argmax(logits, axis=-1))
    rounded = jnp.round(jax.random.normal(RNG, (3, 5, 40)), 1)  # [B, T, V], with ties
    np.testing.assert_array_equal(tfm.decoding.argmax(rounded), jnp.argmax(rounded, axis=-1))


def test_token_log_probs_are_log_softmax_at_the_token():
    logits = 5.0 * jax.random.normal(RNG, (4, 30))
    tokens = jnp.array([0, 3, 29, 7])
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(tfm.decoding.token_log_probs(logits, tokens), expected, rtol=1e-6)


def test_sampling_runs_one_decode_step_fewer_than_the_tokens_it_generates():
    """The first token comes from the prefill's logits; no step runs after the last token."""
    steps = []

    def counted_step(token, cache):
        jax.debug.callback(lambda: steps.append(1))
        return markov_step(token, cache)

    start = jnp.zeros((2,), jnp.int32)
    logits, cache = markov_step(start, start)
    for max_new_tokens in (1, 4):
        steps.clear()
        out = tfm.sample_loop(counted_step, logits, cache, RNG, max_new_tokens=max_new_tokens, greedy=True)
        jax.block_until_ready(out.tokens)
        jax.effects_barrier()
        assert len(steps) == max_new_tokens - 1
        assert out.tokens.shape == (2, max_new_tokens) and (out.lengths == max_new_tokens).all()


@functools.cache
def tied_decoder():
    cfg = tfm.ModelConfig.preset("gpt2-tiny", dropout_rate=0.0, max_length=64)
    model = tfm.CausalLM(cfg)
    return model, jax.jit(model.init)(RNG, jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("make", [tied_decoder, decoder, seq2seq], ids=["tied", "untied", "tied_rescaled"])
def test_for_decoding_computes_what_the_model_does(make):
    """Unscanned, with a tied head's embedding copied and transposed into an untied one: same logits."""
    model, variables = make()
    prepared, prepared_variables = tfm.decoding.for_decoding(model, variables)
    assert not prepared.config.scan_layers and not prepared.config.tie_embeddings
    if model.config.tie_embeddings:
        embedding = nn.meta.unbox(variables["params"])["embed"]["token"]["embedding"]
        scale = model.config.d_model**-0.5 if model.config.rescale_tied_logits else 1.0
        np.testing.assert_allclose(prepared_variables["params"]["lm_head"]["kernel"], embedding.T * scale)
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    inputs = (tokens, tokens[:, :4]) if isinstance(model, tfm.Seq2SeqLM) else (tokens,)
    np.testing.assert_allclose(
        prepared.apply(prepared_variables, *inputs), model.apply(variables, *inputs), rtol=1e-5, atol=1e-5
    )
    again, again_variables = tfm.decoding.for_decoding(prepared, prepared_variables)
    assert again == prepared and again_variables is prepared_variables


def test_kv_cache_stores_attention_layouts_and_reads_in_attention_order():
    """k, v in and out are [B, S, K, H]; the leaves are [B, K, H, S], which attention's
    products read without a transpose."""
    k, v = jax.random.normal(RNG, (2, 5, 3, 4)), jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3, 4))
    cache = tfm.KVCache(k, v)
    assert [leaf.shape for leaf in jax.tree.leaves(cache)] == [(2, 3, 4, 5)] * 2
    np.testing.assert_array_equal(cache.k, k)
    np.testing.assert_array_equal(cache.v, v)
    np.testing.assert_array_equal(jax.tree.map(lambda x: 2 * x, cache).k, 2 * k)
    new = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 3, 4))
    written = jax.jit(lambda c, n, i: c.write(n, -n, i))(cache, new, 1)
    np.testing.assert_array_equal(written.k, k.at[:, 1:3].set(new))
    np.testing.assert_array_equal(written.v, v.at[:, 1:3].set(-new))
    cfg = tfm.ModelConfig.preset("llama-tiny")
    empty = tfm.init_cache(cfg, batch_size=2, max_length=8)
    layer_shape = (2, 8, cfg.num_kv_heads, cfg.head_dim)
    assert [layer.k.shape for layer in empty.self_attention] == [layer_shape] * cfg.num_decoder_layers
    buffers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(empty.self_attention)}
    assert len(buffers) == 2 * cfg.num_decoder_layers  # one buffer each: donatable


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="temporary memory of XLA:CPU's programs")
@pytest.mark.parametrize("make", [decoder, seq2seq], ids=["decoder", "encoder_decoder"])
def test_a_decode_step_reads_every_layer_cache_in_place(make):
    """A decode step's products read each layer's cached keys and values (self- and cross-
    attention) where they are: its temporary memory holds no copy of a layer's cache (slices of
    one stacked [L, ...] cache were copied, every layer at every step: 132 KB here, 9 KB now)."""
    model, variables = make()  # rotary or relative positions: no table to outgrow
    model, variables = tfm.unscanned(model.clone(config=model.config.replace(max_length=256)), variables)
    cache = tfm.init_cache(model.config, batch_size=2, max_length=256)
    token = jnp.ones((2, 1), jnp.int32)
    if isinstance(model, tfm.Seq2SeqLM):  # fill the cross-attention cache from a source
        encoded = jax.jit(functools.partial(model.apply, method="encode"))(variables, jnp.ones((2, 256), jnp.int32))
        _, cache = jax.jit(functools.partial(model.apply, method="decode"))(variables, token, encoded, cache=cache)
        apply = functools.partial(model.apply, encoded=None, method="decode")  # cross keys, values cached
    else:
        apply = model.apply
    step = jax.jit(lambda variables, token, cache: apply(variables, token, cache=cache), donate_argnums=2)
    compiled = step.lower(variables, token, cache).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < cache.self_attention[0].keys.nbytes


def test_for_decoding_casts_the_matrices_a_narrower_compute_dtype_reads():
    """bfloat16 compute: kernels and embedding tables are cast once (the model casts them at every
    use anyway); norms and T5's relative-position bias table, read in float32, stay float32."""
    cfg = tfm.ModelConfig.preset("t5-tiny", dropout_rate=0.0, max_length=64, dtype="bfloat16")
    model = tfm.Seq2SeqLM(cfg)
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    variables = jax.jit(model.init)(RNG, tokens, tokens)
    prepared, prepared_variables = tfm.decoding.for_decoding(model, variables)
    dtypes = {
        "/".join(str(getattr(key, "key", key)) for key in path): leaf.dtype
        for path, leaf in jax.tree_util.tree_flatten_with_path(prepared_variables["params"])[0]
    }
    assert dtypes["lm_head/kernel"] == dtypes["encoder/layers_0/feed_forward/wi/kernel"] == jnp.bfloat16
    assert dtypes["embed/token/embedding"] == jnp.bfloat16
    assert dtypes["decoder/relative_position_bias/embedding"] == dtypes["decoder/final_norm/scale"] == jnp.float32
    expected = model.apply(variables, tokens, tokens[:, :4])  # bfloat16 products: up to a rounding or two
    logits = prepared.apply(prepared_variables, tokens, tokens[:, :4])
    np.testing.assert_allclose(logits, expected, atol=0.02 * float(jnp.abs(expected).max()))
