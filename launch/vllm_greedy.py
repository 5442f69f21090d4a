"""Greedy answers of an HF directory in stock vLLM (offline ``LLM``), for the real-model parity check.

    <vllm venv>/bin/python launch/vllm_greedy.py --model DIR --prompts PROMPTS.json --max-new-tokens N --out OUT.json

Runs under vLLM's own virtualenv (``.venv-vllm``, scripts/bootstrap_vllm.sh), which does not have this project
installed: this file imports only vLLM and the standard library. PROMPTS.json is a list of
``{"id", "prompt_ids"}``; OUT.json gets ``{id: text}``. Float32 and no ``generation_config.json`` defaults
(``generation_config="vllm"``), so the logits are those of the weights alone; eager mode (torch.compile takes
minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--eos-id", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(a.prompts) as f:
        rows = json.load(f)
    llm = LLM(model=a.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              generation_config="vllm", max_num_seqs=16)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_new_tokens, stop_token_ids=[a.eos_id],
                            skip_special_tokens=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows], params)
    result = {r["id"]: o.outputs[0].text for r, o in zip(rows, outs)}
    tmp = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(a.out)), delete=False)
    with tmp:
        json.dump(result, tmp, indent=1, ensure_ascii=False)
    os.replace(tmp.name, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
