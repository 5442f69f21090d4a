"""Rollout throughput: EmbeddedEngine tokens/s over transformers ``generate`` tokens/s.

Same tiny random Llama (vocab 512, hidden 64, 2 layers, 4 heads, 2 KV heads), same batch (16 prompts of
4-12 tokens x 8 samples = 128 rows), same sampling (temperature 1, 64 new tokens, no stop token so both
produce exactly rows x 64 tokens), one CPU thread. Runs are interleaved after a warm-up; tokens/s uses
the fastest of ``--repeats`` runs of each (the run least disturbed on a shared machine; the median time
is printed beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval(), cfg.to_dict()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_amir.rollout.embedded import EmbeddedEngine
    from megatron_amir.rollout.engine import SamplingParams

    hf, cfg = build()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g).tolist()
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
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n_tok = fn()
            times[name].append(time.perf_counter() - t0)
    results = {name: (rows * T / min(ts), min(ts), statistics.median(ts)) for name, ts in times.items()}

    print(f"{'engine':<24}{'rows':>6}{'new tok':>9}{'min s':>8}{'median s':>10}{'tokens/s':>11}")
    for name, (tps, best, med) in results.items():
        print(f"{name:<24}{rows:>6}{T:>9}{best:>8.3f}{med:>10.3f}{tps:>11.0f}")
    ratio = results["EmbeddedEngine"][0] / results["transformers.generate"][0]
    print(f"rollout_throughput: ratio={ratio:.2f} (goal 2)")
    return ratio


if __name__ == "__main__":
    main()
