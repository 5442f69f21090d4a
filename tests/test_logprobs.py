"""Vocab-parallel log-probs and entropy (TP=1 here; TP=2 in test_logprobs_dist.py) against loop references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_amir.model.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

torch.set_num_threads(1)


def loop_reference(logits: torch.Tensor, targets: torch.Tensor):
    """float64 log-softmax of each row with python loops (independent of the vectorized code)."""
    x = logits.detach().double().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    lp, ent = [], []
    for i in range(x.shape[0]):
        row = [float(v) for v in x[i]]
        m = max(row)
        z = m + math.log(sum(math.exp(v - m) for v in row))
        lp.append(row[int(t[i])] - z)
        ent.append(-sum(math.exp(v - z) * (v - z) for v in row))
    shape = targets.shape
    return torch.tensor(lp, dtype=torch.float64).view(shape), torch.tensor(ent, dtype=torch.float64).view(shape)


def autograd_reference_grad(logits, targets, g_lp, g_ent):
    x = logits.detach().double().requires_grad_()
    ls = torch.log_softmax(x, -1)
    lp = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    (lp * g_lp).sum().add_((ent * g_ent).sum()).backward()
    return x.grad


@pytest.mark.parametrize("chunk", [None, 1, 4, 7])
def test_fp64_matches_loop_reference(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 13, dtype=torch.float64, generator=g) * 3
    targets = torch.randint(0, 13, (3, 5), generator=g)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=chunk, with_entropy=True)
    rlp, rent = loop_reference(logits, targets)
    assert lp.dtype == torch.float64
    assert torch.allclose(lp, rlp, atol=1e-10, rtol=0)
    assert torch.allclose(ent, rent, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk", [None, 3])
def test_fp64_gradients(chunk):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 6, 11, dtype=torch.float64, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, 11, (4, 6), generator=g)
    g_lp = torch.randn(4, 6, dtype=torch.float64, generator=g)
    g_ent = torch.randn(4, 6, dtype=torch.float64, generator=g)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=chunk, with_entropy=True)
    (lp * g_lp).sum().add((ent * g_ent).sum()).backward()
    ref = autograd_reference_grad(logits, targets, g_lp, g_ent)
    assert torch.allclose(logits.grad, ref, atol=1e-10, rtol=0)
    # log-prob only (no entropy output used)
    logits.grad = None
    lp, _ = vocab_parallel_logprobs(logits, targets, chunk_size=chunk)
    (lp * g_lp).sum().backward()
    ref = autograd_reference_grad(logits, targets, g_lp, torch.zeros_like(g_ent))
    assert torch.allclose(logits.grad, ref, atol=1e-10, rtol=0)


def test_fp32_and_bf16_inputs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 50, generator=g) * 4
    targets = torch.randint(0, 50, (2, 9), generator=g)
    rlp, rent = loop_reference(logits, targets)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=5, with_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.allclose(lp.double(), rlp, atol=1e-5, rtol=0)
    assert torch.allclose(ent.double(), rent, atol=1e-5, rtol=0)
    # bf16 logits: math in fp32 on the bf16 values, gradient returned in bf16
    lb = logits.bfloat16().requires_grad_()
    lp_b, _ = vocab_parallel_logprobs(lb, targets)
    rlp_b, _ = loop_reference(lb, targets)
    assert lp_b.dtype == torch.float32
    assert torch.allclose(lp_b.double(), rlp_b, atol=1e-5, rtol=0)
    lp_b.sum().backward()
    assert lb.grad.dtype == torch.bfloat16


def test_entropy_helper_and_extremes():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, -100.0, 0.0, 0.0]], dtype=torch.float64)
    ent = vocab_parallel_entropy(logits)
    assert abs(float(ent[0]) - math.log(4)) < 1e-12
    assert 0.0 <= float(ent[1]) < 1e-30 or abs(float(ent[1])) < 1e-40 + 1e-40  # one-hot: ~0
    lp, _ = vocab_parallel_logprobs(logits * 10, torch.tensor([1, 1]))  # very large logits stay finite
    assert torch.isfinite(lp).all()


def test_bad_input():
    with pytest.raises(ValueError, match="does not match targets"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)


def test_input_logits_not_modified():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(3, 4, 9, dtype=dtype, generator=g).requires_grad_()
        before = logits.detach().clone()
        lp, ent = vocab_parallel_logprobs(logits, torch.randint(0, 9, (3, 4), generator=g), with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        assert torch.equal(logits.detach(), before)


def test_entropy_as_metric_only_gradient():
    """with_entropy=True but only logp in the loss (the train step's case): gradient of logp alone."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 9, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.randint(0, 9, (2, 5), generator=g)
    g_lp = torch.randn(2, 5, dtype=torch.float64, generator=g)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=3, with_entropy=True)
    (lp * g_lp).sum().backward()
    ref = autograd_reference_grad(logits, targets, g_lp, torch.zeros_like(g_lp))
    assert torch.allclose(logits.grad, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_temperature(chunk):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 10, dtype=torch.float64, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, 10, (2, 4), generator=g)
    g_lp, g_ent = torch.randn(2, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, dtype=torch.float64, generator=g)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=chunk, with_entropy=True, temperature=0.7)
    rlp, rent = loop_reference(logits / 0.7, targets)
    assert torch.allclose(lp, rlp, atol=1e-10, rtol=0) and torch.allclose(ent, rent, atol=1e-10, rtol=0)
    (lp * g_lp + ent * g_ent).sum().backward()
    x = logits.detach().clone().requires_grad_()
    ls = torch.log_softmax(x / 0.7, -1)
    ((ls.gather(-1, targets[..., None])[..., 0] * g_lp) + (-(ls.exp() * ls).sum(-1) * g_ent)).sum().backward()
    assert torch.allclose(logits.grad, x.grad, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)


def test_valid_vocab_masks_padding_rows():
    """Padding rows (ids >= valid_vocab) get probability 0: log-probs and entropy equal a float64
    log_softmax over the real vocabulary only, and padding columns get zero gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (3, 5))
    logp, ent = vocab_parallel_logprobs(logits, targets, with_entropy=True, valid_vocab=9, temperature=0.7)
    ref = torch.log_softmax(logits.detach()[..., :9] / 0.7, dim=-1)
    assert torch.allclose(logp, ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-12)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[..., 9:].abs().max() == 0


def test_entropy_gradient_is_finite_on_padding_rows():
    """Padding rows (valid_vocab) hold logit -1e30 inside; a large entropy gradient (an entropy bonus under an
    fp16 loss scale of 2^32) must not turn (x - E[x])·g into -inf·0 = NaN there: their gradient is 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, generator=g).requires_grad_(True)
    targets = torch.randint(0, 10, (2, 3), generator=g)
    lp, ent = vocab_parallel_logprobs(logits, targets, with_entropy=True, valid_vocab=10)
    (lp.sum() + 2.0**32 * ent.sum()).backward()
    assert torch.isfinite(logits.grad).all() and bool((logits.grad[..., 10:] == 0).all())
