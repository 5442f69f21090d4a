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
  Weight updates use the file backend, or a gloo broadcast group with vLLM's update_info
  (RolloutServer.update_weights): ``/update_weights {"update_info": {"path": <snapshot dir>, "version": <int>}}``
  loads a ``weight_sync`` snapshot (sha256-verified) and sets the version;
  ``/collective_rpc {"method": "load_snapshot", "args": [path, version]}`` does the same through the
  route a stock ``vllm serve`` with our worker extension offers, so the client has one code path.

Requests are batched: whatever arrives while a batch runs is decoded together in the next one (grouped by
n). A request whose ``x-request-id`` and body equal one still queued or running (a client retry after a
timeout) waits for that generation and gets its answer instead of starting a second one
(``megatron_amir_deduplicated_requests_total`` counts them). Finished answers are not kept: the fleet client
retries with the same seed, and a seeded request gives the same samples from the same weights in any batch,
so a retry whose first answer was lost regenerates the identical answer.

vLLM's defaults hold: the model's EOS (``eos_token_id`` of its config) ends a sample (finish_reason "stop",
stop_reason null) besides ``stop_token_ids``; ``usage.prompt_tokens`` counts each prompt once whatever n.
``n > 1`` with a greedy temperature is a 400, as in vLLM. Sampling fields the engine cannot honour (``UNSUPPORTED_DEFAULTS``: logit_bias, penalties, min_p, min_tokens,
ignore_eos, best_of, prompt_logprobs, beam search) get a 400 naming the field unless sent at their "off" value;
a non-finite temperature or top_p is a 400 naming it.
Errors, unknown routes (404) and methods (405) included, are vLLM-shaped:
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_amir.rollout.embedded import EmbeddedEngine, IncompleteWeights
from megatron_amir.rollout.engine import GroupResult, SamplingParams

log = logging.getLogger("megatron_amir.rollout.server")
TOKEN_ENV = "MEGATRON_AMIR_TOKEN"


# ------------------------------------------------------------------------------------------- schema
class CompletionRequest(BaseModel):
    """The /v1/completions fields we honour; other OpenAI/vLLM fields are accepted and ignored, as vLLM
    does, except those whose meaning we cannot provide (UNSUPPORTED_DEFAULTS: a 400 naming them)."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Union[list[int], list[list[int]], str, list[str]]
    n: int = Field(1, ge=1, le=1024)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
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
                if isinstance(exc, IncompleteWeights):  # out of rotation until a complete update: the router retries
                    exc = ApiError(503, str(exc), type_="ServiceUnavailableError")
                else:
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
# Sampling fields of vLLM / OpenAI that the embedded engine cannot honour, with the value that means "off".
# A request that sends another value gets a 400 naming the field instead of silently different samples.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "logit_bias": None, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "min_p": 0.0, "min_tokens": 0, "ignore_eos": False, "best_of": None, "prompt_logprobs": None,
    "use_beam_search": False,
}


def _unsupported_field(body: dict, n: int) -> Optional[str]:
    """The first field of UNSUPPORTED_DEFAULTS that ``body`` sets to something other than its "off" value
    (best_of may equal n, vLLM's default; an empty logit_bias is off)."""
    for name, off in UNSUPPORTED_DEFAULTS.items():
        value = body.get(name)
        if value is None or (name == "logit_bias" and value == {}) or (name == "best_of" and value == n):
            continue
        if type(value) is not bool and type(off) is not bool and isinstance(value, (int, float)) and value == off:
            continue
        if value is off:  # False for ignore_eos / use_beam_search
            continue
        return name
    return None


def eos_token_ids(hf_config: dict) -> tuple[int, ...]:
    """The model's EOS ids from its HF config (``eos_token_id``: an int, a list or absent)."""
    eos = hf_config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(int(t) for t in ids if isinstance(t, int) and not isinstance(t, bool) and t >= 0)


_HTTP_ERROR_TYPES = {401: "Unauthorized", 403: "PermissionDenied", 404: "NotFoundError", 405: "MethodNotAllowed"}


class RolloutServer:
    """The HTTP face of one embedded engine; ``self.app`` is the FastAPI app (``create_app`` builds it).

    ``token``: bearer token for state-changing routes (None: those routes answer 403, the server cannot be
    changed). ``weights_root``: if set, weight updates may only load snapshots under this directory.
    ``max_request_rows``: most sequences (prompts x n) one completion request may ask for."""

    def __init__(self, engine: EmbeddedEngine, token: Optional[str], model_name: str = "megatron-amir",
                 weights_root: Optional[str] = None, max_batch_rows: int = 512, max_request_rows: int = 8192):
        self.engine, self.token, self.model_name = engine, token, model_name
        self.root = Path(weights_root).resolve() if weights_root else None
        self.max_batch_rows, self.max_request_rows = max_batch_rows, max_request_rows
        self.eos_ids = eos_token_ids(engine.hf_config)  # stop every sample by default, as vLLM does
        self.stats = _Stats()
        self._batcher: Optional[Batcher] = None
        self._broadcaster = None  # the gloo group after init_weight_transfer_engine(backend=gloo)
        self._bucket_comm = None  # the gloo group after collective_rpc join_weight_group (bucketed broadcast)
        # (x-request-id, body digest) -> the queued / running generation: a client retry of a request that is
        # still in flight (it timed out on the client's side) waits for that generation instead of queueing a
        # second one, so timeouts under load do not multiply the work
        self._inflight: dict[tuple[str, str], _Pending] = {}
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="megatron-amir rollout server", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(RequestValidationError, self._on_validation_error)
        app.add_exception_handler(ApiError, self._on_api_error)
        app.add_exception_handler(StarletteHTTPException, self._on_http_error)
        routes = [
            ("POST", "/v1/completions", self.completions),
            ("GET", "/health", self.health), ("GET", "/v1/models", self.models),
            ("GET", "/weight_info", self.weight_info), ("GET", "/is_paused", self.is_paused),
            ("GET", "/get_world_size", self.world_size), ("GET", "/metrics", self.metrics),
            ("POST", "/pause", self.pause), ("POST", "/resume", self.resume),
            ("POST", "/init_weight_transfer_engine", self.init_transfer),
            ("POST", "/start_weight_update", self.start_update), ("POST", "/update_weights", self.update_weights),
            ("POST", "/finish_weight_update", self.finish_update),
            ("POST", "/update_weight_version", self.update_version),
            ("POST", "/collective_rpc", self.collective_rpc), ("POST", "/reset_prefix_cache", self.reset_prefix_cache),
        ]
        for method, path, endpoint in routes:
            app.add_api_route(path, endpoint, methods=[method])
        app.state.engine, app.state.stats, app.state.server = self.engine, self.stats, self
        return app

    def batcher(self) -> Batcher:
        if self._batcher is None:  # created on first use, inside the server's event loop
            self._batcher = Batcher(self.engine, self.max_batch_rows, self.stats)
            self._batcher.start()
        return self._batcher

    # ---------------------------------------------------------------- errors
    async def _on_validation_error(self, _: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        self.stats.errors[400] += 1
        return _error(400, msg or "invalid request", param)

    async def _on_api_error(self, _: Request, exc: ApiError) -> JSONResponse:
        self.stats.errors[exc.status] += 1
        return _error(exc.status, exc.message, exc.param, exc.type)

    async def _on_http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown route (404) or method (405): the OpenAI error shape instead of FastAPI's {"detail": ...}."""
        self.stats.errors[exc.status_code] += 1
        resp = _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                      type_=_HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError"))
        resp.headers.update(exc.headers or {})  # 405 keeps its Allow header
        return resp

    def require_token(self, request: Request) -> None:
        if not self.token:  # None or "": an empty token would accept an empty bearer
            raise ApiError(403, "this server was started without a token; state-changing routes are disabled",
                           type_="PermissionDenied")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                           type_="Unauthorized")

    @staticmethod
    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # ---------------------------------------------------------------- generation
    def _sampling_params(self, req: CompletionRequest, body: dict, prompts: list[list[int]]) -> SamplingParams:
        """Check a validated request against what this server can do; its SamplingParams."""
        for name, what in (("stream", "stream=true"), ("echo", "echo=true")):
            if getattr(req, name):
                raise ApiError(400, f"{what} is not supported by this server", name)
        if req.stop:
            raise ApiError(400, "string 'stop' needs a tokenizer; pass stop_token_ids instead", "stop")
        if req.logprobs not in (None, 0):
            raise ApiError(400, "only logprobs=0 (the sampled token's log-prob) is supported", "logprobs")
        bad = _unsupported_field(body, req.n)
        if bad is not None:
            raise ApiError(400, f"{bad}={body[bad]!r} is not supported by this server (only its default "
                                f"{UNSUPPORTED_DEFAULTS[bad]!r})", bad)
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist (this server serves {self.model_name!r})",
                           "model", "NotFoundError")
        vocab = self.engine.vocab_size
        if any(t < 0 or t >= vocab for t in req.stop_token_ids):
            raise ApiError(400, f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        rows = len(prompts) * req.n
        if rows > self.max_request_rows:  # one request must not occupy the server for days
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} = {rows} sequences exceed this server's "
                                f"limit of {self.max_request_rows} per request (--max-request-rows)", "n")
        limit = self.engine.model.args.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + req.max_tokens > limit:
            raise ApiError(400, f"prompt length {longest} + max_tokens {req.max_tokens} exceeds the model's "
                                f"max_position_embeddings={limit}", "max_tokens")
        # temperatures below vLLM's _SAMPLING_EPS are greedy (dividing by 1e-40 gave NaN log-probs)
        greedy = req.temperature < 1e-5
        if greedy and req.n > 1:  # vLLM's answer too: n greedy samples would all be the same
            raise ApiError(400, f"n must be 1 when using greedy sampling, got {req.n}", "n")
        return SamplingParams(temperature=0.0 if greedy else req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), max_new_tokens=req.max_tokens, seed=req.seed,
                              stop_token_ids=tuple(dict.fromkeys([*req.stop_token_ids, *self.eos_ids])))

    async def _generate(self, prompts: list[list[int]], params: SamplingParams, n: int, rid: str,
                        key: Optional[tuple[str, str]]) -> list[GroupResult]:
        """Queue one generation, or join the in-flight one with the same key (a client retry)."""
        pending = self._inflight.get(key) if key else None
        if pending is not None:
            self.stats.deduplicated += 1
            pending.waiters += 1
        else:
            pending = _Pending(prompts, params, n, rid, asyncio.get_running_loop().create_future())
            if key:
                self._inflight[key] = pending
                pending.future.add_done_callback(
                    lambda _, k=key, p=pending: self._inflight.pop(k) if self._inflight.get(k) is p else None)
            self.batcher().enqueue(pending)
        return await asyncio.shield(pending.future)  # one waiter going away must not cancel the others' generation

    async def completions(self, request: Request):
        body = await self.json_body(request)
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        prompts = _check_prompt(req.prompt, self.engine.vocab_size)
        params = self._sampling_params(req, body, prompts)
        given_id = request.headers.get("x-request-id")
        rid = given_id or uuid.uuid4().hex
        self.stats.requests += 1
        key = (given_id, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()) if given_id else None
        groups = await self._generate(prompts, params, req.n, rid, key)
        choices, ntok, versions = [], 0, set()
        for pi, g in enumerate(groups):
            for si, s in enumerate(g.samples):
                ntok += len(s.token_ids)
                versions.add(s.weight_version)
                last = s.token_ids[-1] if s.token_ids else None
                choice = {
                    "index": pi * req.n + si,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": s.finish_reason,
                    # vLLM: the stop token id for a stop_token_ids hit, None for EOS and for length
                    "stop_reason": last if s.finish_reason == "stop" and last not in self.eos_ids else None,
                    "weight_version": s.weight_version,
                }
                if req.logprobs is not None:
                    choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in s.token_ids],
                                          "token_logprobs": s.logprobs, "top_logprobs": None, "text_offset": []}
                if req.return_token_ids:
                    choice["token_ids"] = s.token_ids
                    choice["prompt_token_ids"] = g.prompt_token_ids
                choices.append(choice)
        self.stats.groups += len(groups)
        self.stats.tokens += ntok
        prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, whatever n (as vLLM)
        return {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ntok, "total_tokens": prompt_tokens + ntok},
            "weight_version": min(versions) if versions else self.engine.version,
        }

    # ---------------------------------------------------------------- read-only
    async def health(self):
        return {}

    async def models(self):
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(self.stats.started), "owned_by": "megatron-amir",
            "root": self.model_name, "parent": None,
            "max_model_len": self.engine.model.args.max_position_embeddings}]}

    async def weight_info(self):
        # logprobs_mode: which distribution the reported log-probs are under (clients record it with results)
        info = {"weight_version": str(self.engine.version), "logprobs_mode": self.engine.logprobs_mode}
        if self.engine.incomplete_update:  # an update stopped part-way: weights of no single version, nothing served
            info["incomplete_update"] = self.engine.incomplete_update
        return info

    async def is_paused(self):
        return {"is_paused": not self.batcher().unpaused.is_set()}

    async def world_size(self):
        return {"world_size": 1}

    async def metrics(self):
        b, s = self.batcher(), self.stats
        values = [
            ("requests_total", "counter", s.requests), ("groups_total", "counter", s.groups),
            ("generation_tokens_total", "counter", s.tokens), ("batches_total", "counter", s.batches),
            ("batch_rows_total", "counter", s.batch_rows), ("queue_requests", "gauge", len(b.queue)),
            ("weight_version", "gauge", self.engine.version),
            ("deduplicated_requests_total", "counter", s.deduplicated),
            ("weight_updates_total", "counter", s.weight_updates),
            ("paused", "gauge", int(not b.unpaused.is_set())),
            ("uptime_seconds", "gauge", f"{time.time() - s.started:.1f}"),
        ]
        lines = [x for name, kind, v in values
                 for x in (f"# TYPE megatron_amir_{name} {kind}", f"megatron_amir_{name} {v}")]
        lines.append("# TYPE megatron_amir_http_errors_total counter")
        lines += [f'megatron_amir_http_errors_total{{code="{c}"}} {v}' for c, v in sorted(s.errors.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- state-changing (token)
    async def pause(self, request: Request, mode: str = "keep"):
        self.require_token(request)
        if mode not in ("keep", "wait", "abort"):
            raise ApiError(400, f"mode must be keep, wait or abort, got {mode!r}", "mode")
        b = self.batcher()
        b.unpaused.clear()
        aborted = b.abort_queued("server paused with mode=abort; retry later") if mode == "abort" else 0
        if mode in ("wait", "abort"):
            await b.idle.wait()  # the running batch finishes (it cannot be interrupted mid-step)
        return {"message": "Generation paused", "mode": mode, "aborted_requests": aborted}

    async def resume(self, request: Request):
        self.require_token(request)
        b = self.batcher()
        b.unpaused.set()
        b.wakeup.set()
        return {"message": "Generation resumed"}

    async def init_transfer(self, request: Request):
        """backend "file" (default): nothing to set up. backend "gloo": join the trainer's broadcast
        group ({master_address, master_port, rank_offset, world_size}; this server is rank rank_offset);
        blocks until every member has joined."""
        self.require_token(request)
        info = (await self.json_body(request)).get("init_info", {})
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
            self._broadcaster = await loop.run_in_executor(
                None, lambda: TensorBroadcaster.gloo(host, port, rank, world, timeout_s=60))
        except Exception as exc:  # noqa: BLE001 - rendezvous failures are the caller's to fix
            raise ApiError(400, f"could not join the weight broadcast group: {exc}", "init_info") from None
        return {"message": "Weight transfer initialized"}

    async def start_update(self, request: Request):
        """vLLM's bracket around update_weights; the embedded engine swaps weights atomically under its
        lock, so there is nothing to prepare."""
        self.require_token(request)
        return {"message": "Weight update started"}

    async def finish_update(self, request: Request):
        self.require_token(request)
        return {"message": "Weight update finished"}

    async def _load(self, read: Any, default_version: Optional[int], param: str) -> tuple[int, float]:
        """``read()`` -> (tensors, version or None) in a worker thread, then load them into the engine;
        (number of tensors, seconds). A bad update leaves weights and version untouched (400 naming ``param``)."""
        from megatron_amir.rollout.weight_sync import WeightSyncError

        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            tensors, version = await loop.run_in_executor(None, read)
            version = default_version if version is None else version
            # load_weights takes the engine lock: a running batch finishes with the old weights first
            await loop.run_in_executor(None, lambda: self.engine.load_weights(tensors, version))
        except (WeightSyncError, KeyError, ValueError) as exc:
            raise ApiError(400, f"weight update failed: {exc}", param) from None
        self.stats.weight_updates += 1
        return len(tensors), round(time.perf_counter() - t0, 4)

    async def load_snapshot(self, path: Any, version: Any, param: str) -> dict:
        if not isinstance(path, str) or not path:
            raise ApiError(400, f"{param}.path must be a snapshot directory", f"{param}.path")
        _check_version(version, f"{param}.version")
        snap = Path(path).resolve()
        if self.root is not None and self.root not in snap.parents and snap != self.root:
            raise ApiError(403, f"snapshot {snap} is outside the allowed weights root {self.root}", f"{param}.path",
                           "PermissionDenied")
        from megatron_amir.rollout.weight_sync import read_snapshot

        def read():
            s = read_snapshot(snap, expected_version=version)
            return s.tensors, s.version

        num, seconds = await self._load(read, None, param)
        return {"num_tensors": num, "seconds": seconds}

    async def update_weights(self, request: Request):
        """File backend: update_info {path, version}. Broadcast backend (after a gloo init): vLLM's
        update_info {names, dtype_names, shapes} (+ optional version); the tensors arrive by broadcast."""
        self.require_token(request)
        info = (await self.json_body(request)).get("update_info")
        if not isinstance(info, dict):
            raise ApiError(400, "update_weights needs {'update_info': {'path': <snapshot dir>, 'version': <int>}} "
                                "or {'update_info': {'names', 'dtype_names', 'shapes'}}", "update_info")
        if "names" not in info:
            out = await self.load_snapshot(info.get("path"), info.get("version"), "update_info")
            return {"message": "Weights updated", "weight_version": str(self.engine.version), **out}
        comm = self._broadcaster
        if comm is None:
            raise ApiError(400, "broadcast update without init_weight_transfer_engine(backend=gloo)", "update_info")
        version = info.get("version")
        _check_version(version, "update_info.version")
        from megatron_amir.rollout.weight_sync import receive_tensors

        num, seconds = await self._load(lambda: (receive_tensors(comm, info), version), self.engine.version,
                                        "update_info")
        return {"message": "Weights updated", "weight_version": str(self.engine.version), "num_tensors": num,
                "seconds": seconds}

    async def collective_rpc(self, request: Request):
        """vLLM's RPC route, restricted to the methods our worker extension shares with it
        (vllm_worker.WeightSyncWorkerExtension): ``load_snapshot(path, version)``; ``join_weight_group(host, port,
        backend, world_size, timeout_s)`` and ``receive_weight_buckets(info)`` (the bucketed broadcast: each
        bucket is loaded into the engine before the next one is received). Answers {"results": [<one worker's>]}."""
        self.require_token(request)
        body = await self.json_body(request)
        method = body.get("method")
        args, kwargs = body.get("args") or [], body.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ApiError(400, "args must be a list and kwargs an object", "args")
        if method == "join_weight_group":
            return {"results": [await self._join_group(dict(zip(("host", "port", "backend", "world_size",
                                                                   "timeout_s"), args), **kwargs))]}
        if method == "receive_weight_buckets":
            merged = dict(zip(("info",), args), **kwargs)
            return {"results": [await self._receive_buckets(merged.get("info"))]}
        if method != "load_snapshot":
            raise ApiError(400, f"method {method!r} is not available (load_snapshot, join_weight_group, "
                                "receive_weight_buckets)", "method")
        merged = dict(zip(("path", "version"), args), **kwargs)
        out = await self.load_snapshot(merged.get("path"), merged.get("version"), "args")
        return {"results": [out["num_tensors"]]}

    async def _join_group(self, a: dict) -> int:
        from megatron_amir.rollout.weight_sync import TensorBroadcaster

        try:
            host, port, backend = str(a["host"]), int(a["port"]), str(a.get("backend") or "gloo")
            world, timeout_s = int(a.get("world_size", 2)), float(a.get("timeout_s", 120.0))
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "join_weight_group needs host, port (and backend, world_size, timeout_s)",
                           "args") from None
        if backend != "gloo" or world != 2:
            raise ApiError(400, f"the embedded server joins gloo groups of 2 (trainer and itself), got {backend!r}, "
                                f"world_size={world}", "args")
        loop = asyncio.get_running_loop()
        try:
            self._bucket_comm = await loop.run_in_executor(
                None, lambda: TensorBroadcaster.create("gloo", host, port, 1, 2, timeout_s))
        except Exception as exc:  # noqa: BLE001 - rendezvous failures are the caller's to fix
            raise ApiError(400, f"could not join the weight broadcast group: {exc}", "args") from None
        return 1

    async def _receive_buckets(self, info: Any) -> int:
        """Receive a bucketed update; the engine loads each bucket in place before the next one arrives. A failure
        part-way puts the previous version's weights back when ``info["rollback"]`` (the trainer's
        rollout.weight_sync_rollback; default true), else leaves the engine refusing to generate (503) at its previous
        version label until a complete update (``EmbeddedEngine.load_weight_buckets``)."""
        from megatron_amir.rollout.weight_sync import receive_buckets

        comm = getattr(self, "_bucket_comm", None)
        if comm is None:
            raise ApiError(400, "receive_weight_buckets without join_weight_group", "method")
        if not isinstance(info, dict):
            raise ApiError(400, "receive_weight_buckets needs the update_info object", "args")
        version = info.get("version")
        _check_version(version, "info.version")
        if version is None:
            raise ApiError(400, "info.version is required", "info.version")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            n = await loop.run_in_executor(
                None, lambda: self.engine.load_weight_buckets(receive_buckets(comm, info), version,
                                                              rollback=bool(info.get("rollback", True))))
        except (KeyError, ValueError) as exc:
            self._bucket_comm = None  # the sender and this server are at different points of the stream now
            raise ApiError(400, f"weight update failed: {exc}", "args") from None
        except Exception as exc:  # noqa: BLE001 - a dead sender / timeout: the group is unusable
            self._bucket_comm = None
            raise ApiError(500, f"weight broadcast failed: {type(exc).__name__}: {exc}", "args") from None
        self.stats.weight_updates += 1
        log.info("loaded %d tensors of version %d by broadcast in %.2f s", n, version, time.perf_counter() - t0)
        return n

    async def reset_prefix_cache(self, request: Request):
        self.require_token(request)
        return {"message": "no prefix cache in the embedded engine"}

    async def update_version(self, request: Request):
        self.require_token(request)
        v = (await self.json_body(request)).get("new_version")
        try:
            iv = int(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        except ValueError:
            iv = None
        if iv is None:
            raise ApiError(400, "new_version must be an integer (or its string)", "body.new_version")
        self.engine.set_version(iv)  # version label only, as in vLLM: weights unchanged
        return {"success": True, "new_version": str(iv)}


def create_app(engine: EmbeddedEngine, token: Optional[str], model_name: str = "megatron-amir",
               weights_root: Optional[str] = None, max_batch_rows: int = 512, max_request_rows: int = 8192) -> FastAPI:
    """The FastAPI app of a ``RolloutServer`` around ``engine`` (arguments as there)."""
    return RolloutServer(engine, token, model_name, weights_root, max_batch_rows, max_request_rows).app


def _check_version(version: Any, param: str) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ApiError(400, f"{param} must be an integer", param)


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
