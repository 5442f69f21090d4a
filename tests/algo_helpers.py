"""Helpers shared by the algorithm tests."""

import random

import torch

GRADES = (0.0, 0.25, 0.5, 1.0, 1.5)


def make_batch(seed, n_groups=4, G=4, T=10, dtype=torch.float64, reward_kind="binary", holes=True, grades=GRADES):
    """A random rollout batch (rewards[N] float64, group_ids[N], response mask[N, T] bool, old log-probs[N, T]):
    ragged prompt/response lengths, random holes in the response mask, binary rewards or ``grades``
    (any other ``reward_kind``), non-contiguous group ids in row order."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    N = n_groups * G
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i in range(N):
        p = rng.randint(0, T // 3)
        ln = rng.randint(1, T - p)
        mask[i, p:p + ln] = True
        if holes and ln > 2 and rng.random() < 0.3:
            mask[i, p + rng.randint(1, ln - 1)] = False
    if reward_kind == "binary":
        rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(N)], dtype=torch.float64)
    else:
        rewards = torch.tensor([rng.choice(grades) for _ in range(N)], dtype=torch.float64)
    old = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    group_ids = torch.tensor([10 + 3 * (i // G) for i in range(N)])  # non-contiguous ids on purpose
    return rewards, group_ids, mask, old


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
