"""Trainer-side client of a rollout fleet (our embedded servers or stock ``vllm serve``, same API).

``FleetClient`` (async) keeps what a router cannot know: every group (prompt x n samples) has a request
id and completes exactly once: retried with back-off on connection errors, timeouts, 5xx and 429
(the same request id and seed, so a retry reproduces the same samples when the weights are the same),
never on other 4xx; a late duplicate answer for a finished id is dropped and counted. Generation goes
through the router (``router_url``) or, in direct mode, straight to the servers (round robin with
fail-over; meant for one server). Weight updates fan out to every server directly, never through the
router, with vLLM's RLHF route sequence: pause(wait) -> start_weight_update -> update_weights ->
finish_weight_update -> update_weight_version -> resume (``update_route="collective_rpc"``: pause ->
collective_rpc load_snapshot -> reset_prefix_cache -> update_weight_version -> resume, for stock
``vllm serve`` members running our worker extension; our server answers both).

``FleetEngine`` wraps it as a synchronous ``Engine`` for the trainer: it owns the router process and the
discovery-file watcher, and ``load_weights`` writes a snapshot (weight_sync) and fans it out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import httpx

from megatron_amir.rollout.engine import (
    GroupResult,
    NamedTensors,
    PerPromptParams,
    Sample,
    SamplingParams,
    expand_params,
    validate_prompts,
)

log = logging.getLogger("megatron_amir.rollout.client")


class FleetError(RuntimeError):
    """A group that could not be completed, or a weight update that did not reach every server."""


class _Retryable(Exception):
    pass


@dataclass
class FleetStats:
    requests: int = 0  # HTTP attempts
    retries: int = 0
    groups_done: int = 0
    duplicates_dropped: int = 0
    errors: dict = field(default_factory=dict)  # reason -> count

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


def completion_body(prompt: list[int], sp: SamplingParams, n: int, model: Optional[str]) -> dict[str, Any]:
    """The /v1/completions body vLLM understands (TRL's async GRPO sends the same fields)."""
    body = {
        "prompt": prompt,
        "n": n,
        "max_tokens": sp.max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,  # -1 = off in every vLLM version
        "stop_token_ids": list(sp.stop_token_ids),
        "logprobs": 0,
        "return_token_ids": True,
        # vLLM started with --skip-tokenizer-init answers logprobs requests with a 400 ("Unable to get
        # tokenizer") unless the tokens in the log-prob record are token ids
        "return_tokens_as_token_ids": True,
        # explicit neutral values: a vLLM server started with --generation-config auto (its default) fills the
        # fields a request leaves unset from the served model's generation_config.json, and a penalty there would
        # make the processed log-probs differ from the trainer's
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0,
    }
    if sp.seed is not None:
        body["seed"] = int(sp.seed)
    if model:
        body["model"] = model
    return body


def parse_completion(resp: Mapping[str, Any], prompt: list[int], n: int, default_version: int, rid: str) -> GroupResult:
    """Turn a /v1/completions response for one prompt into a GroupResult; malformed answers raise
    _Retryable (a truncated or aborted answer from a dying server)."""
    choices = resp.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        raise _Retryable(f"expected {n} choices, got {None if choices is None else len(choices)}")
    top_version = resp.get("weight_version", default_version)
    samples = []
    for c in sorted(choices, key=lambda c: c.get("index", 0)):
        ids = c.get("token_ids")
        lps = (c.get("logprobs") or {}).get("token_logprobs")
        fr = c.get("finish_reason")
        if fr not in ("stop", "length"):
            raise _Retryable(f"finish_reason {fr!r}")
        if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
            raise _Retryable("choice without token_ids/logprobs of equal length (return_token_ids, logprobs=0)")
        version = int(c.get("weight_version", top_version))
        samples.append(Sample([int(t) for t in ids], [float(x) for x in lps], fr, version))
    return GroupResult(list(prompt), samples, request_id=rid)


class FleetClient:
    """Async client. ``router_url``: the vllm-router in front of the fleet (None: direct mode against
    ``servers``). ``servers``: every server's URL, used for weight-update fan-out (and for generation
    in direct mode). ``token``: bearer token of the state-changing routes."""

    def __init__(
        self,
        router_url: Optional[str] = None,
        servers: Sequence[str] = (),
        token: Optional[str] = None,
        timeout_s: float = 300.0,
        max_attempts: int = 8,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        concurrency: int = 64,
        progress: bool = False,
        model: Optional[str] = None,
        weight_version: int = 0,
        update_route: str = "update_weights",
    ):
        if update_route not in ("update_weights", "collective_rpc"):
            raise ValueError(f"update_route must be update_weights or collective_rpc, got {update_route!r}")
        self.update_route = update_route
        if router_url is None and not servers:
            raise ValueError("FleetClient needs router_url or at least one server URL")
        self.router_url = router_url.rstrip("/") if router_url else None
        self.servers = [s.rstrip("/") for s in servers]
        self.token, self.timeout_s = token, timeout_s
        self.max_attempts, self.backoff_s, self.max_backoff_s = max_attempts, backoff_s, max_backoff_s
        self.concurrency, self.progress, self.model = concurrency, progress, model
        self.weight_version = weight_version
        self.stats = FleetStats()
        self._rr = itertools.count()
        self._http: Optional[httpx.AsyncClient] = None

    # ---------------------------------------------------------------- plumbing
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            limits = httpx.Limits(max_connections=self.concurrency + 16, max_keepalive_connections=self.concurrency)
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0), limits=limits)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def set_servers(self, urls: Sequence[str]) -> None:
        """Replace the fan-out (and direct-mode) server list, e.g. from a discovery-file watcher."""
        self.servers = [u.rstrip("/") for u in urls]

    def _target(self) -> str:
        if self.router_url:
            return self.router_url
        if not self.servers:
            raise FleetError("direct mode: no servers left")
        return self.servers[next(self._rr) % len(self.servers)]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # ---------------------------------------------------------------- generation
    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: PerPromptParams,
        n: int = 1,
        request_ids: Optional[Sequence[str]] = None,
        desc: str = "rollout",
    ) -> list[GroupResult]:
        """One GroupResult per prompt, in order; raises FleetError if any group fails after retries."""
        from tqdm.auto import tqdm

        prompts = validate_prompts(prompts)
        plist = expand_params(params, len(prompts))
        rids = list(request_ids) if request_ids is not None else [uuid.uuid4().hex for _ in prompts]
        if len(rids) != len(prompts) or len(set(rids)) != len(rids):
            raise ValueError("request_ids must be unique, one per prompt")
        results: dict[str, GroupResult] = {}
        sem = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(prompts), desc=desc, unit="group", disable=not self.progress, leave=False)

        async def one(i: int) -> None:
            async with sem:
                g = await self._run_group(prompts[i], plist[i], n, rids[i])
            if rids[i] in results:  # exactly once: a second answer for the same id is dropped
                self.stats.duplicates_dropped += 1
                return
            results[rids[i]] = g
            self.stats.groups_done += 1
            bar.update(1)

        try:
            outcome = await asyncio.gather(*(one(i) for i in range(len(prompts))), return_exceptions=True)
        finally:
            bar.close()
        failed = [(rids[i], o) for i, o in enumerate(outcome) if isinstance(o, BaseException)]
        if failed:
            raise FleetError(f"{len(failed)} of {len(prompts)} groups failed; first: {failed[0][0]}: {failed[0][1]}")
        missing = [r for r in rids if r not in results]
        if missing:  # cannot happen unless the bookkeeping above is broken: fail loudly
            raise FleetError(f"groups without a result: {missing[:5]}")
        return [results[r] for r in rids]

    async def _run_group(self, prompt: list[int], sp: SamplingParams, n: int, rid: str) -> GroupResult:
        # vLLM answers n > 1 at temperature 0 with a 400 ("n must be 1 when using greedy sampling"), and so does
        # our server: greedy samples are all the same, so one is asked for and repeated n times
        ask = 1 if sp.greedy else n
        body = completion_body(prompt, sp, ask, self.model)
        last: Optional[str] = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.stats.retries += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(delay)
            url = self._target()
            self.stats.requests += 1
            try:
                r = await self.http().post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": rid})
                if r.status_code in (408, 429) or r.status_code >= 500:
                    raise _Retryable(f"HTTP {r.status_code} from {url}: {r.text[:200]}")
                if r.status_code >= 400:
                    raise FleetError(f"group {rid}: HTTP {r.status_code} from {url}: {r.text[:300]}")
                g = parse_completion(r.json(), prompt, ask, self.weight_version, rid)
                if ask != n:
                    s = g.samples[0]
                    g.samples = [Sample(list(s.token_ids), list(s.logprobs), s.finish_reason, s.weight_version)
                                 for _ in range(n)]
                return g
            except (httpx.TransportError, _Retryable, ValueError) as exc:  # ValueError: bad JSON
                last = f"{type(exc).__name__}: {exc}"
                self.stats.count_error(type(exc).__name__)
                log.info("group %s attempt %d failed: %s", rid, attempt + 1, last)
        raise FleetError(f"group {rid}: gave up after {self.max_attempts} attempts; last error: {last}")

    # ---------------------------------------------------------------- weight updates
    async def _post(self, url: str, path: str, json: Optional[dict] = None, params: Optional[dict] = None,
                    timeout: Optional[float] = None) -> dict:
        r = await self.http().post(f"{url}{path}", json=json, params=params, headers=self._auth(),
                                   timeout=timeout or self.timeout_s)
        if r.status_code >= 400:
            raise FleetError(f"{url}{path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else {}

    async def update_weights_from_snapshot(self, path: str | Path, version: int,
                                           skip_unreachable: bool = False) -> dict[str, str]:
        """Fan a snapshot (weight_sync.write_snapshot) out to every server; returns url -> 'ok' / error.

        ``skip_unreachable``: servers that refuse connections are dropped from the list instead of
        failing the update (a dead server will be replaced via the discovery file)."""
        if not self.servers:
            raise FleetError("no servers to update (servers list is empty)")
        servers = list(self.servers)
        report = await self.push_snapshot(path, version, servers)
        dead = [u for u, s in report.items() if s.startswith("unreachable")]
        bad = [u for u, s in report.items() if s != "ok" and not (skip_unreachable and u in dead)]
        if skip_unreachable and dead:
            log.warning("dropping unreachable servers %s", dead)
            self.servers = [u for u in self.servers if u not in dead]
        if bad:
            raise FleetError(f"weight update v{version} failed on {len(bad)} server(s): "
                             + "; ".join(f"{u}: {report[u]}" for u in bad))
        self.weight_version = int(version)
        return report

    async def push_snapshot(self, path: str | Path, version: int, servers: Sequence[str]) -> dict[str, str]:
        """Load a snapshot on ``servers`` (pause, load, version, resume each); returns url -> 'ok' /
        'unreachable: …' / 'error: …' and raises nothing. The client's own version and list are untouched."""
        info = {"path": str(Path(path).resolve()), "version": int(version)}

        async def one(url: str) -> str:
            try:
                await self._post(url, "/pause", params={"mode": "wait"})
            except httpx.ConnectError as exc:
                return f"unreachable: {exc}"
            try:
                if self.update_route == "update_weights":  # our embedded server's file backend
                    await self._post(url, "/start_weight_update", {"is_checkpoint_format": True})
                    await self._post(url, "/update_weights", {"update_info": info})
                    await self._post(url, "/finish_weight_update", {})
                else:  # stock vllm serve with vllm_worker.WeightSyncWorkerExtension
                    await self._post(url, "/collective_rpc", {"method": "load_snapshot",
                                                              "args": [info["path"], info["version"]]})
                    await self._post(url, "/reset_prefix_cache", {})
                await self._post(url, "/update_weight_version", {"new_version": str(int(version))})
                return "ok"
            finally:
                await self._resume(url)

        out = await asyncio.gather(*(one(u) for u in servers), return_exceptions=True)
        return {u: (o if isinstance(o, str) else f"error: {type(o).__name__}: {o}") for u, o in zip(servers, out)}

    async def _resume(self, url: str, attempts: int = 3) -> None:
        """POST /resume, again on a transport error: vLLM answers a worker exception in /collective_rpc with a
        500 and closes the connection, so the first /resume on the pooled connection can fail before it reaches
        the server, which would then stay paused for good."""
        for attempt in range(1, attempts + 1):
            try:
                await self._post(url, "/resume", {})
                return
            except httpx.TransportError as exc:
                if attempt == attempts:
                    log.warning("could not resume %s: %s", url, exc)
                    return
                await asyncio.sleep(0.1 * attempt)
            except (httpx.HTTPError, FleetError) as exc:
                log.warning("could not resume %s: %s", url, exc)
                return

    async def update_weights_broadcast(self, named_tensors: NamedTensors, version: int,
                                       master_address: str = "127.0.0.1", master_port: Optional[int] = None
                                       ) -> dict[str, str]:
        """Collective path on CPU fleets: form a gloo group with every server (trainer = rank 0, server
        i = rank i + 1) on first use, then per update: pause -> start_weight_update -> update_weights
        (vLLM's update_info: names, dtype_names, shapes, version) on every server while this process
        broadcasts the tensors in that order -> finish_weight_update -> resume."""
        from megatron_amir.rollout.router import free_port
        from megatron_amir.rollout.weight_sync import TensorBroadcaster, send_tensors, update_info

        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        servers = list(self.servers)
        if not servers:
            raise FleetError("no servers to update (servers list is empty)")
        if getattr(self, "_bcast", None) is None or self._bcast_servers != servers:
            port = master_port or free_port(master_address)
            world = len(servers) + 1
            joins = [self._post(u, "/init_weight_transfer_engine", {"init_info": {
                "backend": "gloo", "master_address": master_address, "master_port": port,
                "rank_offset": i + 1, "world_size": world}}) for i, u in enumerate(servers)]
            comm_task = asyncio.to_thread(TensorBroadcaster.gloo, master_address, port, 0, world)
            *_, comm = await asyncio.gather(*joins, comm_task)
            self._bcast, self._bcast_servers = comm, servers
        info = {**update_info(items), "version": int(version)}
        await asyncio.gather(*(self._post(u, "/pause", params={"mode": "wait"}) for u in servers))
        try:
            await asyncio.gather(*(self._post(u, "/start_weight_update", {"is_checkpoint_format": True})
                                   for u in servers))
            await asyncio.gather(*(self._post(u, "/update_weights", {"update_info": info}) for u in servers),
                                 asyncio.to_thread(send_tensors, self._bcast, items))
            await asyncio.gather(*(self._post(u, "/finish_weight_update", {}) for u in servers))
        except BaseException:
            # a failed broadcast leaves the members at different points of the tensor sequence: the group
            # cannot be reused, so the next update forms a new one (every server re-joins on a new port)
            self._bcast = self._bcast_servers = None
            raise
        finally:
            await asyncio.gather(*(self._resume(u) for u in servers))
        self.weight_version = int(version)
        return {u: "ok" for u in servers}

    async def prepare_broadcast(self, members: Sequence[str], groups: dict, address: str, backend: str,
                                timeout_s: float, report: dict[str, str]) -> list[str]:
        """Pause every member and have each one without a group join its own (trainer = rank 0, worker w = rank
        1 + w, world = 1 + its /get_world_size); returns the members ready to receive, records why in ``report``
        for the others. ``groups`` (member -> TensorBroadcaster) gains the new ones."""
        from megatron_amir.rollout.router import free_port
        from megatron_amir.rollout.weight_sync import TensorBroadcaster

        async def one(url: str) -> str:
            try:
                await self._post(url, "/pause", params={"mode": "wait"})
            except (httpx.HTTPError, FleetError) as exc:
                return f"unreachable: {type(exc).__name__}: {exc}"
            if url in groups:
                return "ok"
            workers = await self._world_size(url)
            port = free_port(address)
            join = self._post(url, "/collective_rpc", {"method": "join_weight_group", "args": [
                address, port, backend, 1 + workers, timeout_s]}, timeout=timeout_s + 30)
            comm = asyncio.to_thread(TensorBroadcaster.create, backend, address, port, 0, 1 + workers, timeout_s)
            joined, comm = await asyncio.gather(join, comm, return_exceptions=True)
            for res in (joined, comm):
                if isinstance(res, BaseException):
                    return f"could not join the broadcast group: {type(res).__name__}: {res}"
            groups[url] = comm
            return "ok"

        status = await asyncio.gather(*(one(u) for u in members))
        report.update({u: s for u, s in zip(members, status) if s != "ok"})
        return [u for u, s in zip(members, status) if s == "ok"]

    async def _world_size(self, url: str) -> int:
        """Workers behind one server (vLLM dev mode's /get_world_size); 1 where the route is missing."""
        try:
            r = await self.http().get(f"{url}/get_world_size", headers=self._auth(), timeout=10)
            if r.status_code == 200:
                body = r.json()
                return int(body.get("world_size", 1) if isinstance(body, dict) else body)
        except (httpx.HTTPError, ValueError, TypeError):
            pass
        return 1

    async def receive_buckets(self, members: Sequence[str], info: dict) -> dict[str, str]:
        """Every member receives the announced update (blocks until each is done); member -> 'ok' / error."""
        async def one(url: str) -> str:
            try:
                await self._post(url, "/collective_rpc", {"method": "receive_weight_buckets", "args": [info]},
                                 timeout=self.timeout_s)
                return "ok"
            except Exception as exc:  # noqa: BLE001 - reported per member
                return f"error: {type(exc).__name__}: {exc}"

        return dict(zip(members, await asyncio.gather(*(one(u) for u in members))))

    async def finish_broadcast(self, done: Sequence[str], version: int) -> None:
        """After an update: members that took it drop their prefix cache, take the version label and resume."""
        async def one(url: str) -> None:
            try:
                await self._post(url, "/reset_prefix_cache", {})
                await self._post(url, "/update_weight_version", {"new_version": str(int(version))})
            finally:
                await self._resume(url)

        await asyncio.gather(*(one(u) for u in done), return_exceptions=True)

    async def weight_versions(self, key: str = "weight_version", urls: Optional[Sequence[str]] = None
                              ) -> dict[str, Optional[str]]:
        """``key`` of every server's (or ``urls``') ``/weight_info`` (None where a server lacks it: stock ``vllm
        serve`` has no ``logprobs_mode`` there)."""
        urls = list(self.servers if urls is None else urls)

        async def one(url: str) -> Optional[str]:
            try:
                r = await self.http().get(f"{url}/weight_info", timeout=10)
                return r.json().get(key) if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls))))


class FleetEngine:
    """Synchronous ``Engine`` over a fleet: router process (optional), discovery watcher (optional),
    FleetClient on a private event-loop thread, file weight sync into ``sync_dir``."""

    def __init__(
        self,
        servers: Sequence[str] = (),
        *,
        use_router: bool = True,
        policy: str = "round_robin",
        token: Optional[str] = None,
        sync_dir: Optional[str | Path] = None,
        hf_config: Optional[Mapping[str, Any]] = None,
        discovery_file: Optional[str | Path] = None,
        timeout_s: float = 300.0,
        progress: bool = False,
        router_log: Optional[str | Path] = None,
        skip_unreachable: bool = True,
        version: int = 0,
        update_route: str = "update_weights",
        transport: str = "file",
        broadcast_address: str = "127.0.0.1",
        broadcast_backend: str = "gloo",
        broadcast_timeout_s: float = 120.0,
        broadcast_rollback: bool = True,
    ):
        from megatron_amir.rollout.router import DiscoveryWatcher, VllmRouter, read_discovery_file

        initial = [s.rstrip("/") for s in servers]
        if discovery_file:
            initial += [u for u in read_discovery_file(discovery_file) if u not in initial]
        if not initial and not discovery_file:
            raise ValueError("FleetEngine needs servers or a discovery_file")
        if transport not in ("file", "broadcast"):
            raise ValueError(f"transport must be file or broadcast, got {transport!r}")
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.hf_config = dict(hf_config) if hf_config else None
        self.transport = transport
        self.broadcast_address, self.broadcast_backend = broadcast_address, broadcast_backend
        self.broadcast_timeout_s = float(broadcast_timeout_s)
        self.broadcast_rollback = bool(broadcast_rollback)  # members keep their previous version if an update tears
        self._groups: dict[str, Any] = {}  # member -> its TensorBroadcaster (bucketed broadcast)
        self.out_of_rotation: dict[str, str] = {}  # member -> why it lacks the current weights
        self.skip_unreachable = skip_unreachable
        self.router = VllmRouter(initial, policy=policy, log_file=router_log).start() if use_router else None
        self.client = FleetClient(self.router.url if self.router else None, initial, token=token,
                                  timeout_s=timeout_s, progress=progress, weight_version=version,
                                  update_route=update_route)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-client", daemon=True)
        self._thread.start()
        # weight updates and fleet changes are serialized: a server joins only once it holds the current weights
        self._sync_lock = threading.RLock()
        self._snapshot: Optional[tuple[Path, int]] = None  # the weights every serving member holds
        self.watcher = None
        if discovery_file:
            self.watcher = DiscoveryWatcher(discovery_file, self.router, self.client.set_servers,
                                            prepare=self._prepare_members, lock=self._sync_lock).start()

    @classmethod
    def from_config(cls, rc, hf_config: Optional[Mapping[str, Any]] = None, sync_dir: Optional[str] = None,
                    **kwargs) -> "FleetEngine":
        """From ``RolloutConfig``: servers, discovery_file, use_router, router_policy, token (default
        $MEGATRON_AMIR_TOKEN), request_timeout_s, weight_sync_dir. Weight updates take the
        ``collective_rpc`` route, which both member kinds answer (stock vLLM with our worker extension in dev
        mode, and our embedded server); stock vLLM has no file backend behind /update_weights."""
        import os

        import torch

        kwargs.setdefault("update_route", "collective_rpc")
        kwargs.setdefault("transport", rc.weight_sync)
        kwargs.setdefault("broadcast_address", rc.weight_sync_address)
        kwargs.setdefault("broadcast_backend", "nccl" if torch.cuda.is_available() else "gloo")
        kwargs.setdefault("broadcast_timeout_s", rc.weight_sync_timeout_s)
        kwargs.setdefault("broadcast_rollback", rc.weight_sync_rollback)
        return cls(rc.servers, use_router=rc.use_router, policy=rc.router_policy,
                   token=rc.token or os.environ.get("MEGATRON_AMIR_TOKEN"),
                   sync_dir=sync_dir or rc.weight_sync_dir, hf_config=hf_config,
                   discovery_file=rc.discovery_file, timeout_s=rc.request_timeout_s, **kwargs)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def version(self) -> int:
        return self.client.weight_version

    def generate(self, prompts: Sequence[Sequence[int]], params: PerPromptParams, n: int = 1,
                 request_ids: Optional[Sequence[str]] = None) -> list[GroupResult]:
        return self._call(self.client.generate(prompts, params, n, request_ids))

    def load_weights(self, named_tensors: NamedTensors, version: int) -> dict[str, str]:
        """Weights ``version`` onto every server: transport file writes a snapshot into ``sync_dir`` and loads it
        everywhere; broadcast packs the tensors into buckets (``PackedBuckets``) and broadcasts them."""
        from megatron_amir.rollout.weight_sync import PackedBuckets, write_snapshot

        if self.transport == "broadcast":
            return self.load_weight_buckets(PackedBuckets(named_tensors), version)
        if self.sync_dir is None:
            raise ValueError("FleetEngine.load_weights needs sync_dir (rollout.weight_sync_dir)")
        with self._sync_lock:
            path = write_snapshot(named_tensors, self.sync_dir, version, hf_config=self.hf_config)
            return self._push_snapshot(path, version)

    def _push_snapshot(self, path: Path, version: int) -> dict[str, str]:
        report = self._call(self.client.update_weights_from_snapshot(path, version, self.skip_unreachable))
        self._snapshot = (path, int(version))
        return report

    def load_weight_buckets(self, stream, version: int) -> dict[str, str]:
        """Weights ``version`` from a bucketed stream (``training.weight_stream.WeightStream`` on the trainer's rank
        0, or ``PackedBuckets``): transport file writes the snapshot bucket by bucket (``write_snapshot_stream``),
        broadcast sends each bucket into every member's own group (``broadcast_buckets``). The stream is consumed
        to its end whatever happens to the members (on the trainer it is collective)."""
        from megatron_amir.rollout.weight_sync import write_snapshot_stream

        with self._sync_lock:
            if self.transport == "broadcast":
                return self.broadcast_buckets(stream, version)
            if self.sync_dir is None:
                stream.drain()
                raise ValueError("FleetEngine.load_weight_buckets needs sync_dir (rollout.weight_sync_dir)")
            path = write_snapshot_stream(stream, self.sync_dir, version, hf_config=self.hf_config)
            return self._push_snapshot(path, version)

    def broadcast_buckets(self, stream, version: int) -> dict[str, str]:
        """One bucketed broadcast update; returns member -> 'ok' or why it failed.

        Members: the serving ones plus those out of rotation (each update is a complete one, so it brings a member
        that missed one back). Per member: pause, join its group (first time, or after a failure), then every
        member receives the announced buckets (``collective_rpc receive_weight_buckets``) while this thread sends
        them (``send_buckets``). A member that is unreachable, fails or times out leaves the rotation (router and
        fan-out list) and stays paused: its weights may be a mix of two versions, and it comes back once a later
        update reaches it whole and it reports that update's version on ``/weight_info``. With ``broadcast_rollback``
        a member whose update stopped part-way keeps its previous weights (it would serve them again, but
        they are not the current version). The others, and the caller, go on; only when no member took the update
        does it raise (after consuming the stream)."""
        from megatron_amir.rollout.weight_sync import send_buckets

        members = list(dict.fromkeys([*self.client.servers, *self.out_of_rotation]))
        report: dict[str, str] = {}
        try:
            ready = self._call(self.client.prepare_broadcast(members, self._groups, self.broadcast_address,
                                                             self.broadcast_backend, self.broadcast_timeout_s, report))
            info = {**stream.update_info(), "version": int(version), "rollback": self.broadcast_rollback}
            receiving = asyncio.run_coroutine_threadsafe(self.client.receive_buckets(ready, info), self._loop)
        except BaseException:
            stream.drain()
            raise
        errors = send_buckets({u: self._groups[u] for u in ready}, stream)
        received = receiving.result()
        for url in ready:
            report[url] = errors.get(url) or received[url]
        done = [u for u in members if report.get(u) == "ok"]
        self._call(self.client.finish_broadcast(done, version))
        reported = self._call(self.client.weight_versions(urls=done))
        for url in done:  # back in rotation only once it says it serves this version
            if reported[url] != str(int(version)):
                report[url] = f"reports weight version {reported[url]!r} after the update to {int(version)}"
        done = [u for u in done if report[u] == "ok"]
        for url in members:
            if report.get(url) == "ok":
                self._back_in_rotation(url)
            else:
                self._groups.pop(url, None)
                self._out_of_rotation(url, report.get(url, "not reached"))
        if not done:
            raise FleetError(f"weight update v{version} reached no server: "
                             + "; ".join(f"{u}: {r}" for u, r in report.items()))
        self.client.weight_version = int(version)
        return report

    def _out_of_rotation(self, url: str, why: str) -> None:
        log.warning("server %s left the rotation until it has the current weights: %s", url, why)
        self.out_of_rotation[url] = why
        self.client.servers = [u for u in self.client.servers if u != url]
        if self.router is not None:
            try:
                self.router.remove_worker(url)
            except Exception as exc:  # noqa: BLE001 - the router may already have dropped it
                log.info("router: %s", exc)

    def _back_in_rotation(self, url: str) -> None:
        if self.out_of_rotation.pop(url, None) is None:
            return
        log.info("server %s has the current weights again", url)
        self.client.servers = [*self.client.servers, url]
        if self.router is not None:
            self.router.add_worker(url)

    def _prepare_members(self, added: list[str]) -> list[str]:
        """Discovery callback: load the current snapshot on newly listed servers before they get traffic
        (a replacement member starts from its launch weights); returns those that took it."""
        if self.transport == "broadcast":
            if not self._groups and not self.out_of_rotation:  # no weights pushed yet: the first update reaches them
                return added
            for url in added:  # the next update (a complete one) brings them in
                self.out_of_rotation[url] = "joined after the last weight update"
            return []
        if self._snapshot is None:  # no weights pushed yet: the first load_weights reaches them with the rest
            return added
        path, version = self._snapshot
        report = self._call(self.client.push_snapshot(path, version, added))
        for url, status in report.items():
            if status != "ok":
                log.warning("new server %s did not load weight version %d (%s); it will be tried again later",
                            url, version, status)
        return [u for u in added if report[u] == "ok"]

    def logprobs_modes(self) -> dict[str, Optional[str]]:
        """url -> the ``--logprobs-mode`` each server reports (None where it does not say, e.g. stock vllm serve)."""
        return self._call(self.client.weight_versions("logprobs_mode"))

    def close(self) -> None:
        if self.watcher:
            self.watcher.stop()
        if self._loop.is_running():
            self._call(self.client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self.router:
            self.router.stop()

    def __enter__(self) -> "FleetEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
