"""In-process rollout engine: the compact HF-family model of ``hf_model`` with a KV cache and batched
sampling. CPU default (colocated with the trainer), also runs on GPU.

One ``generate`` call expands every prompt into its ``n`` rows, left-pads the batch, runs one prefill
and then one incremental decode step per token. Finished rows are dropped from the batch (and the
cache) once a quarter of it has finished, so long stragglers do not pay for short rows.

Sampling follows vLLM's order: logits -> temperature -> top-k -> top-p -> sample; the log-prob reported
for each sampled token is selected by ``logprobs_mode`` (see ``engine.py``). Sampling is by inverse CDF
with one uniform number per row and step; a seeded request draws its numbers from its own generator
(seeded by (seed, prompt)) for all its n rows every step, so it gives the same samples whatever else
is in the batch.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from megatron_amir.rollout.engine import (
    LOGPROBS_MODES,
    GroupResult,
    NamedTensors,
    PerPromptParams,
    Sample,
    SamplingParams,
    expand_params,
    validate_prompts,
)
from megatron_amir.rollout.fp8 import Dequantizer, dequantized
from megatron_amir.rollout.hf_model import CausalLM


def filter_logits(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p filtering of temperature-scaled logits [B, V]; filtered entries become -inf.

    top_k[b] in 1..V (V = off): keep the tokens whose logit is at least the k-th largest (ties with the k-th
    are kept, as vLLM and HF do). top_p[b] in (0, 1]: after top-k, keep the smallest prefix of tokens sorted by
    probability whose mass reaches top_p, i.e. drop token j when the mass of the tokens strictly before it is
    already >= top_p (the most likely token is always kept); top_p = 1 drops nothing (a float32 cumulative sum
    can reach 1.0 before the tail).
    """
    V = scaled.shape[-1]
    if bool((top_k >= V).all()) and bool((top_p >= 1).all()):
        return scaled
    sorted_vals, order = scaled.sort(dim=-1, descending=True)
    kth = sorted_vals.gather(1, (top_k.clamp(min=1, max=V) - 1)[:, None])
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    probs = sorted_vals.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_vals)


def request_stream_seed(seed: int, prompt: Sequence[int]) -> int:
    """Seed of a request's noise stream: a hash of (seed, prompt tokens).

    Mixing in the prompt keeps one batch-wide seed from giving every prompt the same noise (correlated
    samples across prompts), while the same (seed, prompt, weights) still gives the same samples in any
    batch, in any process (the HTTP server and the colocated engine agree). Identical prompts with the
    same seed give identical samples, as in vLLM.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class IncompleteWeights(RuntimeError):
    """The engine's weights are a mix of two versions (an update stopped part-way); it serves nothing until a
    complete update has loaded."""


class EngineAsleep(RuntimeError):
    """The engine's memory was released (``sleep``) and not taken back for what was asked (``wake_up``)."""


SLEEP_TAGS = ("weights", "kv_cache")


def _save_previous(tensors: list, params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Host copies of the parameters (``params``, by HF name) that ``tensors`` are about to overwrite, each once per
    update."""
    for name, _ in tensors:
        if name in params and name not in saved:
            saved[name] = params[name].detach().to("cpu", copy=True)


class _Request:
    """Book-keeping of one prompt's n rows during a generate call."""

    __slots__ = ("index", "params", "generator")

    def __init__(self, index: int, params: SamplingParams, generator: Optional[torch.Generator]):
        self.index, self.params, self.generator = index, params, generator


class EmbeddedEngine:
    """Engine running in this process. ``hf_config``: the HF config.json dict; ``named_tensors``: HF-named
    weights (None = keep the random init, mostly for tests); ``logprobs_mode``: processed_logprobs |
    raw_logprobs; ``seed``: seed of the generator used by requests without their own seed;
    ``max_batch_rows``: most rows (prompts x n) decoded together, larger calls run in chunks of whole
    groups; ``rollback``: the default of ``load_weight_buckets``' rollback (rollout.weight_sync_rollback).

    FP8 rollouts (``rollout.fp8_rollout``): weights may arrive in FP8 rollout layout (e4m3 ``<layer>.weight`` plus its
    ``weight_scale_inv``, ``rollout.fp8``) on every route (constructor, ``load_weights``, ``load_weight_buckets``, so
    also the HTTP server's snapshot and broadcast updates); each pair is dequantized into the layer's float weight, so
    the engine samples from the same weights vLLM's FP8 layers hold (simulated FP8: the activations stay unquantized,
    unlike vLLM's dynamic 1×128 activation quantization)."""

    def __init__(
        self,
        hf_config: Mapping[str, Any],
        named_tensors: Optional[NamedTensors] = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        logprobs_mode: str = "processed_logprobs",
        version: int = 0,
        seed: Optional[int] = None,
        max_batch_rows: int = 512,
        rollback: bool = True,
    ):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.hf_config = dict(hf_config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.logprobs_mode = logprobs_mode
        self.max_batch_rows = int(max_batch_rows)
        self.rollback = bool(rollback)  # load_weight_buckets' default (rollout.weight_sync_rollback)
        self.model = CausalLM(self.hf_config).to(device=self.device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self._version = int(version)
        self.incomplete_update: Optional[str] = None  # why the weights are a mix of two versions (see load_weight_buckets)
        self._asleep: set[str] = set()  # sleep mode: the tags (SLEEP_TAGS) whose memory is released
        self._sleeping: list[tuple[torch.Tensor, int, Optional[torch.Tensor]]] = []  # (parameter, bytes, host copy)
        self.weights_discarded = False  # sleep(2) dropped the weights: nothing is served until an update loaded
        self._lock = threading.RLock()  # one generate or weight load at a time
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed if seed is not None else torch.seed())
        self.tokens_generated = 0
        if named_tensors is not None:
            self.model.load_hf_state_dict(dequantized(named_tensors))

    @classmethod
    def from_hf_dir(cls, path: str | Path, **kwargs) -> "EmbeddedEngine":
        """Load ``config.json`` and every ``*.safetensors`` of an HF model directory."""
        return cls(*read_hf_dir(path), **kwargs)

    # ------------------------------------------------------------------ Engine protocol
    @property
    def version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def load_weights(self, named_tensors: NamedTensors, version: int, strict: bool = True) -> None:
        """Replace the weights (HF names) and set the version; waits for a running generate to finish."""
        with self._lock:
            self._check_awake("weights", "load weights")
            self.model.load_hf_state_dict(dequantized(named_tensors), strict=strict)
            if strict:
                self.incomplete_update = None
                self.weights_discarded = False
            self._version = int(version)

    def load_weight_buckets(self, buckets: Iterable[Any], version: int, rollback: Optional[bool] = None) -> int:
        """Load a whole update that arrives bucket by bucket (``training.weight_stream.Bucket``s or lists of
        (name, tensor)), each bucket copied in place before the next one is taken, so no second copy of the
        weights exists on the engine's device; returns the number of tensors. Every expected weight must arrive.

        An update that stops part-way (the sender died, a bucket was refused or is missing) keeps the previous
        version label. ``rollback`` (None: the engine's own setting, rollout.weight_sync_rollback): before a weight is
        overwritten its previous value is copied to host memory (one model copy at most), and on a failure those
        copies go back, so the engine serves the previous version as before. Without it the weights are a mix of two
        versions and ``generate`` refuses to run (``incomplete_update`` says why) until a complete update has loaded."""
        with self._lock:
            self._check_awake("weights", "load weights")
            loaded: set[str] = set()
            keep = self.rollback if rollback is None else rollback
            saved: Optional[dict[str, torch.Tensor]] = {} if keep else None
            params = dict(self.model.named_parameters(remove_duplicate=False)) if keep else {}
            before = self.incomplete_update
            fp8 = Dequantizer()  # an FP8 weight and its scale may come in two buckets
            try:
                for bucket in buckets:
                    tensors = list(fp8(bucket.tensors if hasattr(bucket, "tensors") else bucket))
                    if saved is not None:
                        _save_previous(tensors, params, saved)
                    names = self.model.load_hf_state_dict(tensors, strict=False, refresh=False)
                    if names:
                        self.incomplete_update = f"update to version {int(version)} stopped part-way"
                    loaded.update(names)
                    del tensors, bucket
                fp8.finish()
                self.model.refresh_fused()  # once, for the fused q/k/v and gate/up copies the buckets left stale
                missing = self.model.expected_names() - loaded
                if missing:
                    raise KeyError(f"missing weights: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
            except BaseException as exc:
                if saved:
                    self._restore_previous(params, saved)
                    self.incomplete_update = before
                elif self.incomplete_update:
                    self.incomplete_update += f": {type(exc).__name__}: {exc}"
                raise
            self.incomplete_update = None
            self.weights_discarded = False
            self._version = int(version)
            return len(loaded)

    @torch.no_grad()
    def _restore_previous(self, params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
        for name, t in saved.items():
            params[name].copy_(t)
        self.model.refresh_fused()

    # ------------------------------------------------------------------ sleep mode (vLLM's, same semantics)
    def sleep(self, level: int = 1) -> None:
        """Release the weights' memory and the KV cache, as vLLM's sleep mode: level 1 copies the weights to host
        memory first (``wake_up`` puts them back), level 2 discards them (after ``wake_up(["weights"])`` they hold
        nothing until an update has loaded). While asleep, ``generate`` and weight loads raise ``EngineAsleep``."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        with self._lock:
            if self._asleep:
                raise EngineAsleep(f"sleep({level}) while {sorted(self._asleep)} still asleep")
            params = {id(p): p for p in self.model.parameters()}.values()  # tied weights once
            self._sleeping = [(p, p.untyped_storage().nbytes(), p.detach().to("cpu", copy=True) if level == 1
                               else None) for p in params]
            for p, _, _ in self._sleeping:
                p.data.untyped_storage().resize_(0)
            self.model.release_fused()
            self._asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take the memory of ``tags`` ("weights", "kv_cache"; None = both) back. After a level-2 sleep the woken
        weights are uninitialized: load an update into them before waking the KV cache and generating."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(SLEEP_TAGS))
        if unknown:
            raise ValueError(f"wake_up tags must be among {SLEEP_TAGS}, got {unknown}")
        with self._lock:
            if "weights" in tags and "weights" in self._asleep:
                with torch.no_grad():
                    for p, nbytes, host in self._sleeping:
                        p.data.untyped_storage().resize_(nbytes)
                        if host is not None:
                            p.copy_(host)
                self.weights_discarded = any(host is None for _, _, host in self._sleeping)
                self._sleeping = []
                self.model.refresh_fused()
                self._asleep.discard("weights")
            if "kv_cache" in tags:
                self._asleep.discard("kv_cache")

    @property
    def asleep(self) -> tuple[str, ...]:
        """The tags whose memory is released (empty when awake)."""
        return tuple(t for t in SLEEP_TAGS if t in self._asleep)

    def _check_servable(self) -> None:
        self._check_awake("weights", "generate")
        self._check_awake("kv_cache", "generate")
        if self.weights_discarded:
            raise IncompleteWeights("sleep(2) discarded the weights and no update has loaded since")
        if self.incomplete_update:
            raise IncompleteWeights(f"weights of no single version ({self.incomplete_update}); waiting for a complete "
                                    f"update")

    def _check_awake(self, tag: str, what: str) -> None:
        if tag in self._asleep:
            raise EngineAsleep(f"cannot {what}: the engine's {tag} are asleep; wake_up([{tag!r}]) first")

    def set_version(self, version: int) -> None:
        """Relabel the current weights (vLLM's /update_weight_version); waits for a running generate."""
        with self._lock:
            self._version = int(version)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: PerPromptParams,
        n: int = 1,
        request_ids: Optional[Sequence[str]] = None,
    ) -> list[GroupResult]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = validate_prompts(prompts, self.vocab_size)
        plist = expand_params(params, len(prompts))
        if request_ids is None:
            request_ids = [uuid.uuid4().hex for _ in prompts]
        limit = self.model.args.max_position_embeddings
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            if len(p) + sp.max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}]: prompt length {len(p)} + max_new_tokens {sp.max_new_tokens} exceeds "
                    f"max_position_embeddings={limit}"
                )
        results: list[GroupResult] = []
        per_chunk = max(1, self.max_batch_rows // n)
        with self._lock:  # the weights' state is checked under the lock: an update may be running until now
            self._check_servable()
            for s in range(0, len(prompts), per_chunk):
                groups = self._generate_chunk(prompts[s : s + per_chunk], plist[s : s + per_chunk], n)
                for j, samples in enumerate(groups):
                    results.append(GroupResult(list(prompts[s + j]), samples, request_id=str(request_ids[s + j])))
        return results

    # ------------------------------------------------------------------ internals
    def _generate_chunk(self, prompts: list[list[int]], plist: list[SamplingParams], n: int) -> list[list[Sample]]:
        dev, V = self.device, self.vocab_size
        reqs = []
        for i, sp in enumerate(plist):
            g = None
            if sp.seed is not None and not sp.greedy:
                g = torch.Generator(device=dev)
                g.manual_seed(request_stream_seed(sp.seed, prompts[i]))
            reqs.append(_Request(i, sp, g))
        B = len(prompts) * n
        row_req = torch.arange(len(prompts), device=dev).repeat_interleave(n)  # row -> request index
        plen = torch.tensor([len(p) for p in prompts], device=dev).repeat_interleave(n)
        P = int(plen.max())
        max_new = torch.tensor([sp.max_new_tokens for sp in plist], device=dev).repeat_interleave(n)
        temps = torch.tensor([sp.temperature for sp in plist], dtype=torch.float32, device=dev).repeat_interleave(n)
        greedy = temps == 0
        topk = torch.tensor([sp.top_k if sp.top_k > 0 else V for sp in plist], device=dev).repeat_interleave(n)
        topp = torch.tensor([sp.top_p for sp in plist], dtype=torch.float32, device=dev).repeat_interleave(n)
        # greedy rows: no temperature or filtering, so their processed log-prob is log_softmax(logits)
        temps = torch.where(greedy, torch.ones_like(temps), temps)
        topk = torch.where(greedy, torch.full_like(topk, V), topk)
        topp = torch.where(greedy, torch.ones_like(topp), topp)
        self._need_filter = bool((topk < V).any()) or bool((topp < 1).any())
        self._need_scale = bool((temps != 1).any())
        nstop = max([len(sp.stop_token_ids) for sp in plist] + [1])
        stops = torch.full((len(plist), nstop), -1, dtype=torch.long, device=dev)
        for i, sp in enumerate(plist):
            if sp.stop_token_ids:
                stops[i, : len(sp.stop_token_ids)] = torch.tensor(sp.stop_token_ids)
        stops = stops.repeat_interleave(n, dim=0)

        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        positions = torch.full((B, P), -1, dtype=torch.long, device=dev)
        for r in range(B):
            p = prompts[r // n]
            tokens[r, P - len(p) :] = torch.tensor(p)
            positions[r, P - len(p) :] = torch.arange(len(p))

        cache = self.model.new_cache(B, P + int(max_new.max()))
        logits = self.model(tokens, positions, cache, logits_rows="last")

        T = int(max_new.max())
        out_tok = torch.zeros(B, T, dtype=torch.long, device=dev)
        out_lp = torch.zeros(B, T, dtype=torch.float32, device=dev)
        out_len = torch.zeros(B, dtype=torch.long, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        alive = torch.arange(B, device=dev)  # original row index of each batch row
        live = torch.ones(B, dtype=torch.bool, device=dev)  # batch rows still generating
        version = self._version
        for step in range(T):
            tok, lp = self._sample(logits.float(), alive, row_req[alive], temps[alive], greedy[alive],
                                   topk[alive], topp[alive], reqs, n)
            li = live.nonzero().squeeze(1)
            rows = alive[li]
            out_tok[rows, step] = tok[li]
            out_lp[rows, step] = lp[li]
            out_len[rows] = step + 1
            hit = (tok[li, None] == stops[rows]).any(dim=1)
            stopped[rows] = hit
            live[li] = ~hit & (step + 1 < max_new[rows])
            n_live = int(live.sum())
            if n_live == 0:
                break
            if (len(alive) - n_live) * 4 >= len(alive):
                # drop finished rows from batch and cache; a few finished rows are cheaper to carry along
                keep = live.nonzero().squeeze(1)
                cache.select(keep)
                alive, tok, live = alive[keep], tok[keep], live[keep]
            pos = (plen[alive] + step)[:, None]
            logits = self.model(tok[:, None], pos, cache, logits_rows="last")
        self.tokens_generated += int(out_len.sum())

        groups: list[list[Sample]] = [[] for _ in prompts]
        out_tok_l, out_lp_l, out_len_l, stopped_l = out_tok.tolist(), out_lp.tolist(), out_len.tolist(), stopped.tolist()
        for r in range(B):
            L = out_len_l[r]
            groups[r // n].append(
                Sample(out_tok_l[r][:L], out_lp_l[r][:L], "stop" if stopped_l[r] else "length", version)
            )
        return groups

    def _sample(self, logits, alive, row_req, temps, greedy, topk, topp, reqs, n):
        """Sample one token per row; returns (tokens [b], log-probs [b] per ``logprobs_mode``).

        Inverse-CDF sampling: token = first j with cdf_j >= u * cdf_V, u ~ U(0, 1], cdf the cumulative
        sum of the (filtered) probabilities; equivalent to drawing from them, zero-probability tokens
        are never picked (their cdf equals the previous token's), and it needs one random number per
        row instead of one per vocabulary entry.
        """
        scaled = logits / temps[:, None] if self._need_scale else logits
        filtered = filter_logits(scaled, topk, topp) if self._need_filter else scaled
        probs = filtered.softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = self._uniform(alive, row_req, reqs, n)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp_(max=logits.shape[-1] - 1)
        if bool(greedy.any()):
            tok = torch.where(greedy, logits.argmax(dim=-1), tok)
        if self.logprobs_mode == "raw_logprobs":
            return tok, logits.gather(1, tok[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        # log of the sampled token's probability: one gather instead of a full log_softmax (float32
        # softmax has ~1e-7 relative error, so the log is accurate to ~1e-7 absolute)
        return tok, probs.gather(1, tok[:, None]).squeeze(1).log()

    def _uniform(self, alive, row_req, reqs, n):
        """U(0, 1] per row: seeded requests draw n numbers per step from their own generator (then the
        alive rows pick theirs), the other rows share the engine generator."""
        b = alive.shape[0]
        if all(rq.generator is None for rq in reqs):
            return 1.0 - torch.rand(b, generator=self._generator, device=alive.device)
        u = torch.empty(b, device=alive.device)
        seeded = torch.zeros(b, dtype=torch.bool, device=alive.device)
        for rq in reqs:
            if rq.generator is None:
                continue
            full = 1.0 - torch.rand(n, generator=rq.generator, device=alive.device)
            rows = (row_req == rq.index).nonzero().squeeze(1)
            if rows.numel():
                u[rows] = full[alive[rows] % n]
                seeded[rows] = True
        rest = (~seeded).nonzero().squeeze(1)
        if rest.numel():
            u[rest] = 1.0 - torch.rand(rest.numel(), generator=self._generator, device=alive.device)
        return u


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor of the ``*.safetensors`` files) of an HF model directory."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found (an HF model directory needs config.json)")
    hf_config = json.loads(cfg_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return hf_config, tensors
