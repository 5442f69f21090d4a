"""Requests to a vLLM-compatible server and the answer each must get, as data, so that one list drives
our embedded server (tests/test_protocol_conformance.py) and a real ``vllm serve`` (tests/test_vllm_real.py).

Each case is a dict:
  name         unique label (the test id)
  method, path the HTTP request
  body         a JSON object, or raw JSON text for values a JSON encoder refuses (NaN, Infinity); None: no body
  status       the status our embedded server answers
  param        for a 4xx: the error's ``param`` (None when the error names no field)
  vllm_status  only where vLLM legitimately answers otherwise (it honours penalties, logit_bias, ...)
  vllm_param   only where vLLM's error names another param (or none) than ours
  vllm_error_shape  False where vLLM answers FastAPI's {"detail": ...} (its unknown routes and methods), not the
               OpenAI error shape our server uses

Token-id prompts use ids 1..9, valid in any vocabulary; the runner fills ``model`` into dict bodies that
lack it (``with_model``), except cases whose point is the model name.
"""

from __future__ import annotations

from typing import Any, Optional

OK = {"prompt": [1, 2, 3], "max_tokens": 4}


_SAME = object()


def _c(name: str, body: Any, status: int, param: Optional[str] = None, *, method: str = "POST",
       path: str = "/v1/completions", vllm_status: Optional[int] = None, vllm_param: Any = _SAME,
       vllm_error_shape: bool = True) -> dict[str, Any]:
    case = {"name": name, "method": method, "path": path, "body": body, "status": status, "param": param}
    if vllm_status is not None:
        case["vllm_status"] = vllm_status
    if vllm_param is not _SAME:
        case["vllm_param"] = vllm_param
    if not vllm_error_shape:
        case["vllm_error_shape"] = False
    return case


CASES: list[dict[str, Any]] = [
    # ---- answered
    _c("single_prompt", dict(OK), 200),
    _c("batch_n_logprobs_token_ids", {"prompt": [[1, 2, 3], [4, 5]], "n": 3, "max_tokens": 5, "temperature": 0.8,
                                      "top_p": 0.9, "top_k": -1, "seed": 7, "logprobs": 0, "return_token_ids": True,
                                      "stop_token_ids": [9], "return_tokens_as_token_ids": True}, 200),
    _c("greedy", {"prompt": [3, 1, 4], "max_tokens": 3, "temperature": 0}, 200),
    # unsupported fields at their "off" value are accepted (clients that always send them keep working)
    _c("off_values_accepted", dict(OK, n=2, best_of=2, logit_bias={}, presence_penalty=0, frequency_penalty=0.0,
                                   repetition_penalty=1.0, min_p=0.0, min_tokens=0, ignore_eos=False,
                                   prompt_logprobs=None), 200),
    _c("models", None, 200, method="GET", path="/v1/models"),
    # ---- sampling fields the embedded engine cannot honour: a 400 naming the field, never silently ignored
    _c("logit_bias", dict(OK, logit_bias={"5": 100}), 400, "logit_bias", vllm_status=200),
    _c("presence_penalty", dict(OK, presence_penalty=0.5), 400, "presence_penalty", vllm_status=200),
    _c("frequency_penalty", dict(OK, frequency_penalty=-0.5), 400, "frequency_penalty", vllm_status=200),
    _c("repetition_penalty", dict(OK, repetition_penalty=1.2), 400, "repetition_penalty", vllm_status=200),
    _c("min_p", dict(OK, min_p=0.1), 400, "min_p", vllm_status=200),
    _c("min_tokens", dict(OK, min_tokens=2), 400, "min_tokens", vllm_status=200),
    _c("ignore_eos", dict(OK, ignore_eos=True), 400, "ignore_eos", vllm_status=200),
    _c("best_of", dict(OK, n=1, best_of=3), 400, "best_of", vllm_status=200),
    _c("prompt_logprobs", dict(OK, prompt_logprobs=1), 400, "prompt_logprobs", vllm_status=200),
    # ---- bad values
    _c("temperature_nan", '{"prompt": [1, 2], "max_tokens": 2, "temperature": NaN}', 400, "temperature"),
    _c("temperature_infinity", '{"prompt": [1, 2], "max_tokens": 2, "temperature": Infinity}', 400, "temperature"),
    _c("temperature_negative", dict(OK, temperature=-1), 400, "temperature"),
    _c("n_zero", dict(OK, n=0), 400, "n", vllm_param=None),
    # vLLM: "n must be 1 when using greedy sampling" (the fleet client asks for one greedy sample and repeats it)
    _c("greedy_n2", dict(OK, n=2, temperature=0), 400, "n", vllm_param=None),
    _c("stream", dict(OK, stream=True), 400, "stream", vllm_status=200),
    # (vLLM started with --skip-tokenizer-init needs token-id tokens in any log-prob record)
    _c("logprobs_5", dict(OK, logprobs=5, return_tokens_as_token_ids=True), 400, "logprobs", vllm_status=200),
    _c("unknown_model", dict(OK, model="no-such-model"), 404, "model"),
    _c("not_json", '{"prompt": [1, 2', 400, vllm_param="body.16"),  # vLLM: the offset of the JSON error
    # ---- routes
    _c("unknown_route", None, 404, method="GET", path="/v1/no_such_route", vllm_error_shape=False),
    _c("wrong_method", None, 405, method="GET", path="/v1/completions", vllm_error_shape=False),
]


def with_model(case: dict[str, Any], model: str) -> Any:
    """The body to send: dict bodies get ``model`` unless they name one."""
    body = case["body"]
    if isinstance(body, dict) and "model" not in body:
        return {**body, "model": model}
    return body
