"""Helpers shared by the algorithm tests."""

import random


def random_split(n, seed, max_cuts=4):
    """Random permutation of rows cut into 2..max_cuts+1 random-size micro-batches."""
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(1, max_cuts))))
    out, prev = [], 0
    for c in cuts + [n]:
        out.append(perm[prev:c])
        prev = c
    return out
