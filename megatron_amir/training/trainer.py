"""The AMIR-GRPO trainer: one loop, readable top to bottom.

    sample prompts -> rollouts (G per prompt) -> rewards -> (dynamic sampling) -> old/ref log-probs
    -> advantages + AMIR pair coefficients -> PPO epochs x minibatches of the Megatron train step
    -> weight sync to the rollout engine -> (eval) -> (checkpoint)

Rollouts, rewards and the engine live on global rank 0; the rollout batch is broadcast as tensors and each
data-parallel rank trains on a contiguous slice of whole groups. With ``rollout.async_off_policy`` a producer
thread on rank 0 generates the next steps' batches while the trainer trains (``async_rollouts.py``: the schedule,
the staleness bound). Everything the loop keeps between steps (model, optimizer, scheduler, RNG of every rank, data
cursor, lambda, step, weight version, the count of consecutive non-finite updates, the async batches that a resume
could not regenerate) is in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron_amir.config import Config, config_record, dump_config
from megatron_amir.convert.hf_to_mcore import hf_to_mcore
from megatron_amir.convert.megatron_side import META_NAME, read_meta
from megatron_amir.training.async_rollouts import (IN_FLIGHT_FILE, RolloutProducer, load_in_flight, off_policy_metrics,
                                                   save_in_flight, staleness_metrics)
from megatron_amir.training.checkpoint import REFERENCE_DIR, WARMUP_KIND, CheckpointManager
from megatron_amir.training.metrics import RL_KIND, MetricsLogger, summary_line
from megatron_amir.training.preemption import REQUEUE_EXIT_CODE, install_handlers  # 75: slurm/*.sbatch requeue on it
from megatron_amir.training.rollout_batch import RolloutBatch, broadcast_rollout_batch, build_rollout_batch
from megatron_amir.rollout.engine import push_weight_buckets

log = logging.getLogger("megatron_amir.trainer")

INTERRUPT_EXIT_CODE = 130


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """Parts, built in ``__init__`` in the order of the story (one line each)."""

    cfg: Config
    rank: int
    world_size: int
    tokenizer: Any  # megatron_amir.data.tokenizer.Tokenizer
    sampler: Any  # megatron_amir.data.dataset.PromptSampler over training problems
    test_problems: list
    reward_fn: Any  # megatron_amir.rewards.RewardFn
    policy: Any  # megatron_amir.training.policy.Policy
    ref_policy: Any  # a frozen Policy, only when KL or reference-anchored pairs need it
    engine: Any  # megatron_amir.rollout Engine (rank 0 only)
    producer: Optional[RolloutProducer]  # rank 0 with rollout.async_off_policy: owns the engine between steps
    amir_state: Any  # megatron_amir.algorithms.AmirState
    checkpointer: CheckpointManager
    metrics: MetricsLogger

    def __init__(self, cfg: Config, init_from: Optional[str] = None):
        self.cfg = cfg
        self.step = 0
        self.weight_version = 0
        self._nonfinite_in_a_row = 0
        self._in_flight: list = []  # async batches restored from the checkpoint (rank 0)
        # distributed (torchrun / Slurm env or a single process) and Megatron parallel state
        from megatron_amir.training.parallel import initialize_distributed

        self.dist_info = initialize_distributed(cfg)
        self.rank = self.dist_info.rank
        self.world_size = self.dist_info.world_size
        _setup_logging(cfg, self.rank)
        # seeds (Megatron's model-parallel RNG tracker is seeded by initialize_distributed)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # data: tokenizer, prompts, held-out problems, reward function
        from megatron_amir.training.data_setup import bind_vocab, build_data

        self.tokenizer, self.sampler, self.test_problems = build_data(cfg)
        bind_vocab(cfg, self.tokenizer)
        from megatron_amir.rewards import get_reward_fn

        self.reward_fn = get_reward_fn(cfg.reward.name, cfg.reward) if self.rank == 0 else None
        # policy: Megatron-Core model chunks + DDP + optimizer + LR schedule
        from megatron_amir.training.policy import Policy

        gbs = cfg.train.global_batch_size or cfg.rollout_batch_size
        self.policy = Policy(cfg, updates_per_step=cfg.algorithm.ppo_epochs * (cfg.rollout_batch_size // gbs))
        _check_minibatch_layout(gbs, self.policy.dp_size, cfg.rollout.group_size)
        # reference policy only when needed (KL on, or reference-anchored pairs)
        self.ref_policy = None
        self._needs_ref = cfg.algorithm.kl_coef > 0 or (
            cfg.algorithm.amir.enabled and cfg.algorithm.amir.reference_anchored
        )
        # AMIR lambda state (checkpointed)
        from megatron_amir.algorithms import AmirState

        self.amir_state = AmirState.from_config(cfg.algorithm.amir)
        # checkpointer and metrics
        self.checkpointer = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last, rank=self.rank,
                                              barrier=self.policy.barrier)
        self.metrics = MetricsLogger(cfg.logging.dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                                     enabled=self.rank == 0)
        # resume (or initialize from a warm-up checkpoint), then the reference policy: the run's STARTING weights
        self.reference: Optional[dict] = None  # where those weights live; recorded in every checkpoint
        self._hf_base: Optional[dict] = None  # the source model's HF config.json (token ids, ...), if known
        resumed = self._resume()
        if not resumed:
            init_from = starting_checkpoint(cfg, self.rank, self.policy.barrier, init_from)
            if init_from:
                self._hf_base = load_starting_weights(self.policy, cfg, init_from)
        # the HF config of these weights: the rollout engine runs it, and checkpoints record it for export
        from megatron_amir.training.data_setup import rollout_hf_config

        self.hf_config = rollout_hf_config(cfg, self.tokenizer, base=self._hf_base)
        if self._needs_ref:
            self.ref_policy = self._reference_policy(resumed, init_from)
        # rollout engine (colocated embedded engine or the remote fleet) with the current weights
        weights = self._hf_weights()  # collective: every rank takes part in the gather
        if self.rank == 0 and cfg.rollout.fp8_rollout:  # every engine gets FP8 rollout layout (rollout.fp8)
            from megatron_amir.rollout.fp8 import fp8_named_tensors

            weights = dict(fp8_named_tensors(weights))
        self.engine = self._build_engine(weights) if self.rank == 0 else None
        self.producer = self._start_producer(weights) if self.rank == 0 and cfg.rollout.async_off_policy else None
        if self.rank == 0:
            Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.logging.dir) / "config.yaml").write_text(dump_config(cfg))

    # ------------------------------------------------------------------------------------------ parts
    def _build_engine(self, weights: dict):
        hf_config = self.hf_config
        rc = self.cfg.rollout
        if rc.engine == "embedded":
            from megatron_amir.rollout.embedded import EmbeddedEngine

            engine = EmbeddedEngine(hf_config, weights, logprobs_mode=rc.logprobs_mode,
                                    version=self.weight_version, rollback=rc.weight_sync_rollback)
        elif rc.engine == "remote":
            from megatron_amir.rollout.client import FleetEngine

            engine = FleetEngine.from_config(rc, hf_config=hf_config, sync_dir=self._sync_dir())
            engine.load_weights(weights, self.weight_version)
        else:  # vllm, colocated
            from megatron_amir.rollout.vllm_engine import VLLMEngine

            if torch.cuda.is_available():  # vLLM sizes its share from the free memory: give back what the gather cached
                torch.cuda.empty_cache()

            engine = VLLMEngine.from_config(rc, hf_config=hf_config, named_tensors=weights, version=self.weight_version)
        return engine

    def _start_producer(self, weights: dict) -> RolloutProducer:
        """Asynchronous rollouts from here on; the batches saved with the resumed checkpoint come first."""
        if self.weight_version != self.step:  # the schedule need(s) = s - k counts versions in steps
            raise RuntimeError(f"async rollouts need weight_version == step, got {self.weight_version} != {self.step}")
        self._consumed_cursor = self.sampler.state_dict()  # what a checkpoint records as the data cursor
        if self._in_flight:
            self.sampler.load_state_dict(self._in_flight[-1].sampler_state)
        return RolloutProducer(self.engine, self.collect_rollouts, self.sampler.state_dict,
                               max_staleness=self.cfg.rollout.max_staleness, first_step=self.step,
                               last_step=self.cfg.train.steps, version=self.weight_version, weights=weights,
                               restored=self._in_flight)

    def _sync_dir(self) -> str:
        return self.cfg.rollout.weight_sync_dir or str(Path(self.cfg.logging.dir) / "weights")

    def _sync_weights(self, load: Callable[[Any, Any, int], Any] = push_weight_buckets) -> None:
        """Stream the new weights bucket by bucket out of the sharded model (collective: every rank fills its part
        of each bucket) into the engine (``load(engine, stream, version)``: ``push_weight_buckets``, or the
        sleeping engine's wake-up order from ``_engine_to_sleep``); the asynchronous producer keeps whole versions,
        so it gets them collected. FP8 rollouts: rank 0 quantizes each bucket as it comes (``Fp8Buckets``)."""
        stream = self.policy.weight_stream(vocab_size=self.cfg.model.real_vocab_size,
                                           bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 2**20)
        if self.rank == 0 and self.cfg.rollout.fp8_rollout:
            from megatron_amir.rollout.fp8 import Fp8Buckets

            stream = Fp8Buckets(stream)
        if self.rank == 0 and self.producer is not None:
            self.producer.publish(self.weight_version, stream.collect())
        elif self.rank == 0:
            load(self.engine, stream, self.weight_version)
        else:
            stream.drain()

    def _engine_to_sleep(self) -> Callable[[Any, Any, int], Any]:
        """The colocated engine's memory around the training phase (rank 0, rollout.vllm_sleep_level > 0): called
        after the rollouts, it puts the engine to sleep (vLLM's sleep mode: the KV cache dropped, the weights
        offloaded to host memory at level 1, dropped at level 2) so training gets the GPU memory; the weight sync then
        loads through the returned function, which wakes the engine in the order sleep mode needs: the weights
        first, the update into them (level 2 left them empty), then the KV cache, ready for the next rollouts.
        Without sleep mode (or on other ranks): the plain bucketed load."""
        level = self.cfg.rollout.vllm_sleep_level
        if self.rank != 0 or not level:
            return push_weight_buckets
        self.engine.sleep(level)

        def wake_with_update(engine, stream, version: int) -> Any:
            if torch.cuda.is_available():  # the blocks training cached go back to the driver, for vLLM to map again
                torch.cuda.empty_cache()
            engine.wake_up(["weights"])
            out = push_weight_buckets(engine, stream, version)
            engine.wake_up(["kv_cache"])
            return out

        return wake_with_update

    def _hf_weights(self):
        """HF-named tensors of the current policy, padding rows dropped (collective; rank 0 gets them)."""
        return self.policy.full_hf_state_dict(vocab_size=self.cfg.model.real_vocab_size)

    def _reference_policy(self, resumed: bool, init_from: Optional[str]):
        """The frozen reference policy π_ref = the weights this run started from, also after a resume.

        A fresh run takes a frozen copy of its starting weights and records where they live: the
        ``--init-from`` checkpoint, or (random init) a model-only copy saved once as ``<checkpoint.dir>/reference``.
        A resumed run loads the reference from that record, not from the resumed weights (which would reset
        the KL anchor at every preemption).
        """
        if self.policy.lora_modules:  # LoRA: π_ref = the frozen base, adapters off; no copy to save or load
            self.reference = {"source": "lora_base", "path": None}
            return self.policy.frozen_copy()
        root = Path(self.cfg.checkpoint.dir)
        if resumed and self.reference is None:
            log.warning("the resumed checkpoint records no reference policy (saved without KL or reference-anchored "
                        "pairs, or by an older version): the resumed weights become the reference from now on")
        if not resumed or self.reference is None:
            if init_from and not resumed:
                self.reference = {"source": "init_from", "path": str((Path(init_from) / "model").resolve())}
            else:
                saved = root / REFERENCE_DIR
                if self.rank == 0 and saved.exists():  # a stale copy from an earlier fresh start in this directory
                    shutil.rmtree(saved)
                self.policy.barrier()
                self.policy.save(saved, save_optimizer=False)  # collective; tmp dir + rename inside
                self.reference = {"source": "initial" if not resumed else f"step {self.step}", "path": REFERENCE_DIR}
            return self.policy.frozen_copy(offload=self.cfg.algorithm.reference_offload)
        # a relative path is relative to the root the resumed checkpoint was saved in (which may be another run's)
        saved_root = self._resumed_from.parent
        path = Path(self.reference["path"])
        path = path if path.is_absolute() else saved_root / path
        if saved_root.resolve() != root.resolve():  # later checkpoints here must still find it
            self.reference = {**self.reference, "path": str(path.resolve())}
        if not path.is_dir():
            raise FileNotFoundError(f"reference policy weights not found at {path} (recorded in the checkpoint as "
                                    f"{self.reference}); restore them, or start a fresh run (checkpoint.resume=none)")
        frozen = self.policy.frozen_copy(offload=self.cfg.algorithm.reference_offload)
        frozen.load(path)
        log.info("reference policy loaded from %s", path)
        return frozen

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> int:
        """Run until ``train.steps``; returns the process exit code."""
        cfg = self.cfg
        self._install_signal_handlers()
        pbar = _progress(self.rank == 0 and cfg.logging.progress, cfg.train.steps, self.step)
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.step += 1
                self.metrics.log(self.step, metrics)
                if self.rank == 0:
                    log.info(summary_line(self.step, cfg.train.steps, metrics))
                    pbar.update(1)
                if cfg.eval.interval and self.step % cfg.eval.interval == 0:
                    self.metrics.log(self.step, self.evaluate(tag="eval"))
                stop = self._should_stop()
                if stop is not None:
                    self.save()
                    self.policy.barrier()  # no rank leaves while another still writes its shard
                    code = INTERRUPT_EXIT_CODE if stop == signal.SIGINT else REQUEUE_EXIT_CODE
                    log.warning("signal %d: checkpointed step %d, exiting with %d", stop, self.step, code)
                    return code
                if self.step % cfg.checkpoint.save_interval == 0 or self.step == cfg.train.steps:
                    self.save()
        finally:
            pbar.close()
            self.metrics.close()
        return 0

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        # 1) rollouts + rewards on rank 0 (generated now, or ahead by the async producer), shared as tensors; no
        # sample older than rollout.max_staleness versions is trained on (every rank checks, so all stop together)
        batch, rollout_metrics = self._next_rollouts() if self.rank == 0 else (None, {})
        load_weights = self._engine_to_sleep()  # colocated vLLM: its GPU memory goes to training until the sync
        batch = broadcast_rollout_batch(batch)
        staleness = staleness_metrics(batch.weight_version, self.weight_version, cfg.rollout.max_staleness)
        t_rollout = time.perf_counter() - t0
        # 2) old (and reference) log-probs recomputed by the Megatron model: pi_old == pi_theta now (async: the
        # proximal policy of the decoupled objective; the engine's log-probs are the behaviour policy's, TIS-weighted)
        old_logp = self.policy.compute_logprobs(batch.tokens, temperature=cfg.rollout.temperature)
        ref_logp = (self.ref_policy.compute_logprobs(batch.tokens, temperature=cfg.rollout.temperature)
                    if self.ref_policy is not None else None)
        t_logp = time.perf_counter() - t0 - t_rollout
        # (with algorithm.kl_in_reward, prepare_batch subtracts the KL penalty itself; pairs use the raw rewards)
        # 3) this data-parallel rank's whole groups
        rows = self.policy.data_parallel_rows(batch.num_sequences, cfg.rollout.group_size)
        # 4) PPO epochs x minibatches, one optimizer step each
        from megatron_amir.algorithms import prepare_batch

        updates: list[dict[str, float]] = []
        gbs = (cfg.train.global_batch_size or batch.num_sequences) // self.policy.dp_size
        for epoch in range(cfg.algorithm.ppo_epochs):
            for start in range(0, rows.numel(), gbs):
                idx = rows[start : start + gbs]
                # implicit rewards s_i are exact from old_logp only on the first update of a rollout batch;
                # later minibatches / epochs get a fresh no-grad forward of the current policy
                # (collective over DP, so every rank recomputes the whole batch and takes its rows). Without
                # AMIR they would only feed the pair diagnostics: those then use old_logp, saving the forward.
                fresh = None
                if (epoch > 0 or start > 0) and cfg.algorithm.amir.enabled:
                    fresh = self.policy.compute_logprobs(batch.tokens, temperature=cfg.rollout.temperature)[idx]
                prepared = prepare_batch(
                    rewards=batch.rewards[idx], group_ids=batch.group_ids[idx], response_mask=batch.response_mask[idx],
                    old_logp=old_logp[idx], cfg=cfg.algorithm, amir_state=self.amir_state,
                    ref_logp=None if ref_logp is None else ref_logp[idx],
                    rollout_logp=batch.rollout_logp[idx] if cfg.algorithm.tis_cap else None,
                    dp_group=self.policy.dp_group, policy_logp=fresh,
                    pair_metrics=True,  # GRPO runs measure the pair statistics too (lambda stays 0 there)
                )
                out = self.policy.train_step(batch.tokens[idx], prepared, temperature=cfg.rollout.temperature)
                if out.get("update_successful", 1.0):  # a skipped update (non-finite, fp16 overflow) never
                    self.amir_state = prepared.amir_state  # happened: only an applied one moves λ
                self._check_finite(out)
                updates.append({**{f"amir/{k}" if not k.startswith(("adv", "kl", "amir", "pg")) else k: v
                                   for k, v in prepared.metrics.items()}, **out})
        step_metrics = combine_update_metrics(updates, updates_per_epoch=len(updates) // cfg.algorithm.ppo_epochs)
        t_train = time.perf_counter() - t0 - t_rollout - t_logp
        # 5) weight sync: the engine samples the next step from the new weights (async: the producer loads them when
        # its schedule reaches this version)
        self.weight_version += 1
        self._sync_weights(load_weights)
        t_sync = time.perf_counter() - t0 - t_rollout - t_logp - t_train
        # rollout-vs-trainer log-prob mismatch (synchronous: same weights and temperature, so ~0; asynchronous: also
        # the staleness of the behaviour policy)
        m = batch.response_mask
        diff = (old_logp - batch.rollout_logp).abs() * m
        ntok = m.sum().clamp(min=1)
        dt = time.perf_counter() - t0
        return {
            **rollout_metrics,
            **step_metrics,
            **staleness,
            **off_policy_metrics(old_logp, batch.rollout_logp, m, cfg.algorithm.tis_cap),
            "mismatch/logp_abs_mean": float(diff.sum() / ntok),
            "mismatch/logp_abs_max": float(diff.max()),
            "time/rollout_s": t_rollout, "time/logprob_s": t_logp, "time/train_s": t_train,
            "time/weight_sync_s": t_sync, "time/step_s": dt,
            "throughput/tokens_per_s": float(m.sum() / dt),
            "weight_version": self.weight_version,
        }

    # ------------------------------------------------------------------------------------------ rollouts
    def _next_rollouts(self) -> tuple[RolloutBatch, dict[str, float]]:
        """This step's batch (rank 0): generated now, or taken from the async producer (waiting for it: the
        trainer's idle time)."""
        if self.producer is None:
            return self.collect_rollouts()
        produced, waited = self.producer.get(self.step)
        self._consumed_cursor = produced.sampler_state
        return produced.batch, {**produced.metrics, "time/trainer_idle_s": waited}

    def collect_rollouts(self, step: Optional[int] = None) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate G samples per prompt for ``step`` (default: the current one) and score them (rank 0), with the
        weights the engine holds. The request seeds depend only on (train.seed, step, round). With dynamic
        sampling, groups whose rewards are all equal are replaced by fresh prompts for up to
        ``max_sampling_rounds`` rounds; the batch is then filled with the best remaining groups so its size stays
        fixed (zero-variance groups add no gradient)."""
        from megatron_amir.rollout.engine import SamplingParams

        cfg = self.cfg
        step = self.step if step is None else step
        G, P = cfg.rollout.group_size, cfg.data.prompts_per_step
        params = SamplingParams.from_rollout_config(cfg.rollout, stop_token_ids=[self.tokenizer.eos_id])
        kept, spare, rounds, timeouts = [], [], 0, 0
        while len(kept) < P:
            rounds += 1
            problems = self.sampler.next_batch(P - len(kept))
            prompts = [self.tokenizer.encode(p.prompt) for p in problems]
            groups = self.engine.generate(prompts, params.replace(seed=cfg.train.seed * 100003 + step * 131 + rounds),
                                          n=G)
            # one reward call for the whole round, so a verifier pool works on all samples in parallel
            texts = [self.tokenizer.decode(s.token_ids) for g in groups for s in g.samples]
            res = self.reward_fn(texts, [p.answer for p in problems for _ in range(G)])
            _check_rewards(res.rewards, texts, problems, G, cfg.reward.name)
            timeouts += res.timeouts
            for i, (prob, prompt, grp) in enumerate(zip(problems, prompts, groups)):
                rw, ok = res.rewards[i * G : (i + 1) * G], res.correct[i * G : (i + 1) * G]
                entry = (prob, prompt, grp, rw, ok)
                varied = len(set(rw)) > 1
                (kept if varied or not cfg.train.dynamic_sampling else spare).append(entry)
            if not cfg.train.dynamic_sampling or rounds >= cfg.train.max_sampling_rounds:
                break
        kept = (kept + spare)[:P]
        prompts_, responses, logps, gids, rewards, correct, trunc, versions = [], [], [], [], [], [], [], []
        for gi, (prob, prompt, grp, rw, ok) in enumerate(kept):
            for s, r, c in zip(grp.samples, rw, ok):
                prompts_.append(prompt)
                responses.append(s.token_ids)
                logps.append(s.logprobs)
                gids.append(gi)
                rewards.append(r)
                correct.append(c)
                trunc.append(s.finish_reason == "length")
                versions.append(s.weight_version)
        batch = build_rollout_batch(prompts_, responses, logps, gids, rewards, correct, trunc, versions,
                                    pad_id=self.tokenizer.pad_id)
        return batch, _rollout_metrics(batch, G, rounds, timeouts)

    def close(self) -> None:
        """Release the rollout engine (a fleet client's threads and router, vLLM's workers), the reward
        function's worker pool and the metrics writers. Idempotent; ``main`` calls it however training ends."""
        from megatron_amir.rollout.engine import close_engine

        producer, self.producer = getattr(self, "producer", None), None
        if producer is not None:  # it uses the engine and the reward function
            producer.close()
        engine, self.engine = self.engine, None
        reward_fn, self.reward_fn = self.reward_fn, None
        try:
            if engine is not None:
                close_engine(engine)
        finally:
            try:
                if reward_fn is not None:
                    reward_fn.close()
            finally:
                self.metrics.close()

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, tag: str = "eval") -> dict[str, float]:
        """Held-out evaluation on rank 0: ``eval.samples`` samples per problem at ``eval.temperature`` (pass@k,
        maj@k, lengths, log-prob margins; results in ``eval/<tag>_stepN.jsonl``) and, with ``eval.greedy``,
        greedy accuracy (``eval/greedy/<tag>_stepN.jsonl``)."""
        if self.rank != 0:
            return {}
        from megatron_amir.eval.runner import evaluate

        ec = self.cfg.eval
        problems = self.test_problems[: ec.max_problems] if ec.max_problems else self.test_problems
        out_dir = Path(self.cfg.logging.dir) / "eval"
        # the rollout engine's log-prob mode is what the results' margins are computed from: record it
        kw = dict(max_new_tokens=ec.max_new_tokens or self.cfg.rollout.max_new_tokens, seed=self.cfg.train.seed,
                  batch_size=64, progress=self.cfg.logging.progress,
                  meta={"logprobs_mode": self.cfg.rollout.logprobs_mode, "engine": self.cfg.rollout.engine,
                        "step": self.step})
        # async: the producer lends the engine with the current weights between two of its batches
        with self.producer.engine() if self.producer is not None else nullcontext(self.engine) as engine:
            summary = evaluate(engine, self.tokenizer, problems, self.reward_fn, samples=ec.samples,
                               temperature=ec.temperature, out_path=out_dir / f"{tag}_step{self.step:06d}.jsonl", **kw)
            metrics = {f"{tag}/{k}": v for k, v in summary.metrics().items()}
            if ec.greedy:
                greedy = evaluate(engine, self.tokenizer, problems, self.reward_fn, samples=1, temperature=0.0,
                                  out_path=out_dir / "greedy" / f"{tag}_step{self.step:06d}.jsonl", **kw)
                metrics[f"{tag}/greedy_accuracy"] = greedy.pass_at_k[1]
        log.info("%s at step %d: %s", tag, self.step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoint
    def save(self) -> Path:
        from megatron_amir.training.data_setup import export_record

        producer = getattr(self, "producer", None)
        in_flight = producer.in_flight(self.step) if producer is not None else []
        meta = {
            "step": self.step,
            "weight_version": self.weight_version,
            "amir_state": self.amir_state.state_dict(),
            # the cursor after the last batch trained on (async: the producer's own runs ahead)
            "sampler": self._consumed_cursor if producer is not None else self.sampler.state_dict(),
            # a resumed run keeps counting towards train.max_consecutive_nonfinite (a run that keeps diverging
            # must not get a fresh allowance at every preemption)
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "world_size": self.world_size,
            "config": config_record(self.cfg),
            "reference": self.reference,
            **export_record(self.cfg, self.hf_config),
        }

        def write(d: Path) -> None:
            self.policy.save(d / "model")
            torch.save(_rng_state(), d / f"rng_rank{self.rank:05d}.pt")
            if producer is not None:  # async batches sampled with older weights than these (rank 0)
                save_in_flight(d / IN_FLIGHT_FILE, in_flight, self.cfg.rollout.max_staleness)

        path = self.checkpointer.save(self.step, write, meta)
        if self.rank == 0:
            log.info("saved checkpoint %s", path)
        return path

    def _resume(self) -> bool:
        rc = self.cfg.checkpoint.resume
        if rc == "none":
            return False
        ckpt = self.checkpointer.latest_good() if rc == "auto" else Path(rc)
        if ckpt is None:
            return False
        meta = CheckpointManager.read_meta(ckpt)
        if meta.get("kind") == WARMUP_KIND:
            raise ValueError(f"{ckpt} is a warm-up (sft) checkpoint, not an RL one: start RL from it with "
                             f"--init-from {ckpt} and a checkpoint.dir of its own")
        self._resumed_from = ckpt
        self.policy.load(ckpt / "model", load_optimizer=True)
        self.step = int(meta["step"])
        self.weight_version = int(meta["weight_version"])
        self.amir_state.load_state_dict(meta["amir_state"])
        self.sampler.load_state_dict(meta["sampler"])
        self._nonfinite_in_a_row = int(meta.get("nonfinite_in_a_row", 0))  # absent in older checkpoints
        self.reference = meta.get("reference")
        self._hf_base = meta.get("hf_config")
        if self.rank == 0 and self.cfg.rollout.async_off_policy:
            self._in_flight = load_in_flight(ckpt / IN_FLIGHT_FILE, self.cfg.rollout.max_staleness)
        rng = ckpt / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file() and meta.get("world_size") == self.world_size:
            _set_rng_state(torch.load(rng, weights_only=True))
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?): continuing with fresh RNG", self.rank, ckpt)
        self.metrics.truncate_after(self.step, kind=RL_KIND)  # a warm-up's rows in the same file stay
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # ------------------------------------------------------------------------------------------ safety
    def _install_signal_handlers(self) -> None:
        """SIGUSR1/SIGTERM (Slurm preemption) and SIGINT (Ctrl-C) only set a flag; between steps all ranks
        agree (preemption.should_stop all-reduces it) to checkpoint and exit after the same step."""
        self._preemption = install_handlers((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))

    def _should_stop(self) -> Optional[int]:
        if not self._preemption.should_stop():
            return None
        return self._preemption.received or signal.SIGUSR1  # another rank got it

    def _check_finite(self, out: dict[str, float]) -> None:
        if all(math.isfinite(float(out.get(k, 0.0))) for k in ("loss", "grad_norm")):
            self._nonfinite_in_a_row = 0
            return
        if out.get("loss_scale_overflow") and math.isfinite(float(out.get("loss", 0.0))):
            # fp16: the loss scaler found an overflow, skipped this update and lowered the scale (routine early on)
            log.info("fp16 loss-scale overflow: update skipped, loss scale now %g", out.get("loss_scale", float("nan")))
            return
        self._nonfinite_in_a_row += 1
        log.error("non-finite loss or gradient at step %d (update skipped by the optimizer); %d in a row",
                  self.step + 1, self._nonfinite_in_a_row)
        if self._nonfinite_in_a_row >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self._nonfinite_in_a_row} consecutive optimizer updates with a non-finite loss or gradient norm "
                f"(train.max_consecutive_nonfinite={self.cfg.train.max_consecutive_nonfinite}); last: {out}"
            )


# ---------------------------------------------------------------------------------------------- helpers
_COUNT_METRICS = ("num_sequences", "num_tokens", "num_groups", "zero_variance_groups", "pair_count")
_LAST_METRICS = ("lambda",)


def combine_update_metrics(updates: list[dict[str, float]], updates_per_epoch: int) -> dict[str, float]:
    """One metrics row for a step's optimizer updates (PPO epochs × minibatches).

    Sizes of the rollout batch (``_COUNT_METRICS``, any prefix) are summed over the first epoch's
    minibatches, λ is its value after the last update, everything else is the mean over updates of its
    finite values (NaN if none is finite, e.g. pair accuracy when no update had pairs). Adds
    ``train/updates``.
    """
    out: dict[str, float] = {}
    keys = dict.fromkeys(k for u in updates for k in u)
    for k in keys:
        base = k.rsplit("/", 1)[-1]
        if base in _COUNT_METRICS:
            out[k] = sum(float(u[k]) for u in updates[:updates_per_epoch] if k in u)
            continue
        vals = [float(u[k]) for u in updates if k in u]
        if base in _LAST_METRICS:
            out[k] = vals[-1]
        else:
            finite = [v for v in vals if math.isfinite(v)]
            out[k] = sum(finite) / len(finite) if finite else float("nan")
    out["train/updates"] = float(len(updates))
    return out


def _check_rewards(rewards, texts, problems, G: int, reward_name: str) -> None:
    """Every reward must be a finite number: name the first bad one (problem id, sample, response excerpt)."""
    if len(rewards) != len(texts):
        raise RuntimeError(f"reward '{reward_name}' returned {len(rewards)} rewards for {len(texts)} responses")
    for i, r in enumerate(rewards):
        try:
            ok = math.isfinite(float(r))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            excerpt = texts[i][:120].replace("\n", " ")
            raise RuntimeError(f"reward '{reward_name}' returned {r!r} for sample {i % G} of problem "
                               f"{getattr(problems[i // G], 'id', i // G)!r} (response starts {excerpt!r}); "
                               f"rewards must be finite numbers")


def _rollout_metrics(b: RolloutBatch, G: int, rounds: int, timeouts: int) -> dict[str, float]:
    r = b.rewards.view(-1, G)
    lens = b.response_len.float()
    c = b.correct
    out = {
        "reward/mean": float(b.rewards.mean()),
        "reward/accuracy": float(c.float().mean()),
        "reward/zero_variance_groups": float((r.std(dim=1) == 0).float().sum()),
        "reward/verifier_timeouts": float(timeouts),
        "response/length_mean": float(lens.mean()),
        "response/truncated_frac": float(b.truncated.float().mean()),
        "rollout/sampling_rounds": float(rounds),
    }
    if c.any():
        out["response/length_correct"] = float(lens[c].mean())
    if (~c).any():
        out["response/length_incorrect"] = float(lens[~c].mean())
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.long)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, 624, 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                file=sys.stderr, dynamic_ncols=True)


def _setup_logging(cfg: Config, rank: int) -> None:
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, cfg.logging.level), format=fmt, datefmt="%H:%M:%S", force=True)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)


def _init_from_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a checkpoint ``--init-from`` can load (a trainer step dir or a converted model
    directory: ``model/`` holding a Megatron dist checkpoint), or None."""
    if not path.is_dir():
        return "no such directory"
    model = path / "model"
    if not (model / "metadata.json").is_file():
        hint = " (a Hugging Face model: convert it with `megatron-amir convert hf-to-mcore` first)" \
            if (path / "config.json").is_file() else ""
        return f"{model}/metadata.json not found: not a Megatron checkpoint directory{hint}"
    return None


def starting_checkpoint(cfg: Config, rank: int, barrier: Any, init_from: Optional[str] = None) -> Optional[str]:
    """The checkpoint a fresh run starts from: ``--init-from``, else ``model.load``, else ``model.hf_path``
    converted once into ``<checkpoint.dir>/init`` (rank 0; reused while it holds a conversion of the same
    directory); None = random init. Collective when it converts."""
    init_from = init_from or cfg.model.load
    if init_from or not cfg.model.hf_path:
        return init_from
    from megatron_amir.training.model_checkpoint import broadcast_from_rank0

    hf_path, target = cfg.model.hf_path, Path(cfg.checkpoint.dir) / "init"
    error = ""
    if rank == 0:
        try:
            meta_file = target / META_NAME
            done = meta_file.is_file() and json.loads(meta_file.read_text()).get("source", {}).get(
                "hf_dir") == str(Path(hf_path).absolute())
            if not done:
                if target.exists():
                    shutil.rmtree(target)
                log.info("converting model.hf_path %s -> %s (once)", hf_path, target)
                par = cfg.parallel
                hf_to_mcore(hf_path, target, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                            dtype=cfg.model.params_dtype)
        except Exception as exc:  # noqa: BLE001 - every rank must stop with the same message
            error = f"model.hf_path={hf_path}: {type(exc).__name__}: {exc}"
    error = broadcast_from_rank0(error)
    if error:
        raise ValueError(error)
    barrier()
    return str(target)


def load_starting_weights(policy: Any, cfg: Config, path: str) -> Optional[dict]:
    """Check that ``cfg.model`` describes checkpoint ``path``, load its weights into ``policy`` (not its optimizer
    state) and return the source model's HF config, if the checkpoint records one."""
    meta = read_meta(Path(path))
    check_same_architecture(cfg.model, meta["model"], path)
    log.info("initializing the policy from %s", path)
    policy.load(Path(path) / "model", load_optimizer=False)
    return meta.get("hf_config")


_ARCH_FIELDS = ("arch", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_kv_heads", "kv_channels", "rope_theta", "rope_scaling", "norm_eps", "tie_word_embeddings",
                "use_qkv_bias", "use_qk_norm")


def check_same_architecture(cfg_model: Any, ckpt_model: dict, source: str) -> None:
    """The configured model must be the checkpoint's: a different rope_theta, eps, head size or tying loads
    without a shape error and silently changes every logit."""
    from megatron_amir.config import ModelConfig

    ckpt = ModelConfig(**{k: v for k, v in ckpt_model.items() if k in ModelConfig.model_fields})
    diff = [f"{k}: config {getattr(cfg_model, k)!r}, checkpoint {getattr(ckpt, k)!r}" for k in _ARCH_FIELDS
            if (getattr(cfg_model, k) or None) != (getattr(ckpt, k) or None)]
    if diff:
        raise ValueError(f"the model section does not describe the checkpoint {source}: " + "; ".join(diff)
                         + " (copy these values from the checkpoint's megatron_amir_model.json / meta.json)")


def _check_minibatch_layout(global_batch: int, dp: int, group_size: int) -> None:
    """Each rank trains ``global_batch / dp`` rows per optimizer step; they must be whole groups, or the
    advantages, zero-variance flags and pairs of a split group would be computed on its halves."""
    if global_batch % (dp * group_size):
        raise ValueError(
            f"train.global_batch_size={global_batch} must be a multiple of data-parallel size {dp} x "
            f"rollout.group_size {group_size} = {dp * group_size}: each rank's share of an optimizer step must be "
            "whole groups (advantages and AMIR pairs are computed per group)")


def main(argv: list[str]) -> int:
    """``megatron-amir train CONFIG [key=value ...] [--init-from CKPT]``."""
    import argparse

    from megatron_amir.config import load_config

    p = argparse.ArgumentParser(prog="megatron-amir train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--init-from", default=None, help="checkpoint directory to start from (not resumed: step 0)")
    p.add_argument("--eval-at-start", action="store_true", help="evaluate the starting weights (tag 'initial')")
    p.add_argument("--eval-at-end", action="store_true", help="evaluate the final weights (tag 'final')")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)  # bad configs fail here, before any work
    init_from = a.init_from or cfg.model.load
    if init_from:  # and so does a wrong --init-from / model.load (not after minutes of model building)
        problem = _init_from_problem(Path(init_from))
        if problem:
            print(f"megatron-amir train: {'--init-from' if a.init_from else 'model.load'} {init_from}: {problem}",
                  file=sys.stderr)
            return 2
    trainer = Trainer(cfg, init_from=a.init_from)
    evals = MetricsLogger(cfg.logging.dir, name="eval.jsonl", tensorboard=False, enabled=trainer.rank == 0)
    try:
        if a.eval_at_start and trainer.step == 0:
            evals.log(0, trainer.evaluate(tag="initial"))
        code = trainer.train()
        if code == 0 and a.eval_at_end:
            evals.log(trainer.step, trainer.evaluate(tag="final"))
        return code
    finally:
        evals.close()
        trainer.close()
