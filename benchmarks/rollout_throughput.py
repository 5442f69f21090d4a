"""Rollout throughput: EmbeddedEngine tokens/s over transformers ``generate`` tokens/s, with real vLLM beside them.

Same tiny random Llama for both: by default a small test model (vocab 512, hidden 64,
FFN 128, 2 layers, 4 heads, 2 KV heads); ``--vocab 256 --hidden 128 --ffn 384 --layers 4 --tied`` is the
architecture of configs/demo_tiny.yaml. Same batch (16 prompts of 4-12 tokens x 8 samples = 128 rows,
the demo's rollout batch), same sampling (temperature 1, 64 new tokens, no stop token so both produce
exactly rows x 64 tokens), one CPU thread. Runs are interleaved after a warm-up. Both run on one
thread, so the ratio uses CPU time (``time.process_time``, the fastest of ``--repeats`` runs): on a shared
machine wall time mostly measures the other processes (wall time is printed beside it).

With the vLLM virtualenv present (scripts/bootstrap_vllm.sh; ``--no-vllm`` skips it), vLLM's CPU build runs the
same model directory and batch in-process (VLLMEngine, AsyncLLM) and through its OpenAI server started by our
launcher (benchmarks/vllm_rollout.py): CPU time summed over its processes, one OpenMP thread each. vLLM's CPU
attention needs a head size of 32, 64, 80, ... (``--hidden / --heads``); other sizes skip it with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def build(seed: int = 0, vocab: int = 512, hidden: int = 64, ffn: int = 128, layers: int = 2, tied: bool = False,
          heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval(), cfg.to_dict()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--no-vllm", action="store_true", help="leave real vLLM out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_amir.rollout.embedded import EmbeddedEngine
    from megatron_amir.rollout.engine import SamplingParams

    hf, cfg = build(0, args.vocab, args.hidden, args.ffn, args.layers, args.tied, args.heads)
    print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    rows, T = args.prompts * args.n, args.new_tokens

    # transformers: left-padded batch, each prompt repeated n times via num_return_sequences
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=T, min_new_tokens=T, num_return_sequences=args.n, pad_token_id=0,
                              eos_token_id=None)
        assert out.shape == (rows, P + T), out.shape
        return rows * T

    engine = EmbeddedEngine(cfg, hf.state_dict(), seed=0)
    sp = SamplingParams(temperature=1.0, max_new_tokens=T)

    def run_engine():
        res = engine.generate(prompts, sp, n=args.n)
        n_tok = sum(len(s.token_ids) for g_ in res for s in g_.samples)
        assert n_tok == rows * T, n_tok
        return n_tok

    runs = {"transformers.generate": run_hf, "EmbeddedEngine": run_engine}
    cpu = {name: [] for name in runs}
    wall = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    for name, timings in _vllm(args, hf, cfg, prompts).items():
        cpu[name], wall[name] = timings["cpu"], timings["wall"]
    results = {name: (rows * T / min(cpu[name]), min(cpu[name]), min(wall[name]), statistics.median(wall[name]))
               for name in cpu}

    print(f"{'engine':<24}{'rows':>6}{'new tok':>9}{'cpu s':>8}{'wall min':>10}{'wall med':>10}{'tok/cpu-s':>11}")
    for name, (tps, c, wmin, wmed) in results.items():
        print(f"{name:<24}{rows:>6}{T:>9}{c:>8.3f}{wmin:>10.3f}{wmed:>10.3f}{tps:>11.0f}")
    for name in ("vLLM in-process", "vLLM server"):
        if name in results:
            rel = results[name][0] / results["EmbeddedEngine"][0]
            print(f"{name} / EmbeddedEngine tokens per CPU second: {rel:.2f}")
    ratio = results["EmbeddedEngine"][0] / results["transformers.generate"][0]
    print(f"rollout_throughput: ratio={ratio:.2f} (goal 2)")
    return ratio


def _vllm(args, hf, cfg: dict, prompts) -> dict[str, dict]:
    """{engine name: {"cpu": [...], "wall": [...]}} of real vLLM on the same model and batch (empty, with the reason
    printed, when it cannot run here)."""
    import tempfile
    from pathlib import Path

    from benchmarks.vllm_rollout import measure, vllm_python
    from megatron_amir.rollout.vllm_engine import write_hf_dir

    py = vllm_python()
    head = args.hidden // args.heads
    why = ("--no-vllm" if args.no_vllm else "no vLLM virtualenv (bash scripts/bootstrap_vllm.sh)" if py is None
           else f"head size {head} is not one vLLM's CPU attention supports" if head not in VLLM_CPU_HEAD_SIZES
           else None)
    if why:
        print(f"real vLLM left out: {why}")
        return {}
    out = {}
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        tied = cfg.get("tie_word_embeddings")  # one tensor on disk: vLLM ties the head to the embedding itself
        # no EOS: the in-process engine stops at the config's eos_token_id even without a stop token, and every row
        # must generate --new-tokens, as for the other engines
        model_dir = write_hf_dir(Path(tmp) / "model", dict(cfg, eos_token_id=None),
                                 {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")})
        for name, mode in (("vLLM in-process", "inprocess"), ("vLLM server", "server")):
            out[name] = measure(py, model_dir, prompts, args.n, args.new_tokens, args.repeats, mode)
    return out


if __name__ == "__main__":
    main()
