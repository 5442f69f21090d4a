"""Supervised warm-up on (prompt, solution) pairs with the same Megatron policy and train step as RL.

The demo needs a model that solves part of the problems before RL can learn anything (groups with mixed
rewards). The loss is the token-mean negative log-likelihood of solution + EOS tokens:

    L = -(1 / N_tok) * sum_{i,t} m_{i,t} * log p(y_{i,t+1} | y_{i,<=t})

expressed in the RL step's contract (per-token weights already divided by the global token count, so
micro-batch losses sum to L under any micro-batching, pipeline or data parallelism).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megatron_amir.config import Config, config_record
from megatron_amir.training.checkpoint import WARMUP_KIND, CheckpointManager
from megatron_amir.training.data_setup import bind_vocab, build_data, export_record, rollout_hf_config
from megatron_amir.training.metrics import MetricsLogger
from megatron_amir.training.model_checkpoint import broadcast_from_rank0
from megatron_amir.training.rollout_batch import build_rollout_batch

log = logging.getLogger("megatron_amir.sft")


@dataclass
class SFTBatch:
    response_mask: torch.Tensor  # [n, T]
    token_weights: torch.Tensor  # [n, T] = mask / global token count

    def select(self, idx: torch.Tensor) -> "SFTBatch":
        return SFTBatch(self.response_mask[idx], self.token_weights[idx])


def sft_loss(logp: torch.Tensor, mb: SFTBatch, _cfg: Any = None) -> tuple[torch.Tensor, dict]:
    """Summable NLL term of one micro-batch: -sum(w * logp)."""
    nll = -(mb.token_weights * logp).sum()
    return nll, {"nll": nll.detach()}


def tokenize_examples(tokenizer, prompts: Sequence[str], solutions: Sequence[str]):
    """Rows of prompt ids + solution ids + EOS with the loss on solution + EOS (the RL batch layout)."""
    p_ids = [tokenizer.encode(p) for p in prompts]
    r_ids = [tokenizer.encode(s) + [tokenizer.eos_id] for s in solutions]
    n = len(p_ids)
    batch = build_rollout_batch(p_ids, r_ids, [[0.0] * len(r) for r in r_ids], list(range(n)), [0.0] * n,
                                [False] * n, [False] * n, [0] * n, pad_id=tokenizer.pad_id)
    return batch.tokens, batch.response_mask


TARGET_METRICS = ("greedy", "sampled")


def run_sft(trainer_like, steps: int, batch_size: int, eval_every: int = 0, target_accuracy: Optional[float] = None,
            eval_problems: int = 100, start: int = 0, target_metric: str = "sampled") -> dict[str, float]:
    """Train ``steps`` supervised steps, numbered ``start + 1 ...`` (``start``: the step of the warm-up checkpoint
    this one continues, else 0), stopping early once ``target_metric`` accuracy ("greedy" or "sampled") on
    ``eval_problems`` validation problems reaches ``target_accuracy``.

    The result says why it stopped: ``sft/target_reached`` is 1.0 when the target was met at step ``sft/steps``,
    0.0 when the step budget ran out first (or no target was set).

    Warm-up rows already in the metrics file past ``start`` (an earlier, interrupted or repeated attempt) are
    dropped first, so no step is logged twice; rows of an RL run sharing the file are kept."""
    if target_metric not in TARGET_METRICS:
        raise ValueError(f"target_metric must be one of {TARGET_METRICS}, got {target_metric!r}")
    key = f"eval/{target_metric}_accuracy"
    reached = False
    t = trainer_like
    rng = random.Random(t.cfg.train.seed)
    for _ in range(start * batch_size):  # a continued warm-up draws the batches an uninterrupted one would next
        rng.randrange(len(t.train_problems))
    last: dict[str, float] = {}
    from tqdm.auto import tqdm

    dp, dp_rank = t.policy.dp_size, t.policy.info.dp_rank
    if batch_size % dp:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the data-parallel size {dp}")
    share = slice(dp_rank * batch_size // dp, (dp_rank + 1) * batch_size // dp)
    pbar = tqdm(total=steps, desc="warm-up", unit="step", disable=t.rank != 0 or not t.cfg.logging.progress)
    t.metrics.truncate_after(start, kind=WARMUP_KIND)
    t0 = time.perf_counter()
    step, end = start, start + steps
    for step in range(start + 1, end + 1):
        # every rank draws the same batch and trains its share; the weights use the batch's token count, so
        # the losses summed over DP ranks are the token-mean NLL of the whole batch
        probs = [t.train_problems[rng.randrange(len(t.train_problems))] for _ in range(batch_size)]
        tokens, mask = tokenize_examples(t.tokenizer, [p.prompt for p in probs], [p.solution for p in probs])
        ntok = mask.sum()
        batch = SFTBatch(mask[share], mask[share] / ntok)
        out = t.policy.train_step(tokens[share], batch)
        last = {"sft/loss": out["loss"], "grad_norm": out["grad_norm"], "lr": out["lr"],
                "time/elapsed_s": time.perf_counter() - t0}
        pbar.update(1)
        pbar.set_postfix(loss=f"{out['loss']:.3f}")
        if eval_every and (step % eval_every == 0 or step == end):
            acc = t.quick_accuracy(eval_problems)
            last.update(acc)
            log.info("warm-up step %d: loss %.4f, %s", step, out["loss"],
                     ", ".join(f"{k}={v:.3f}" for k, v in acc.items()))
            t.metrics.log(step, last)
            # rank 0 evaluates; every rank must stop together (the next step is collective)
            reached = target_accuracy is not None and acc.get(key, -1.0) >= target_accuracy
            if broadcast_from_rank0(reached):
                reached = True
                log.info("reached %s accuracy %s >= %.3f at step %d: stopping the warm-up", target_metric,
                         acc.get(key, "(rank 0)"), target_accuracy, step)
                break
        else:
            t.metrics.log(step, last)
    pbar.close()
    if target_accuracy is not None and not reached:
        log.info("step budget exhausted at step %d before %s accuracy reached %.3f", step, target_metric,
                 target_accuracy)
    last["sft/steps"] = step
    last["sft/target_reached"] = 1.0 if reached else 0.0
    return last


class WarmupRunner:
    """The parts the warm-up needs: tokenizer + problems, policy with the SFT loss, an engine for evaluation."""

    def __init__(self, cfg: Config):
        from megatron_amir.training.parallel import initialize_distributed
        from megatron_amir.training.policy import Policy
        from megatron_amir.training.trainer import _setup_logging

        self.cfg = cfg
        self.rank = initialize_distributed(cfg).rank
        _setup_logging(cfg, self.rank)
        torch.manual_seed(cfg.train.seed)
        self.tokenizer, sampler, self.test_problems = build_data(cfg)
        bind_vocab(cfg, self.tokenizer)
        self.train_problems = sampler.records
        self.val_problems: Optional[list] = None  # drawn on first use (validation_problems)
        self.policy = Policy(cfg, loss_fn=sft_loss)
        from megatron_amir.rewards import get_reward_fn

        self.reward_fn = get_reward_fn(cfg.reward.name, cfg.reward)
        self.metrics = MetricsLogger(cfg.logging.dir, tensorboard=cfg.logging.tensorboard, enabled=self.rank == 0,
                                     kind=WARMUP_KIND)
        self.start_step = 0  # the step of the warm-up checkpoint this warm-up continues (start_from), else 0
        self._engine = None
        self.hf_config = rollout_hf_config(cfg, self.tokenizer)  # replaced by the starting checkpoint's, if any

    def start_from(self, init_from: Optional[str]) -> None:
        """Starting weights as the RL trainer takes them: --init-from, model.load or model.hf_path (checked). From a
        warm-up checkpoint at step k, this warm-up continues its step count: steps k+1, k+2, ..."""
        from megatron_amir.training.trainer import load_starting_weights, starting_checkpoint

        path = starting_checkpoint(self.cfg, self.rank, self.policy.barrier, init_from)
        if path:
            base = load_starting_weights(self.policy, self.cfg, path)
            self.hf_config = rollout_hf_config(self.cfg, self.tokenizer, base=base)
            if (Path(path) / "meta.json").is_file():  # a step directory (a converted model directory has none)
                meta = CheckpointManager.read_meta(Path(path))
                if meta.get("kind") == WARMUP_KIND:
                    self.start_step = int(meta["step"])

    def engine(self):
        from megatron_amir.rollout.embedded import EmbeddedEngine

        weights = self.policy.full_hf_state_dict(vocab_size=self.cfg.model.real_vocab_size)
        if self.rank != 0:
            return None
        if self._engine is None:
            self._engine = EmbeddedEngine(self.hf_config, weights)
        else:
            self._engine.load_weights(weights, self._engine.version + 1)
        return self._engine

    def validation_problems(self, n: int) -> list:
        """``n`` problems the warm-up stops on. For the synthetic task they are drawn from a stream of their own
        and are disjoint from the training and the held-out test problems, so the stopping rule does not select
        on the problems RL is evaluated on. Other sources have no third split: their first ``n`` test problems."""
        if self.val_problems is not None and len(self.val_problems) >= n:
            return self.val_problems[:n]
        d = self.cfg.data
        if d.source != "synthetic":
            self.val_problems = list(self.test_problems)
            return self.val_problems[:n]
        from megatron_amir.data.synthetic import make_splits

        taken = {p.id for p in self.train_problems} | {p.id for p in self.test_problems}
        want, drawn = n, []
        while len(drawn) < n:  # a few of a draw may collide with train/test problems: draw more until n are left
            want += n
            _, cand = make_splits(d.synthetic, num_train=0, num_test=want, seed=d.synthetic.seed + 7919)
            drawn = [p for p in cand if p.id not in taken]
        self.val_problems = drawn[:n]
        return self.val_problems

    def quick_accuracy(self, n: int) -> dict[str, float]:
        """Greedy and sampled (T = rollout temperature) accuracy on ``n`` validation problems."""
        from megatron_amir.rollout.engine import SamplingParams

        engine = self.engine()
        if engine is None:
            return {}
        probs = self.validation_problems(n)
        prompts = [self.tokenizer.encode(p.prompt) for p in probs]
        out = {}
        for name, temp in (("greedy", 0.0), ("sampled", self.cfg.rollout.temperature)):
            params = SamplingParams(temperature=temp, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                    stop_token_ids=(self.tokenizer.eos_id,), seed=self.cfg.train.seed)
            groups = engine.generate(prompts, params, n=1)
            texts = [self.tokenizer.decode(g.samples[0].token_ids) for g in groups]
            res = self.reward_fn(texts, [p.answer for p in probs])
            out[f"eval/{name}_accuracy"] = sum(res.correct) / max(1, len(probs))
        return out

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        root = Path(self.cfg.checkpoint.dir)
        rl = [p.name for p in sorted(root.glob("step_*")) if (p / "meta.json").is_file()
              and CheckpointManager.read_meta(p).get("kind") != WARMUP_KIND]
        if rl:  # keep-last-1 would delete them, and RL's auto-resume would then pick this warm-up up
            raise ValueError(f"checkpoint.dir {root} holds RL checkpoints ({', '.join(rl)}): give the warm-up a "
                             "checkpoint.dir of its own")
        mgr = CheckpointManager(root, keep_last=1, rank=self.rank, barrier=self.policy.barrier)
        return mgr.save(step, lambda d: self.policy.save(d / "model", save_optimizer=False),
                        {"step": step, "kind": WARMUP_KIND, **extra, "config": config_record(self.cfg),
                         **export_record(self.cfg, self.hf_config)})


def main(argv: list[str]) -> int:
    """``megatron-amir sft CONFIG [key=value ...] --steps N --batch-size B [--target-accuracy A]``."""
    import argparse

    from megatron_amir.config import load_config

    p = argparse.ArgumentParser(prog="megatron-amir sft", description="supervised warm-up on the task's solutions")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="stop once accuracy (--target-metric) on --eval-problems validation problems reaches this")
    p.add_argument("--target-metric", choices=TARGET_METRICS, default="sampled",
                   help="the accuracy --target-accuracy applies to: greedy or sampled at the rollout temperature")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint (a trainer/warm-up step dir or a converted HF model dir); from "
                        "a warm-up checkpoint at step k the step count continues: k+1 ... k+STEPS")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if a.steps < 1:
        print("megatron-amir sft: --steps must be >= 1", file=sys.stderr)
        return 2
    cfg.train.steps = a.steps  # the LR schedule spans the warm-up's steps, not the RL config's train.steps
    runner = WarmupRunner(cfg)
    runner.start_from(a.init_from)
    last = run_sft(runner, a.steps, a.batch_size, a.eval_every, a.target_accuracy, a.eval_problems,
                   start=runner.start_step, target_metric=a.target_metric)
    stop = {"target_accuracy": a.target_accuracy, "target_metric": a.target_metric,
            "eval_problems": a.eval_problems, "step_budget": runner.start_step + a.steps}
    path = runner.save(int(last["sft/steps"]), {"final": last, "stop": stop})
    if runner.rank == 0:
        log.info("warm-up checkpoint: %s (%s)", path, ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    return 0
