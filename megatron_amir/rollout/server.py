"""HTTP rollout server for the embedded engine, speaking the subset of vLLM's API that RL needs, so
the fleet client, ``vllm-router`` and weight sync run one code path against it and against stock
``vllm serve`` (the vLLM API facts it mirrors are listed in ``vllm_engine.py``).

Routes
  POST /v1/completions     token-id prompts (list[int] or list[list[int]]), n, max_tokens, temperature,
                           top_p, top_k, seed, stop_token_ids, logprobs (0 only), return_token_ids;
                           choices are prompt-major (index = prompt * n + sample), each with token_ids,
                           logprobs.token_logprobs, finish_reason, stop_reason; plus ``weight_version``
                           (our extension: the version every sample came from).
  GET  /health, /v1/models, /metrics (Prometheus text), /weight_info, /is_paused, /get_world_size
  POST (bearer token)      /pause?mode=keep|wait|abort, /resume, /init_weight_transfer_engine,
                           /start_weight_update, /update_weights, /finish_weight_update,
                           /update_weight_version, /reset_prefix_cache, /collective_rpc
  Weight updates use the file backend, or a gloo broadcast group with vLLM's update_info (see below): ``/update_weights {"update_info": {"path": <snapshot dir>,
  "version": <int>}}`` loads a ``weight_sync`` snapshot (sha256-verified) and sets the version;
  ``/collective_rpc {"method": "load_snapshot", "args": [path, version]}`` does the same through the
  route a stock ``vllm serve`` with our worker extension offers, so the client has one code path.

Requests are batched: whatever arrives while a batch runs is decoded together in the next one (grouped by
n). A request whose ``x-request-id`` and body equal one still queued or running (a client retry after a
timeout) waits for that generation and gets its answer instead of starting a second one; one that equals a
request finished in the last ``RECENT_TTL_S`` seconds (its answer lost on the way back) gets the same answer
without generating (``megatron_amir_deduplicated_requests_total`` counts both). Finished answers are kept for
at most ``RECENT_MAX`` requests / ``RECENT_MAX_ROWS`` sequences and dropped whenever the weights change.
Errors are vLLM-shaped: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megatron_amir.rollout.embedded import EmbeddedEngine
from megatron_amir.rollout.engine import GroupResult, SamplingParams

log = logging.getLogger("megatron_amir.rollout.server")
TOKEN_ENV = "MEGATRON_AMIR_TOKEN"


# ------------------------------------------------------------------------------------------- schema
class CompletionRequest(BaseModel):
    """The /v1/completions fields we honour; other OpenAI/vLLM fields are accepted and ignored, as vLLM
    does, except those whose meaning we cannot provide (rejected with a 400 naming them)."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Union[list[int], list[list[int]], str, list[str]]
    n: int = Field(1, ge=1, le=1024)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)  # a bigger one overflowed the batch's tensor: 500 for everyone
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM; a bigger one crashed the batch
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: Optional[int] = None
    return_token_ids: bool = False
    stream: bool = False
    echo: bool = False
    stop: Optional[Union[str, list[str]]] = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error(status: int, message: str, param: Optional[str] = None, type_: str = "BadRequestError") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": status}})


RECENT_MAX = 256  # finished keyed answers kept for retries (entries)
RECENT_TTL_S = 300.0  # ... and for how long
RECENT_MAX_ROWS = 65536  # ... and sequences in all

# ------------------------------------------------------------------------------------------- batching
@dataclass
class _Pending:
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    request_id: str
    future: asyncio.Future
    rows: int = 0
    waiters: int = 1  # HTTP requests answered by this generation (a client retry joins the original)


@dataclass
class _Stats:
    requests: int = 0
    groups: int = 0
    tokens: int = 0
    batches: int = 0
    batch_rows: int = 0
    errors: dict = field(default_factory=lambda: defaultdict(int))
    weight_updates: int = 0
    deduplicated: int = 0
    started: float = field(default_factory=time.time)


class Batcher:
    """Collects requests and runs them through the engine in one worker thread (the engine is not
    re-entrant); pausing stops new batches from starting, in-flight batches always finish."""

    def __init__(self, engine: EmbeddedEngine, max_batch_rows: int, stats: _Stats):
        self.engine, self.max_batch_rows, self.stats = engine, max_batch_rows, stats
        self.queue: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def enqueue(self, p: _Pending) -> None:
        """Queue ``p``; its result (or error) arrives on ``p.future``."""
        p.rows = len(p.prompts) * p.n
        self.queue.append(p)
        self.wakeup.set()

    def abort_queued(self, reason: str) -> int:
        """Answer every queued generation with a 503; returns how many HTTP requests that answers (joined
        retries included, generations already answered not counted)."""
        n = 0
        for p in self.queue:
            if not p.future.done():
                p.future.set_exception(ApiError(503, reason, type_="ServiceUnavailableError"))
                n += p.waiters
        self.queue.clear()
        return n

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            await self.unpaused.wait()
            if not self.queue:
                self.wakeup.clear()
                continue
            # take a batch of requests with the same n (first come first served), up to max rows
            n = self.queue[0].n
            batch, rest, rows = [], [], 0
            for p in self.queue:
                if p.n == n and (not batch or rows + p.rows <= self.max_batch_rows):
                    batch.append(p)
                    rows += p.rows
                else:
                    rest.append(p)
            self.queue = rest
            batch = [p for p in batch if not p.future.done()]  # client went away
            if not batch:
                continue
            prompts = [pr for p in batch for pr in p.prompts]
            params = [p.params for p in batch for _ in p.prompts]
            rids = [f"{p.request_id}-{i}" for p in batch for i in range(len(p.prompts))]
            self.idle.clear()
            try:
                groups = await loop.run_in_executor(None, lambda: self.engine.generate(prompts, params, n, rids))
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                log.exception("generation failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.idle.set()
            self.stats.batches += 1
            self.stats.batch_rows += rows
            i = 0
            for p in batch:
                part = groups[i : i + len(p.prompts)]
                i += len(p.prompts)
                if not p.future.done():
                    p.future.set_result(part)


# ------------------------------------------------------------------------------------------- app
def create_app(
    engine: EmbeddedEngine,
    token: Optional[str],
    model_name: str = "megatron-amir",
    weights_root: Optional[str] = None,
    max_batch_rows: int = 512,
    max_request_rows: int = 8192,
) -> FastAPI:
    """Build the FastAPI app around ``engine``. ``token``: bearer token for state-changing routes (None:
    those routes answer 403, the server cannot be changed). ``weights_root``: if set, weight updates may
    only load snapshots under this directory. ``max_request_rows``: most sequences (prompts x n) one
    completion request may ask for."""
    stats = _Stats()
    state: dict[str, Any] = {"batcher": None, "updating": False, "broadcaster": None}
    # (x-request-id, body digest) -> the queued / running generation: a client retry of a request
    # that is still in flight (it timed out on the client's side) waits for that generation instead of
    # queueing a second one, so timeouts under load do not multiply the work
    inflight: dict[tuple[str, str], _Pending] = {}
    # the answers of recently finished keyed requests, for a retry whose first answer was lost on the way back
    # (connection reset, router failover): the same samples without a second generation. Bounded in entries and
    # age, and emptied whenever the weights change (a retry then samples the new weights).
    recent: "OrderedDict[tuple[str, str], tuple[float, list[GroupResult], int]]" = OrderedDict()  # (time, answer, rows)

    def _finished(key: tuple[str, str], fut: asyncio.Future) -> None:
        if key in inflight and inflight[key].future is fut:
            inflight.pop(key)
        if fut.cancelled() or fut.exception() is not None:
            return
        groups = fut.result()
        if any(smp.weight_version != engine.version for g in groups for smp in g.samples):
            return  # the weights changed while it ran: a retry samples the new ones
        recent[key] = (time.monotonic(), groups, sum(len(g.samples) for g in groups))
        recent.move_to_end(key)
        while len(recent) > RECENT_MAX or sum(rows for _, _, rows in recent.values()) > RECENT_MAX_ROWS:
            recent.popitem(last=False)
    app = FastAPI(title="megatron-amir rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    root = Path(weights_root).resolve() if weights_root else None

    def batcher() -> Batcher:
        if state["batcher"] is None:  # created on first use, inside the server's event loop
            state["batcher"] = Batcher(engine, max_batch_rows, stats)
            state["batcher"].start()
        return state["batcher"]

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        stats.errors[400] += 1
        return _error(400, msg or "invalid request", param)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        stats.errors[exc.status] += 1
        return _error(exc.status, exc.message, exc.param, exc.type)

    def require_token(request: Request) -> None:
        if not token:  # None or "": an empty token would accept an empty bearer
            raise ApiError(403, "this server was started without a token; state-changing routes are disabled",
                           type_="PermissionDenied")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                           type_="Unauthorized")

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # ---------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        prompts = _check_prompt(req.prompt, engine.vocab_size)
        if req.stream:
            raise ApiError(400, "stream=true is not supported by this server", "stream")
        if req.echo:
            raise ApiError(400, "echo=true is not supported by this server", "echo")
        if req.stop:
            raise ApiError(400, "string 'stop' needs a tokenizer; pass stop_token_ids instead", "stop")
        if req.logprobs not in (None, 0):
            raise ApiError(400, "only logprobs=0 (the sampled token's log-prob) is supported", "logprobs")
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model {req.model!r} does not exist (this server serves {model_name!r})", "model",
                           "NotFoundError")
        if any(t < 0 or t >= engine.vocab_size for t in req.stop_token_ids):
            raise ApiError(400, f"stop_token_ids must be in [0, {engine.vocab_size})", "stop_token_ids")
        if len(prompts) * req.n > max_request_rows:  # one request must not occupy the server for days
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} sequences exceed this "
                                f"server's limit of {max_request_rows} per request (--max-request-rows)", "n")
        limit = engine.model.args.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + req.max_tokens > limit:
            raise ApiError(400, f"prompt length {longest} + max_tokens {req.max_tokens} exceeds the model's "
                                f"max_position_embeddings={limit}", "max_tokens")
        # temperatures below vLLM's _SAMPLING_EPS are greedy (dividing by 1e-40 gave NaN log-probs)
        params = SamplingParams(temperature=req.temperature if req.temperature >= 1e-5 else 0.0, top_p=req.top_p,
                                top_k=max(req.top_k, 0),
                                max_new_tokens=req.max_tokens, stop_token_ids=tuple(req.stop_token_ids), seed=req.seed)
        given_id = request.headers.get("x-request-id")
        rid = given_id or uuid.uuid4().hex
        stats.requests += 1
        key = (given_id, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()) if given_id else None
        pending = inflight.get(key) if key else None
        done = recent.get(key) if key else None
        if done is not None and time.monotonic() - done[0] > RECENT_TTL_S:
            recent.pop(key, None)
            done = None
        if done is not None:
            stats.deduplicated += 1
            groups = done[1]
        else:
            if pending is not None:
                stats.deduplicated += 1
                pending.waiters += 1
            else:
                pending = _Pending(prompts, params, req.n, rid, asyncio.get_running_loop().create_future())
                if key:
                    inflight[key] = pending
                    pending.future.add_done_callback(lambda f, k=key: _finished(k, f))
                batcher().enqueue(pending)
            groups = await asyncio.shield(pending.future)  # one waiter going away must not cancel the others' generation
        choices, ntok = [], 0
        versions = set()
        for pi, g in enumerate(groups):
            for si, s in enumerate(g.samples):
                ntok += len(s.token_ids)
                versions.add(s.weight_version)
                choice = {
                    "index": pi * req.n + si,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": s.finish_reason,
                    "stop_reason": s.token_ids[-1] if s.finish_reason == "stop" else None,
                    "weight_version": s.weight_version,
                }
                if req.logprobs is not None:
                    choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in s.token_ids],
                                          "token_logprobs": s.logprobs, "top_logprobs": None, "text_offset": []}
                if req.return_token_ids:
                    choice["token_ids"] = s.token_ids
                    choice["prompt_token_ids"] = g.prompt_token_ids
                choices.append(choice)
        stats.groups += len(groups)
        stats.tokens += ntok
        return {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": sum(len(p) for p in prompts) * req.n, "completion_tokens": ntok,
                      "total_tokens": sum(len(p) for p in prompts) * req.n + ntok},
            "weight_version": min(versions) if versions else engine.version,
        }

    # ---------------------------------------------------------------- read-only
    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "megatron-amir",
                                            "max_model_len": engine.model.args.max_position_embeddings}]}

    @app.get("/weight_info")
    async def weight_info():
        # logprobs_mode: which distribution the reported log-probs are under (clients record it with results)
        return {"weight_version": str(engine.version), "logprobs_mode": engine.logprobs_mode}

    @app.get("/is_paused")
    async def is_paused():
        return {"is_paused": not batcher().unpaused.is_set()}

    @app.get("/get_world_size")
    async def world_size():
        return {"world_size": 1}

    @app.get("/metrics")
    async def metrics():
        b = batcher()
        lines = [
            "# TYPE megatron_amir_requests_total counter", f"megatron_amir_requests_total {stats.requests}",
            "# TYPE megatron_amir_groups_total counter", f"megatron_amir_groups_total {stats.groups}",
            "# TYPE megatron_amir_generation_tokens_total counter",
            f"megatron_amir_generation_tokens_total {stats.tokens}",
            "# TYPE megatron_amir_batches_total counter", f"megatron_amir_batches_total {stats.batches}",
            "# TYPE megatron_amir_batch_rows_total counter", f"megatron_amir_batch_rows_total {stats.batch_rows}",
            "# TYPE megatron_amir_queue_requests gauge", f"megatron_amir_queue_requests {len(b.queue)}",
            "# TYPE megatron_amir_weight_version gauge", f"megatron_amir_weight_version {engine.version}",
            "# TYPE megatron_amir_deduplicated_requests_total counter",
            f"megatron_amir_deduplicated_requests_total {stats.deduplicated}",
            "# TYPE megatron_amir_weight_updates_total counter",
            f"megatron_amir_weight_updates_total {stats.weight_updates}",
            "# TYPE megatron_amir_paused gauge", f"megatron_amir_paused {int(not b.unpaused.is_set())}",
            "# TYPE megatron_amir_uptime_seconds gauge", f"megatron_amir_uptime_seconds {time.time() - stats.started:.1f}",
            "# TYPE megatron_amir_http_errors_total counter",
        ]
        lines += [f'megatron_amir_http_errors_total{{code="{c}"}} {v}' for c, v in sorted(stats.errors.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- state-changing (token)
    @app.post("/pause")
    async def pause(request: Request, mode: str = "keep"):
        require_token(request)
        if mode not in ("keep", "wait", "abort"):
            raise ApiError(400, f"mode must be keep, wait or abort, got {mode!r}", "mode")
        b = batcher()
        b.unpaused.clear()
        aborted = b.abort_queued("server paused with mode=abort; retry later") if mode == "abort" else 0
        if mode in ("wait", "abort"):
            await b.idle.wait()  # the running batch finishes (it cannot be interrupted mid-step)
        return {"message": "Generation paused", "mode": mode, "aborted_requests": aborted}

    @app.post("/resume")
    async def resume(request: Request):
        require_token(request)
        b = batcher()
        b.unpaused.set()
        b.wakeup.set()
        return {"message": "Generation resumed"}

    @app.post("/init_weight_transfer_engine")
    async def init_transfer(request: Request):
        """backend "file" (default): nothing to set up. backend "gloo": join the trainer's broadcast
        group ({master_address, master_port, rank_offset, world_size}; this server is rank rank_offset);
        blocks until every member has joined."""
        require_token(request)
        body = await json_body(request)
        info = body.get("init_info", {})
        if not isinstance(info, dict):
            raise ApiError(400, "init_info must be an object", "init_info")
        backend = info.get("backend", "file")
        if backend == "file":
            return {"message": "Weight transfer initialized"}
        if backend != "gloo":
            raise ApiError(400, f"backend {backend!r} is not available on the embedded server (file or gloo)",
                           "init_info.backend")
        try:
            host, port = str(info["master_address"]), int(info["master_port"])
            rank, world = int(info["rank_offset"]), int(info["world_size"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "gloo init_info needs master_address, master_port, rank_offset, world_size",
                           "init_info") from None
        if not 0 < rank < world:
            raise ApiError(400, f"rank_offset {rank} must be in [1, world_size={world})", "init_info.rank_offset")
        from megatron_amir.rollout.weight_sync import TensorBroadcaster

        loop = asyncio.get_running_loop()
        try:
            state["broadcaster"] = await loop.run_in_executor(
                None, lambda: TensorBroadcaster.gloo(host, port, rank, world, timeout_s=60))
        except Exception as exc:  # noqa: BLE001 - rendezvous failures are the caller's to fix
            raise ApiError(400, f"could not join the weight broadcast group: {exc}", "init_info") from None
        return {"message": "Weight transfer initialized"}

    @app.post("/start_weight_update")
    async def start_update(request: Request):
        require_token(request)
        state["updating"] = True
        return {"message": "Weight update started"}

    async def load_snapshot(path: Any, version: Any, param: str) -> dict:
        if not isinstance(path, str) or not path:
            raise ApiError(400, f"{param}.path must be a snapshot directory", f"{param}.path")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ApiError(400, f"{param}.version must be an integer", f"{param}.version")
        snap = Path(path).resolve()
        if root is not None and root not in snap.parents and snap != root:
            raise ApiError(403, f"snapshot {snap} is outside the allowed weights root {root}", f"{param}.path",
                           "PermissionDenied")
        from megatron_amir.rollout.weight_sync import WeightSyncError, read_snapshot

        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            s = await loop.run_in_executor(None, lambda: read_snapshot(snap, expected_version=version))
            # load_weights takes the engine lock: a running batch finishes with the old weights first
            await loop.run_in_executor(None, lambda: engine.load_weights(s.tensors, s.version))
            recent.clear()
        except (WeightSyncError, KeyError, ValueError) as exc:
            raise ApiError(400, f"weight update failed: {exc}", param) from None
        stats.weight_updates += 1
        return {"num_tensors": len(s.tensors), "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/update_weights")
    async def update_weights(request: Request):
        """File backend: update_info {path, version}. Broadcast backend (after a gloo init): vLLM's
        update_info {names, dtype_names, shapes} (+ optional version); the tensors arrive by broadcast."""
        require_token(request)
        body = await json_body(request)
        info = body.get("update_info")
        if not isinstance(info, dict):
            raise ApiError(400, "update_weights needs {'update_info': {'path': <snapshot dir>, 'version': <int>}} "
                                "or {'update_info': {'names', 'dtype_names', 'shapes'}}", "update_info")
        if "names" in info:
            comm = state.get("broadcaster")
            if comm is None:
                raise ApiError(400, "broadcast update without init_weight_transfer_engine(backend=gloo)",
                               "update_info")
            version = info.get("version")
            if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
                raise ApiError(400, "update_info.version must be an integer", "update_info.version")
            from megatron_amir.rollout.weight_sync import receive_tensors

            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            try:
                tensors = await loop.run_in_executor(None, lambda: receive_tensors(comm, info))
                new_version = engine.version if version is None else version
                await loop.run_in_executor(None, lambda: engine.load_weights(tensors, new_version))
                recent.clear()
            except (KeyError, ValueError) as exc:
                raise ApiError(400, f"weight update failed: {exc}", "update_info") from None
            stats.weight_updates += 1
            return {"message": "Weights updated", "weight_version": str(engine.version),
                    "num_tensors": len(tensors), "seconds": round(time.perf_counter() - t0, 4)}
        out = await load_snapshot(info.get("path"), info.get("version"), "update_info")
        return {"message": "Weights updated", "weight_version": str(engine.version), **out}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request):
        """vLLM's RPC route, restricted to the one method our worker extension shares with it:
        ``load_snapshot(path, version)`` (see vllm_engine.WeightSyncWorkerExtension)."""
        require_token(request)
        body = await json_body(request)
        if body.get("method") != "load_snapshot":
            raise ApiError(400, f"method {body.get('method')!r} is not available (only load_snapshot)", "method")
        args, kwargs = body.get("args") or [], body.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ApiError(400, "args must be a list and kwargs an object", "args")
        merged = dict(zip(("path", "version"), args), **kwargs)
        out = await load_snapshot(merged.get("path"), merged.get("version"), "args")
        return {"results": [out["num_tensors"]]}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request):
        require_token(request)
        return {"message": "no prefix cache in the embedded engine"}

    @app.post("/finish_weight_update")
    async def finish_update(request: Request):
        require_token(request)
        state["updating"] = False
        return {"message": "Weight update finished"}

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        require_token(request)
        body = await json_body(request)
        v = body.get("new_version")
        try:
            iv = int(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        except ValueError:
            iv = None
        if iv is None:
            raise ApiError(400, "new_version must be an integer (or its string)", "body.new_version")
        engine.set_version(iv)  # version label only, as in vLLM: weights unchanged
        recent.clear()  # cached answers carry the old label
        return {"success": True, "new_version": str(iv)}

    app.state.engine = engine
    app.state.stats = stats
    return app


def _check_prompt(prompt: Any, vocab: int) -> list[list[int]]:
    """Normalize the prompt field to a non-empty list of non-empty token-id lists in range."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        raise ApiError(400, "text prompts need a tokenizer; send token ids (list[int] or list[list[int]])", "prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a non-empty list of token ids", "prompt")
    prompts = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    for i, p in enumerate(prompts):
        if not p:
            raise ApiError(400, f"prompt[{i}] is empty", "prompt")
        bad = [t for t in p if t < 0 or t >= vocab]
        if bad:
            raise ApiError(400, f"prompt[{i}] has token ids outside [0, {vocab}): {bad[:5]}", "prompt")
    return [list(p) for p in prompts]


# ------------------------------------------------------------------------------------------- process
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-amir serve", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory (config.json + *.safetensors)")
    src.add_argument("--snapshot", help="weight_sync snapshot directory (manifest with hf_config)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", help="write the bound URL here (atomically) once listening")
    p.add_argument("--register", help="discovery file: append this server's URL once listening")
    p.add_argument("--api-key", help=f"bearer token for state-changing routes (default ${TOKEN_ENV})")
    p.add_argument("--weights-root", help="only load weight snapshots under this directory")
    p.add_argument("--served-model-name", default="megatron-amir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--logprobs-mode", default="processed_logprobs", choices=["processed_logprobs", "raw_logprobs"])
    p.add_argument("--max-batch-rows", type=int, default=512)
    p.add_argument("--max-request-rows", type=int, default=8192, help="most sequences (prompts x n) per request")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    import torch
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s serve %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    kw = dict(device=args.device, dtype=dtype, logprobs_mode=args.logprobs_mode, seed=args.seed,
              max_batch_rows=args.max_batch_rows)
    if args.model:
        engine = EmbeddedEngine.from_hf_dir(args.model, **kw)
    else:
        from megatron_amir.rollout.weight_sync import read_snapshot

        snap = read_snapshot(args.snapshot)
        if not snap.manifest.get("hf_config"):
            print(f"megatron-amir serve: {args.snapshot}/manifest.json has no hf_config", file=sys.stderr)
            return 2
        engine = EmbeddedEngine(snap.manifest["hf_config"], snap.tensors, version=snap.version, **kw)
    token = args.api_key or os.environ.get(TOKEN_ENV) or None
    if token is None:
        log.warning("no token: weight updates, pause and resume are disabled (403)")
    elif not args.weights_root:
        log.warning("no --weights-root: a token holder may load a weight snapshot from any directory this "
                    "process can read; pass --weights-root <weight_sync_dir> to confine updates to it")
    app = create_app(engine, token, args.served_model_name, args.weights_root, args.max_batch_rows,
                     args.max_request_rows)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            if args.port_file:
                from megatron_amir.fileio import atomic_write_text

                atomic_write_text(Path(args.port_file), url + "\n")
            if args.register:
                from megatron_amir.rollout.router import register_url

                register_url(args.register, url)
            log.warning("serving %s on %s", args.served_model_name, url)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
