"""File weight sync: time of ``write_snapshot`` + ``read_snapshot`` (atomic dir, manifest, sha256 of every
file written and verified) over a raw safetensors ``save_file`` + ``load_file`` of the same tensors.

Both sides end with the tensors materialized in memory (safetensors' load_file maps the file lazily,
so the baseline copies every tensor out of the map, as loading into a model would). Tensors: the HF
state dict of a Llama with hidden 512, 8 layers, vocab 8192 (~ 34M parameters, 135 MB fp32). Runs are
interleaved (baseline, ours, baseline, ...); the ratio uses the fastest of ``--repeats`` runs of each
(timeit's advice on a shared machine: the minimum is the run least disturbed by other processes; the
median is printed beside it). Wall time, not CPU time: the sync hashes on a second thread on purpose,
and CPU time (printed, all threads) counts that work even where it overlaps the I/O.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tensors(hidden: int, layers: int, vocab: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g).to(dt) for k, (s, dt) in shapes.items()}


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from safetensors.torch import load_file, save_file

    from megatron_amir.rollout.weight_sync import read_snapshot, write_snapshot

    t = tensors(args.hidden, args.layers, args.vocab)
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    work = Path(tempfile.mkdtemp(prefix="weight-sync-bench-", dir=args.dir))
    try:
        def raw():
            f = work / "raw.safetensors"
            save_file(t, str(f), metadata={"format": "pt"})
            loaded = {k: v.clone() for k, v in load_file(str(f)).items()}
            assert len(loaded) == len(t)

        version = iter(range(1, 10**6))

        def ours():
            p = write_snapshot(t, work / "snapshots", next(version), keep_last=1)
            snap = read_snapshot(p)
            assert len(snap.tensors) == len(t)

        raw(), ours()  # warm-up (page cache, allocator)
        times = {"raw safetensors write+read": [], "weight_sync write+read (verified)": []}
        cpu = {name: [] for name in times}
        for _ in range(args.repeats):
            for name, fn in zip(times, (raw, ours)):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        # correctness of the measured path
        snap = read_snapshot(write_snapshot(t, work / "snapshots", 0, keep_last=None))
        assert all(torch.equal(snap.tensors[k], t[k]) for k in t)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"tensors: {len(t)}, {nbytes / 1e6:.1f} MB")
    print(f"{'path':<36}{'wall min':>9}{'wall med':>10}{'cpu min':>9}{'GB/s':>7}")
    best = {}
    for name, ts in times.items():
        best[name] = min(ts)
        print(f"{name:<36}{best[name]:>9.3f}{statistics.median(ts):>10.3f}{min(cpu[name]):>9.3f}"
              f"{2 * nbytes / best[name] / 1e9:>7.2f}")
    ratio = best["weight_sync write+read (verified)"] / best["raw safetensors write+read"]
    print(f"weight_sync: ratio={ratio:.2f} (goal 1.5)")
    return ratio


if __name__ == "__main__":
    main()
