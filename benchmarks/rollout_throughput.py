"""Rollout throughput: EmbeddedEngine tokens/s over transformers ``generate`` tokens/s.

Same tiny random Llama for both: by default a small test model (vocab 512, hidden 64,
FFN 128, 2 layers, 4 heads, 2 KV heads); ``--vocab 256 --hidden 128 --ffn 384 --layers 4 --tied`` is the
architecture of configs/demo_tiny.yaml. Same batch (16 prompts of 4-12 tokens x 8 samples = 128 rows,
the demo's rollout batch), same sampling (temperature 1, 64 new tokens, no stop token so both produce
exactly rows x 64 tokens), one CPU thread. Runs are interleaved after a warm-up. Both run on one
thread, so the ratio uses CPU time (``time.process_time``, the fastest of ``--repeats`` runs): on a shared
machine wall time mostly measures the other processes (wall time is printed beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(seed: int = 0, vocab: int = 512, hidden: int = 64, ffn: int = 128, layers: int = 2, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_amir.rollout.embedded import EmbeddedEngine
    from megatron_amir.rollout.engine import SamplingParams

    hf, cfg = build(0, args.vocab, args.hidden, args.ffn, args.layers, args.tied)
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
    results = {name: (rows * T / min(cpu[name]), min(cpu[name]), min(wall[name]), statistics.median(wall[name]))
               for name in runs}

    print(f"{'engine':<24}{'rows':>6}{'new tok':>9}{'cpu s':>8}{'wall min':>10}{'wall med':>10}{'tok/cpu-s':>11}")
    for name, (tps, c, wmin, wmed) in results.items():
        print(f"{name:<24}{rows:>6}{T:>9}{c:>8.3f}{wmin:>10.3f}{wmed:>10.3f}{tps:>11.0f}")
    ratio = results["EmbeddedEngine"][0] / results["transformers.generate"][0]
    print(f"rollout_throughput: ratio={ratio:.2f} (goal 2)")
    return ratio


if __name__ == "__main__":
    main()
