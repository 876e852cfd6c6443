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
