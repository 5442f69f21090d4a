"""HF -> Megatron conversion cost against a raw safetensors read + write of the same bytes.

A random Llama-style model (default 623 MB fp32, 5 shards of <= 150 MB) is written as an HF directory. Each
measured job runs in a fresh subprocess after its imports, and reports its wall time and its peak RSS growth: the peak
(``VmHWM``, reset to the current RSS when the job starts by writing 5 to ``/proc/self/clear_refs``) minus the
RSS at the start (interpreter, torch and Megatron-Core imports excluded: they are a fixed ~0.4 GB that would
swamp any model size this machine can afford). Without the reset, ``ru_maxrss`` would also count import-time
transients and, after fork + exec, the parent's RSS at the fork (the parent has just generated the model);
where clear_refs is not writable it falls back to ``ru_maxrss``, an upper bound:

- baseline:   ``safetensors.torch.load_file`` + ``save_file`` of every shard into a new directory (the goal's
              denominator); ``baseline+fsync`` adds an fsync per file (Megatron's writer fsyncs), for context
- hf-to-mcore: ``megatron_amir.convert.hf_to_mcore`` with its defaults (single process, includes the Megatron
              layout from a meta-device model and the torch_dist write; no fsync, like the baseline);
              ``hf-to-mcore+fsync`` with ``fsync=True``, for context (compare it with ``baseline+fsync``)
- mcore-to-hf: ``megatron_amir.convert.mcore_to_hf`` back to sharded safetensors (reported, no goal)

The page cache is warmed by reading the source once first, so every job reads from memory; only the +fsync
jobs fsync.

    python -m benchmarks.convert [--hidden 1024] [--layers 8] [--vocab 32000] [--dtype fp32] [--repeats 2]

Last lines: ``convert_rss: ratio=<peak RSS / model bytes> (goal 1.3)`` then
``convert: ratio=<hf-to-mcore time / baseline time> (goal 1.5)``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_model(root: Path, hidden: int, layers: int, vocab: int, dtype: str, shard_bytes: int) -> tuple[Path, int]:
    import torch

    from megatron_amir.convert import hf_io
    from megatron_amir.convert.hf_config import hf_config_from_model_config
    from megatron_amir.convert.mapping import model_mapping
    from megatron_amir.config import ModelConfig

    heads = max(1, hidden // 128)
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=hidden * 11 // 4,
                      num_layers=layers, num_attention_heads=heads, num_kv_heads=max(1, heads // 4),
                      params_dtype=dtype)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_config_from_model_config(cfg), indent=2))
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    writer = hf_io.ShardedWriter(hf_dir, shard_bytes)
    g = torch.Generator().manual_seed(0)
    for name, shape in model_mapping(cfg).hf_shapes(vocab).items():
        writer.add(name, (torch.randn(shape, generator=g) * 0.02).to(tdtype))
    writer.close()
    return hf_dir, writer.total_bytes


def _child(job: str, src: str, dst: str) -> None:
    """Run one job in this (fresh) process; print a JSON line with seconds and peak RSS growth."""
    import torch  # noqa: F401  (imports are not part of any job)

    torch.set_num_threads(2)
    if not job.startswith("baseline"):
        import transformers

        from megatron_amir.model.compat import apply_cpu_compat

        apply_cpu_compat()
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        from megatron_amir.convert.hf_to_mcore import hf_to_mcore
        from megatron_amir.convert.mcore_to_hf import mcore_to_hf

        transformers.LlamaConfig  # noqa: B018  (transformers resolves its lazy modules on first access)
    from safetensors.torch import load_file, save_file

    from megatron_amir.convert import hf_io
    from megatron_amir.fileio import fsync_path

    reset = _reset_peak_rss()
    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    if job.startswith("baseline"):
        os.makedirs(dst)
        for shard in hf_io.list_shards(Path(src)):
            out = os.path.join(dst, shard.name)
            save_file(load_file(str(shard)), out, metadata={"format": "pt"})  # load_file memory-maps the shard
            if job == "baseline+fsync":  # Megatron's checkpoint writer fsyncs its files; this row shows that cost
                fsync_path(out)
    elif job.startswith("hf-to-mcore"):
        hf_to_mcore(src, dst, fsync=job == "hf-to-mcore+fsync")
    else:
        mcore_to_hf(src, dst)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes(reset)
    print(json.dumps({"job": job, "seconds": seconds, "peak_growth": peak - base_rss, "base_rss": base_rss}))


def _run(job: str, src: Path, dst: Path) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    out = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--child", job, str(src), str(dst)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--shard-mb", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2, help="runs per job; the fastest counts")
    ap.add_argument("--child", nargs=3, metavar=("JOB", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return

    with tempfile.TemporaryDirectory(prefix="mamir-bench-convert-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        hf_dir, model_bytes = _make_model(root, args.hidden, args.layers, args.vocab, args.dtype,
                                          args.shard_mb * 10**6)
        for f in hf_dir.iterdir():  # warm the page cache so every job reads from memory
            f.read_bytes()
        results: dict[str, list[dict]] = {"baseline": [], "baseline+fsync": [], "hf-to-mcore": [],
                                          "hf-to-mcore+fsync": [], "mcore-to-hf": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every job alike
            results["baseline"].append(_run("baseline", hf_dir, root / "raw"))
            results["baseline+fsync"].append(_run("baseline+fsync", hf_dir, root / "raw"))
            results["hf-to-mcore+fsync"].append(_run("hf-to-mcore+fsync", hf_dir, root / "mc"))
            results["hf-to-mcore"].append(_run("hf-to-mcore", hf_dir, root / "mc"))
            mc_copy = root / "mc-src"
            if not mc_copy.exists():
                shutil.copytree(root / "mc", mc_copy)
            results["mcore-to-hf"].append(_run("mcore-to-hf", mc_copy, root / "hf2"))
        out_bytes = {"baseline": _du(root / "raw"), "baseline+fsync": _du(root / "raw"), "hf-to-mcore": _du(root / "mc"),
                     "hf-to-mcore+fsync": _du(root / "mc"), "mcore-to-hf": _du(root / "hf2")}

    best = {job: min(rs, key=lambda r: r["seconds"]) for job, rs in results.items()}
    peak = {job: max(r["peak_growth"] for r in rs) for job, rs in results.items()}
    print(f"model: llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} {args.dtype}, "
          f"{model_bytes / 1e6:.1f} MB in shards of <= {args.shard_mb} MB; "
          f"best of {args.repeats} runs; RSS = peak growth over the job's start (imports excluded)")
    print(f"{'job':<18} {'seconds':>8} {'time/base':>10} {'peak RSS MB':>12} {'RSS/model':>10} {'out MB':>8}")
    for job in results:
        print(f"{job:<18} {best[job]['seconds']:8.2f} {best[job]['seconds'] / best['baseline']['seconds']:10.2f} "
              f"{peak[job] / 1e6:12.1f} {peak[job] / model_bytes:10.2f} {out_bytes[job] / 1e6:8.1f}")
    rss_ratio = peak["hf-to-mcore"] / model_bytes
    time_ratio = best["hf-to-mcore"]["seconds"] / best["baseline"]["seconds"]
    print(f"convert_rss: ratio={rss_ratio:.2f} (goal 1.3)")
    print(f"convert: ratio={time_ratio:.2f} (goal 1.5)")


if __name__ == "__main__":
    main()
