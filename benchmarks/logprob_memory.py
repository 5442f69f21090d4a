"""Peak memory of the token log-prob path: ours (vocab-parallel, chunked) vs naive full-vocab log_softmax.

Each path computes per-token log-probs of the targets (and the entropy metric where the trainer
computes it), then backward of sum(w * logp) into the logits -- what one RL micro-batch does. Peak
memory is measured on CPU by ``PeakTracker``, a TorchDispatchMode that adds the bytes of every new tensor
storage an op returns and subtracts them when the storage is freed (weakref): the peak of memory
allocated by the path during forward + backward, *beyond its input logits* (the gradient of the logits
is counted, it is allocated by the path; views and saved references to the input are not).
(torch's MemTracker counts tensors saved for backward as new activations even when they are the
input itself, which would charge our path for the logits it merely keeps a reference to.) The TP=2 rows run 2 processes
(gloo), each holding half the vocabulary, and report the larger per-rank peak.

Logits are bf16 (the model output of bf16/FP8 training) unless --dtype fp32. Baseline ("naive"):
log_softmax(logits.float()).gather(targets), autograd as usual.

    python -m benchmarks.logprob_memory [--tokens 1024] [--vocab 32768] [--chunk 128] [--dtype bf16]

Last two lines: the TP=2 ratio (goal <= 0.6) and the chunked ratio (goal <= 0.25), the last one last.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _inputs(tokens: int, vocab: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    w = torch.randn(tokens, generator=g)
    return logits, targets, w


def naive(logits, targets, w, **_):
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (lp * w).sum().backward()
    return lp.detach()


def ours(logits, targets, w, *, group=None, vocab_start=0, chunk=None, entropy=True):
    from megatron_amir.model.logprobs import vocab_parallel_logprobs

    lp, ent = vocab_parallel_logprobs(logits, targets, tp_group=group, vocab_start=vocab_start, chunk_size=chunk,
                                      with_entropy=entropy)
    (lp * w).sum().backward()  # entropy is a metric: no gradient through it (as in Policy.train_step)
    return lp.detach()


class PeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context (inputs passed to __init__ excluded)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.ignored = {t.untyped_storage().data_ptr() for t in inputs}

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self.live or key in self.ignored:
                continue  # a view / in-place result of a tracked storage, or of an input
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out


def measure(fn, logits, **kw):
    """(peak bytes beyond the inputs, seconds, logp) of fn on a fresh leaf copy of ``logits``."""
    x = logits.detach().clone().requires_grad_()
    targets, w = kw.pop("targets"), kw.pop("w")
    t0 = time.perf_counter()
    with PeakTracker(x, targets, w) as tracker:
        lp = fn(x, targets, w, **kw)
    dt = time.perf_counter() - t0
    del x
    return int(tracker.peak), dt, lp


def _tp2_worker(rank, port, args, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logits, targets, w = _inputs(args.tokens, args.vocab, DTYPES[args.dtype])
        v = args.vocab // 2
        shard = logits[:, rank * v : (rank + 1) * v].contiguous()
        del logits
        out = {}
        for name, chunk in (("ours TP=2", None), ("ours TP=2 chunked", args.chunk)):
            peak, dt, lp = measure(ours, shard, targets=targets, w=w, group=dist.group.WORLD, vocab_start=rank * v,
                                   chunk=chunk)
            out[name] = (peak, dt, lp.double().tolist())  # plain lists: tensors in a Queue need the sender alive
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    if args.vocab % 2:
        raise SystemExit("--vocab must be even (split over TP=2)")
    torch.set_num_threads(2)
    logits, targets, w = _inputs(args.tokens, args.vocab, DTYPES[args.dtype])
    rows = {}
    rows["naive log_softmax"] = measure(naive, logits, targets=targets, w=w)
    rows["ours TP=1"] = measure(ours, logits, targets=targets, w=w)
    rows["ours TP=1 chunked"] = measure(ours, logits, targets=targets, w=w, chunk=args.chunk)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_tp2_worker, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    for name in per_rank[0]:
        peaks = [per_rank[r][name][0] for r in (0, 1)]
        rows[name] = (max(peaks), max(per_rank[r][name][1] for r in (0, 1)), torch.tensor(per_rank[0][name][2]))

    base_peak = rows["naive log_softmax"][0]
    ref_lp = rows["naive log_softmax"][2]
    logits_mb = logits.numel() * logits.element_size() / 2**20
    print(f"tokens={args.tokens} vocab={args.vocab} logits dtype={args.dtype} ({logits_mb:.0f} MiB full) "
          f"chunk={args.chunk} tokens; peak = memory allocated by fwd+bwd beyond the input logits")
    print(f"{'path':<22} {'peak MiB':>9} {'ratio':>7} {'time s':>8} {'max|dlogp|':>11}")
    for name, (peak, dt, lp) in rows.items():
        err = float((lp.double() - ref_lp.double()).abs().max())
        print(f"{name:<22} {peak / 2**20:>9.1f} {peak / base_peak:>7.3f} {dt:>8.3f} {err:>11.2e}")
    tp2 = rows["ours TP=2"][0] / base_peak
    chunked = rows["ours TP=1 chunked"][0] / base_peak
    print(f"logprob_memory_tp2: ratio={tp2:.3f} (goal 0.6)")
    print(f"logprob_memory: ratio={chunked:.3f} (goal 0.25)")


if __name__ == "__main__":
    main()
