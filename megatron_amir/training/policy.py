"""The trained policy: Megatron-Core GPT model chunks + DDP + optimizer + LR schedule, and the RL step.

Used by the trainer through a small API:

    policy = Policy(cfg)
    logp = policy.compute_logprobs(tokens[N, L])            # [N, L-1] fp32, no grad, on every rank
    metrics = policy.train_step(tokens[n, L], prepared)     # one optimizer step over this DP rank's rows
    policy.save(dir) / policy.load(dir)                     # dist_checkpointing (torch_dist), reshardable
    policy.full_state_dict()                                # full Megatron-named tensors on rank 0

Batch layout: rows are right-padded; attention is causal, so padding on the right never changes the
hidden state of an earlier position, and no attention mask beyond causal is needed. Position ids are
0..L-1. logp[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1]).

Loss reduction: the algorithm's micro-batch losses are *summed* over micro-batches and DP ranks to
give the exact total loss (see megatron_amir.algorithms.micro_batch_loss). Megatron by default divides
each micro-batch loss by num_microbatches and DP gradients by the DP size. We set
``calculate_per_token_loss=True`` (the schedule then leaves the loss alone and DDP sums gradients
across DP instead of averaging) and install a ``finalize_model_grads_func`` that performs the usual
DP/embedding gradient reductions but drops the per-token divisor. The equality tests in
tests/test_policy*.py check that gradients equal those of the summed loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_amir.config import Config
from megatron_amir.model.builder import build_gpt_model, choose_transformer_impl, transformer_config
from megatron_amir.model.compat import apply_cpu_compat
from megatron_amir.model.logprobs import vocab_parallel_logprobs
from megatron_amir.training.parallel import ParallelInfo, init_parallel

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any, Any], tuple[torch.Tensor, dict]]


def _default_loss_fn() -> LossFn:
    from megatron_amir.algorithms import micro_batch_loss  # owner A

    return micro_batch_loss


# stats of micro_batch_loss that are sums (the rest are per-token means); see algorithms.batch
SUMMED_STATS = ("pg_loss", "kl_loss", "pair_term", "num_tokens")


def _accepts_kwarg(fn, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


class Policy:
    """Megatron-Core policy for RL; see the module docstring."""

    def __init__(self, cfg: Config, *, loss_fn: Optional[LossFn] = None, train: bool = True,
                 updates_per_step: int = 1):
        apply_cpu_compat()
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        self.cfg = cfg
        self._loss_fn = loss_fn
        self.trainable = train
        # distributed groups + seeds
        self.info: ParallelInfo = init_parallel(cfg.parallel, cfg.train.seed)
        # where the model lives: Megatron creates parameters on torch.cuda.current_device() (set from
        # LOCAL_RANK by init_parallel) on GPU
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        m = cfg.model
        if m.vocab_size % self.info.tp_size:
            raise ValueError(
                f"model.vocab_size={m.vocab_size} must be divisible by TP={self.info.tp_size} "
                "(pad the vocabulary in the model config)"
            )
        self.impl = choose_transformer_impl(m)
        # model: this rank's pipeline stage
        self.config = transformer_config(m, cfg.parallel, impl=self.impl)
        module = build_gpt_model(
            m, cfg.parallel,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            config=self.config,
        )
        # LoRA: base frozen, adapters on the targeted layers; only they get gradients and optimizer state
        self.lora_modules: list[str] = []
        if cfg.lora.enabled:
            from megatron_amir.model.lora import apply_lora

            self.lora_modules = apply_lora(module, cfg.lora, seed=cfg.train.seed)
        if self.config.bf16 or self.config.fp16:
            module = Float16Module(self.config, module)
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.model = [DistributedDataParallel(self.config, self.ddp_config, module)]
        for chunk in self.model:
            chunk.broadcast_params()  # identical replicas across DP ranks

        # sum (not average) micro-batch and DP gradients; see module docstring
        def _finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
            return finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

        self.config.finalize_model_grads_func = _finalize
        self.config.no_sync_func = self.model[0].no_sync
        # optimizer + LR schedule
        t = cfg.train
        self.optimizer = None
        self.scheduler = None
        if train:
            opt_cfg = OptimizerConfig(
                optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
                bf16=self.config.bf16, fp16=self.config.fp16, params_dtype=self.config.params_dtype,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            )
            self.optimizer = get_megatron_optimizer(opt_cfg, self.model)
            self.config.grad_scale_func = self.optimizer.scale_loss
            # train.steps and lr_warmup_steps count RL steps; the schedule advances once per optimizer update
            # (updates_per_step = ppo_epochs x minibatches per rollout batch), so it is sized in updates
            warmup = t.lr_warmup_steps * updates_per_step
            decay_steps = max(t.steps * updates_per_step, warmup + 1)
            self.scheduler = OptimizerParamScheduler(
                self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
                lr_warmup_steps=warmup, lr_decay_steps=decay_steps,
                lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
                wd_incr_steps=decay_steps, wd_incr_style="constant",
            )
        self.num_steps = 0

    # ------------------------------------------------------------------------------------ properties
    @property
    def dp_size(self) -> int:
        return self.info.dp_size

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def rank(self) -> int:
        return self.info.rank

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    @property
    def loss_fn(self) -> LossFn:
        if self._loss_fn is None:
            self._loss_fn = _default_loss_fn()
        return self._loss_fn

    def data_parallel_rows(self, num_sequences: int, group_size: int) -> torch.Tensor:
        """Row indices of this DP rank: whole groups (rows g*G..g*G+G-1), split contiguously."""
        if num_sequences % group_size:
            raise ValueError(f"num_sequences={num_sequences} is not a multiple of group_size={group_size}")
        groups = num_sequences // group_size
        if groups % self.dp_size:
            raise ValueError(
                f"{groups} groups cannot be split evenly over data-parallel size {self.dp_size} "
                "(data.prompts_per_step must be a multiple of the DP size)"
            )
        per = groups // self.dp_size * group_size
        start = self.info.dp_rank * per
        return torch.arange(start, start + per)

    # ------------------------------------------------------------------------------------ forward
    def _forward_backward(self, tokens: torch.Tensor, micro_batch_size: int, loss_func_for, forward_only: bool):
        """Run Megatron's schedule over micro-batches of ``tokens``; returns the last stage's store."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n, L = tokens.shape
        if L < 2:
            raise ValueError(f"sequences need at least 2 tokens, got L={L}")
        mbs = max(1, min(micro_batch_size, n))
        if n % mbs and self.info.pp_size > 1:
            raise ValueError(
                f"{n} rows are not a multiple of micro_batch_size={mbs}; pipeline stages exchange fixed-shape "
                "activations (train.micro_batch_size must divide the per-DP-rank batch)"
            )
        starts = list(range(0, n, mbs))
        position_ids = torch.arange(L, dtype=torch.long).unsqueeze(0)
        batches = iter([(s, min(n, s + mbs)) for s in starts])

        def forward_step(data_iterator, model):
            s, e = next(data_iterator)
            tok = tokens[s:e]
            out = model(tok, position_ids.expand(e - s, L), None)
            return out, loss_func_for(s, e, tok)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=self.model,
            num_microbatches=len(starts),
            seq_length=L,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    def _token_logprobs(self, logits: torch.Tensor, tok: torch.Tensor, temperature: float, with_entropy: bool):
        """logits [b, L, V_local] (vocab-sharded) -> logp [b, L-1] fp32 (+ entropy [b, L-1]).

        The logits are passed whole (a contiguous [b*L, V_local] view, no copy; slicing off the last
        position first would copy them) with a dummy in-vocabulary target for the last position, whose
        result is dropped; temperature is applied per fp32 chunk inside the log-prob function.
        """
        targets = torch.cat([tok[:, 1:], tok[:, :1]], dim=1)
        lp, ent = vocab_parallel_logprobs(
            logits, targets, tp_group=self.tp_group, chunk_size=self.cfg.train.logprob_chunk_size,
            with_entropy=with_entropy, temperature=temperature, valid_vocab=self.cfg.model.real_vocab_size,
        )
        return lp[:, :-1], (ent[:, :-1] if ent is not None else None)

    def _broadcast_from_last_stage(self, t: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.info.pp_size == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=self.device)
        t = t.to(self.device).contiguous()
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return t

    @torch.no_grad()
    def compute_logprobs(
        self, tokens: torch.Tensor, micro_batch_size: Optional[int] = None, temperature: float = 1.0,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """logp[N, L-1] (fp32, no grad) on every rank.

        Rows are split over DP ranks, each rank runs the pipeline forward on its rows, and the result is
        broadcast from the last PP stage and all-gathered across DP. ``lengths`` is accepted for API
        symmetry and unused: right padding cannot change earlier positions under causal attention.
        """
        del lengths
        tokens = tokens.long().to(self.device)
        N, L = tokens.shape
        mbs = micro_batch_size or self.cfg.train.micro_batch_size
        dp, r = self.dp_size, self.info.dp_rank
        per = math.ceil(N / dp)
        mine = tokens[r * per : min(N, (r + 1) * per)]
        mbs = min(mbs, per)
        padded = math.ceil(per / mbs) * mbs if self.info.pp_size > 1 else per
        if mine.shape[0] < padded:  # equal shapes for the DP all-gather and the pipeline's fixed shapes
            pad = tokens[:1].expand(padded - mine.shape[0], L)
            mine = torch.cat([mine, pad]) if mine.shape[0] else pad.clone()
        for chunk in self.model:
            chunk.eval()
        out: dict[int, torch.Tensor] = {}

        def loss_func_for(s, e, tok):
            def loss_func(logits):
                out[s] = self._token_logprobs(logits, tok, temperature, False)[0].float()
                return (torch.zeros((), dtype=torch.float32, device=self.device),
                        torch.zeros((), dtype=torch.int, device=self.device), {})

            return loss_func

        self._forward_backward(mine, mbs, loss_func_for, forward_only=True)
        for chunk in self.model:
            chunk.train()
        local = torch.cat([out[k] for k in sorted(out)])[:per] if self.info.is_last_stage else None
        local = self._broadcast_from_last_stage(local, (per, L - 1), torch.float32)
        if dp > 1:
            parts = [torch.empty_like(local) for _ in range(dp)]
            dist.all_gather(parts, local, group=self.dp_group)
            local = torch.cat(parts)
        return local[:N].cpu()

    # ------------------------------------------------------------------------------------ train
    def train_step(self, tokens: torch.Tensor, prepared, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on this DP rank's rows ``tokens[n, L]`` with their ``prepared`` batch.

        Micro-batches of train.micro_batch_size rows; each contributes loss_fn(logp, prepared.select(rows))
        and the losses SUM (over micro-batches and DP ranks) to the step's total loss.
        Returns metrics (identical on every rank): loss (the global total), grad_norm, lr, entropy (mean
        over response tokens), update_successful, and the loss function's stats: SUMMED_STATS summed over
        micro-batches and DP ranks, the others averaged over all response tokens.
        """
        if self.optimizer is None:
            raise RuntimeError("this Policy was built with train=False")
        tokens = tokens.long().to(self.device)
        if hasattr(prepared, "to"):
            prepared = prepared.to(self.device)
        n, L = tokens.shape
        T = L - 1
        mask = getattr(prepared, "response_mask", None)
        if mask is not None and tuple(mask.shape) != (n, T):
            raise ValueError(f"prepared.response_mask has shape {tuple(mask.shape)}, expected {(n, T)} for tokens {(n, L)}")
        loss_fn = self.loss_fn
        pass_entropy = _accepts_kwarg(loss_fn, "entropy")
        acfg = self.cfg.algorithm
        sums: dict[str, torch.Tensor] = {}
        counts = {"mb": 0}

        def acc(key, v):
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(v).detach().double().sum()

        def loss_func_for(s, e, tok):
            def loss_func(logits):
                logp, ent = self._token_logprobs(logits, tok, temperature, True)
                mb = prepared.select(slice(s, e))
                loss, stats = loss_fn(logp, mb, acfg, **({"entropy": ent} if pass_entropy else {}))
                with torch.no_grad():
                    m = mb.response_mask
                    m = torch.ones_like(logp) if m is None else m.to(logp.dtype)
                    ntok = m.sum()
                    acc("loss", loss)
                    acc("entropy_sum", ent * m)
                    acc("tokens", ntok)
                    for k, v in (stats or {}).items():
                        if k in SUMMED_STATS:  # loss terms and counts add up over micro-batches and ranks
                            acc("sum/" + k, v)
                        else:  # per-token means: weight by this micro-batch's response tokens
                            acc("wsum/" + k, torch.as_tensor(v).double() * ntok)
                counts["mb"] += 1
                # num_tokens = 0: our finalize wrapper ignores it; the loss is already the exact sum term
                return loss, torch.zeros((), dtype=torch.int, device=self.device), {}

            return loss_func

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._forward_backward(tokens, self.cfg.train.micro_batch_size, loss_func_for, forward_only=False)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this update uses (the schedule moves after it)
        # fp16's dynamic loss scaler must see an overflow itself (it then lowers the scale and skips the update)
        if self.config.fp16 or self._grads_finite():
            update_successful, grad_norm, _ = self.optimizer.step()
        else:
            # the fp32 and bf16 Megatron optimizers have no inf/nan check (only fp16's loss scaler does): a
            # non-finite gradient would reach Adam and turn every weight into NaN. Skip the update, as Megatron
            # does on an fp16 overflow; the trainer counts skipped steps (train.max_consecutive_nonfinite).
            self.optimizer.zero_grad()
            update_successful, grad_norm = False, float("nan")
        if update_successful:  # as Megatron's training loop: a skipped update does not advance the LR schedule
            self.scheduler.step(increment=1)
        self.num_steps += 1
        out = self._reduce_metrics(sums, counts["mb"], update_successful, grad_norm, lr)
        if self.config.fp16:
            out["loss_scale"] = float(self.optimizer.get_loss_scale())
            out["loss_scale_overflow"] = float(not update_successful)
        return out

    def _grads_finite(self) -> bool:
        """True when every gradient of every rank is finite (collective: all ranks agree on skipping)."""
        grads = []
        for chunk in self.model:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    grads.append(torch.isfinite(g).all())
        ok = torch.stack(grads).all().float() if grads else torch.ones((), device=self.device)
        ok = ok.reshape(1).to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _reduce_metrics(self, sums, n_mb, update_successful, grad_norm, lr: float) -> dict[str, float]:
        keys = ["loss", "entropy_sum", "tokens"] + sorted(k for k in sums if k.startswith(("sum/", "wsum/")))
        vec = None
        if self.info.is_last_stage:
            vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys] + [float(n_mb)], dtype=torch.float64,
                               device=self.device)
            n_stats = torch.tensor([len(keys)], dtype=torch.long, device=self.device)
        else:
            n_stats = torch.tensor([0], dtype=torch.long, device=self.device)
        if self.info.pp_size > 1:  # key list lengths agree on every stage (stats names come from the last)
            from megatron.core import parallel_state as ps

            dist.broadcast(n_stats, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        vec = self._broadcast_from_last_stage(vec, (int(n_stats) + 1,), torch.float64)
        if self.dp_size > 1:
            dist.all_reduce(vec, group=self.dp_group)
        names = keys if self.info.is_last_stage else None
        if self.info.pp_size > 1:
            obj = [names]
            from megatron.core import parallel_state as ps

            dist.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
            names = obj[0]
        vec = vec.cpu()
        vals = dict(zip(names, vec[:-1].tolist()))
        total_mb = max(1.0, vec[-1].item())
        out = {
            "loss": vals["loss"],
            "entropy": vals["entropy_sum"] / max(1.0, vals["tokens"]),
            "response_tokens": vals["tokens"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "update_successful": float(bool(update_successful)),
            "num_microbatches": total_mb,
        }
        for k in names:
            if k.startswith("sum/"):
                out[k[len("sum/"):]] = vals[k]
            elif k.startswith("wsum/"):
                out.setdefault(k[len("wsum/"):], vals[k] / max(1.0, vals["tokens"]))
        return out

    # ------------------------------------------------------------------------------------ state
    def modules(self) -> list:
        """The unwrapped GPTModel chunks of this rank."""
        return [_unwrap(c) for c in self.model]

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full (TP- and PP-gathered) tensors named as in a TP=PP=1 GPTModel's state_dict, on rank 0.

        Collective: every rank must call it; other ranks get None.
        """
        from megatron_amir.training.model_checkpoint import gather_full_state_dict

        return gather_full_state_dict(self.modules())

    def weight_stream(self, vocab_size: Optional[int] = None, bucket_bytes: int = 256 * 1024**2, **kwargs):
        """HF-named weights bucket by bucket on rank 0 (``training.weight_stream.WeightStream``; LoRA adapters merged,
        W + s B A, which the engines run). vocab_size: the tokenizer's vocabulary, to drop padding rows (None keeps
        all). Collective: every rank builds it and iterates it to the end."""
        from megatron_amir.training.weight_stream import WeightStream

        scaling = None
        if self.lora_modules:
            from megatron_amir.model.lora import lora_scaling

            scaling = lora_scaling(self.cfg.lora.rank, self.cfg.lora.alpha)
        return WeightStream(self.modules(), self.cfg.model, bucket_bytes=bucket_bytes, vocab_size=vocab_size,
                            lora_scaling=scaling, **kwargs)

    def full_hf_state_dict(self, vocab_size: Optional[int] = None) -> Optional[dict[str, torch.Tensor]]:
        """Every HF-named tensor on rank 0, collected from ``weight_stream`` (a whole-model copy on rank 0: for
        consumers that keep the weights, e.g. the asynchronous producer). Collective; other ranks get None."""
        return self.weight_stream(vocab_size).collect()

    def save(self, path, *, save_optimizer: bool = True) -> None:
        from megatron_amir.training.model_checkpoint import save_checkpoint

        save_checkpoint(self, Path(path), save_optimizer=save_optimizer and self.optimizer is not None)

    def load(self, path, *, load_optimizer: bool = True) -> None:
        from megatron_amir.training.model_checkpoint import load_checkpoint

        load_checkpoint(self, Path(path), load_optimizer=load_optimizer and self.optimizer is not None)

    def frozen_copy(self, offload: bool = False) -> "FrozenPolicy":
        """A no-grad copy of the current weights (the reference policy), same parallel layout; ``offload``: its
        weights stay in host memory between log-prob passes (``FrozenPolicy``). With LoRA the reference is this
        model with its adapters off (``AdaptersOffReference``): no second copy, ``offload`` has nothing to move."""
        if self.lora_modules:
            from megatron_amir.model.lora import AdaptersOffReference

            return AdaptersOffReference(self)
        return FrozenPolicy(self, offload=offload)


class FrozenPolicy:
    """Reference policy: a second copy of this rank's model chunks (no optimizer), compute_logprobs only.

    Built as a fresh GPTModel with ``perform_initialization=False`` (no RNG draws, so the training
    streams are untouched) and loaded from the current weights; deepcopy is not an option because the
    modules hold process groups.

    ``offload=True`` keeps its weights in host memory (pinned when CUDA is present) and copies them to the
    device only for the duration of ``compute_logprobs``: the reference then costs no device memory during
    the train step, where the policy's weights, gradients and optimizer state peak (verl's ref
    ``param_offload``), at the price of one host-to-device copy of this rank's shard per step.
    """

    def __init__(self, policy: Policy, offload: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.module import Float16Module

        cfg_copy = copy.copy(policy.config)
        cfg_copy.no_sync_func = None
        cfg_copy.grad_scale_func = None
        cfg_copy.finalize_model_grads_func = None
        cfg_copy.perform_initialization = False
        module = build_gpt_model(
            policy.cfg.model, policy.cfg.parallel,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(), config=cfg_copy,
        )
        if cfg_copy.bf16 or cfg_copy.fp16:
            module = Float16Module(cfg_copy, module)
        _unwrap(module).load_state_dict(_unwrap(policy.model[0]).state_dict(), strict=True)
        module.eval()
        for prm in module.parameters():
            prm.requires_grad_(False)
        self._p = copy.copy(policy)
        self._p.config = cfg_copy
        self._p.model = [module]
        self._p.optimizer = None
        self._p.scheduler = None
        self.offload = offload
        self._host: list[tuple[torch.Tensor, torch.Tensor]] = []  # (module tensor, its host copy)
        if offload:
            self._to_host()

    def _tensors(self) -> list[torch.Tensor]:
        m = self._p.model[0]
        return list(m.parameters()) + [b for b in m.buffers() if b is not None]

    def _to_host(self) -> None:
        """Copy the weights to (pinned) host memory and point the module at the copies; the device memory is
        released when the device tensors are dropped here."""
        pin = torch.cuda.is_available()
        self._host = []
        for t in self._tensors():
            h = t.detach().to("cpu", copy=True)
            self._host.append((t, h.pin_memory() if pin else h))
        self._release()

    def _release(self) -> None:
        """Point the module at the host copies (dropping the device tensors)."""
        for t, h in self._host:
            t.data = h

    def _to_device(self) -> None:
        for t, h in self._host:
            t.data = h.to(self._p.device, non_blocking=True)

    @contextlib.contextmanager
    def _on_device(self):
        if not self.offload:
            yield
            return
        self._to_device()
        try:
            yield
        finally:
            self._release()

    def compute_logprobs(self, tokens, micro_batch_size=None, temperature: float = 1.0, lengths=None):
        with self._on_device():
            return self._p.compute_logprobs(tokens, micro_batch_size, temperature, lengths)

    def load(self, path) -> None:
        """Replace the weights with a policy checkpoint's (any saved TP/PP; its optimizer state is ignored)."""
        from megatron_amir.training.model_checkpoint import load_checkpoint

        if self.offload:  # load on the device, as the checkpoint loader expects, then offload the new weights
            self._to_device()
            self._host = []
        load_checkpoint(self._p, Path(path), load_optimizer=False)
        if self.offload:
            self._to_host()
