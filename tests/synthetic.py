"""Synthetic text for tests: pseudo-words with Zipf-like frequencies from a fixed lexicon."""

import numpy as np

SYLLABLES = "ka to ri mu sen lo va tal ber quin dor ash pel grim so na fe lix or tho".split()


def sentences(count: int, seed: int) -> list[str]:
    """`count` capitalised sentences of 4-13 pseudo-words drawn (Zipf-like) from a fixed lexicon."""
    lexicon_rng = np.random.default_rng(1234)  # the same lexicon whatever the seed
    words = sorted({"".join(lexicon_rng.choice(SYLLABLES, lexicon_rng.integers(1, 4))) for _ in range(600)})
    frequency = 1.0 / np.arange(1, len(words) + 1)
    frequency /= frequency.sum()
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(words, rng.integers(4, 14), p=frequency)).capitalize() + "."
        for _ in range(count)
    ]


def topic_documents(count: int, lines: int, seed: int) -> list[str]:
    """`count` documents of `lines` sentences; document i draws its words from a vocabulary of
    its own (topic i, the same whatever the seed), so that which document a sentence comes from
    shows in its words: next-sentence prediction has a plain signal to learn."""
    lexicon_rng = np.random.default_rng(4321)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(lexicon_rng.choice(syllables, 2)) for _ in range(1000)})
    lexicon_rng.shuffle(words)
    rng = np.random.default_rng(seed)
    return [
        "\n".join(
            " ".join(rng.choice(words[20 * topic : 20 * topic + 20], rng.integers(4, 9))).capitalize() + "."
            for _ in range(lines)
        )
        for topic in range(count)
    ]
