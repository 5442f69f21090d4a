"""HF <-> Megatron-Core converters end to end: logit parity at (TP, PP) = (1,1), (2,1), (1,2) under gloo, bit-exact
round trip, the trainer's weight-sync path, and the error cases (clear message, no partial output).

Every family of checkpoints_tools.testing.CASES (Llama with llama3 rope scaling, Qwen2 QKV bias, Qwen3 q/k norm
with head_dim, Mistral without sliding window; tied and untied) is converted once per vocabulary padding; the
parity test starts one 2-process world and evaluates all layouts and checkpoints inside it.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from checkpoints_tools.testing import CASES, make_hf_model, save_hf_model
from megatron_amir.convert.hf_to_mcore import hf_to_mcore
from megatron_amir.convert.mcore_to_hf import mcore_to_hf

torch.set_num_threads(2)
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: {"hf": dir, "model": HF model, "mc": {tp: converted dir}}}; shards kept small to exercise the index."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for case in CASES:
        model = make_hf_model(case)
        hf = save_hf_model(model, root / case / "hf", max_shard_size="200KB")
        mc = {tp: root / case / f"mc-tp{tp}" for tp in (1, 2)}
        for tp, d in mc.items():
            meta = hf_to_mcore(hf, d, tp=tp, pp=2 if tp == 1 else 1)
            assert meta["padded_vocab_size"] % (128 * tp) == 0
        out[case] = {"hf": hf, "model": model, "mc": mc}
    return out


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 300, (2, 16), generator=g)


@pytest.fixture(scope="module")
def hf_logits(converted, tokens):
    with torch.no_grad():
        return {case: c["model"](tokens).logits for case, c in converted.items()}


@pytest.fixture(scope="module")
def mcore_logits(converted, tokens):
    from checkpoints_tools.parity import megatron_logits

    cases = list(CASES)
    jobs = {(tp, pp): [converted[c]["mc"][tp] for c in cases] for tp, pp in LAYOUTS}
    # resharding: checkpoints written for TP=2 (vocab padded to 256-multiples) also load at TP=1
    reshard = ["llama3-untied", "qwen2-bias-tied"]
    jobs[(1, 1)] = jobs[(1, 1)] + [converted[c]["mc"][2] for c in reshard]
    got = megatron_logits(jobs, tokens)
    names = {layout: cases + ([c + "@tp2ckpt" for c in reshard] if layout == (1, 1) else []) for layout in LAYOUTS}
    return {layout: dict(zip(names[layout], logits)) for layout, logits in got.items()}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"tp{x[0]}pp{x[1]}")
def test_logit_parity(layout, mcore_logits, hf_logits):
    got = mcore_logits[layout]
    assert len(got) == len(CASES) + (2 if layout == (1, 1) else 0)
    for name, logits in got.items():
        ref = hf_logits[name.split("@")[0]]
        assert logits.shape == ref.shape, name
        err = (logits - ref).abs().max().item()
        assert err < TOL, f"{name} at TP,PP={layout}: max |logit diff| {err:.3g}"


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_exact(case, converted, tokens, tmp_path):
    import transformers

    c = converted[case]
    out = tmp_path / "hf2"
    files = mcore_to_hf(c["mc"][2], out, max_shard_size="200KB")
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    a, b = _load_dir(c["hf"]), _load_dir(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (out / "generation_config.json").is_file()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(m2) is type(c["model"])
    with torch.no_grad():
        assert torch.equal(m2(tokens).logits, c["model"](tokens).logits)
    src_cfg = json.loads((c["hf"] / "config.json").read_text())
    new_cfg = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "tie_word_embeddings", "rope_parameters", "num_key_value_heads", "architectures"):
        assert new_cfg.get(key) == src_cfg.get(key), key


def test_bf16_round_trip(tmp_path):
    model = make_hf_model("qwen2-bias-tied", dtype=torch.bfloat16)
    hf = save_hf_model(model, tmp_path / "hf")
    meta = hf_to_mcore(hf, tmp_path / "mc", tp=2)
    assert meta["model"]["params_dtype"] == "bf16"
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf2")
    a, b = _load_dir(hf), _load_dir(tmp_path / "hf2")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def _dcp_items(d: Path) -> tuple[dict, dict]:
    """(state_dict_metadata, {(key, chunk offset): item as torch.load reads it}) of a torch_dist directory."""
    import io
    import pickle

    md = pickle.loads((d / ".metadata").read_bytes())
    items = {}
    for index, info in md.storage_data.items():
        with open(d / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = io.BytesIO(f.read(info.length))
        items[(index.fqn, index.offset and tuple(index.offset))] = torch.load(raw, weights_only=False)
    return md.state_dict_metadata, items


@pytest.mark.parametrize("case,tp,src_dtype,dtype", [
    ("llama3-untied", 2, torch.float32, None),  # vocab padding rows
    ("qwen3-qknorm", 1, torch.float32, None),
    ("qwen2-bias-tied", 1, torch.bfloat16, None),  # bf16 weights copied, bf16 norms cast to Megatron's fp32
    ("mistral-nowindow-tied", 1, torch.float32, "bf16"),  # every tensor cast
], ids=lambda x: str(x).replace("torch.", ""))
def test_checkpoint_equals_megatron_save(case, tp, src_dtype, dtype, tmp_path):
    """The directly written torch_dist directory has the format the trainer's save_checkpoint
    (dist_checkpointing.save) writes: the same keys, global shapes, dtypes, chunks and objects, and loading it
    and saving it again with Megatron changes no item. (The values themselves: round-trip and parity tests.)"""
    from megatron_amir.convert.megatron_side import (
        MODEL_SUBDIR, build_empty_model, load_model, read_meta, save_model, single_process_megatron,
    )
    from megatron_amir.config import ModelConfig

    hf = save_hf_model(make_hf_model(case, dtype=src_dtype), tmp_path / "hf", max_shard_size="200KB")
    hf_to_mcore(hf, tmp_path / "mc", tp=tp, dtype=dtype)
    cfg = ModelConfig(**read_meta(tmp_path / "mc")["model"])
    with single_process_megatron():
        model = build_empty_model(cfg)
        load_model(model, tmp_path / "mc" / MODEL_SUBDIR)
        save_model(model, tmp_path / "megatron")
    (mine_md, mine), (ref_md, ref) = _dcp_items(tmp_path / "mc" / MODEL_SUBDIR), _dcp_items(tmp_path / "megatron")
    assert mine_md == ref_md and set(mine) == set(ref)
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
        else:
            assert mine[key] == value, key
    assert (tmp_path / "mc" / MODEL_SUBDIR / "metadata.json").read_text() == \
        (tmp_path / "megatron" / "metadata.json").read_text()


def test_weight_sync_path_matches_hf(converted):
    """Trainer -> rollout: the trainer's gathered full state dict (TE-style sharded names) through the one mapping."""
    from megatron_amir.convert.mapping import mcore_to_hf_named_tensors
    from megatron_amir.convert.megatron_side import (
        MODEL_SUBDIR, build_empty_model, load_model, read_meta, single_process_megatron,
    )
    from megatron_amir.config import ModelConfig
    from megatron_amir.training.model_checkpoint import gather_full_state_dict

    for case in ("qwen3-qknorm", "qwen2-bias-tied"):
        c = converted[case]
        meta = read_meta(c["mc"][2])
        cfg = ModelConfig(**meta["model"])
        with single_process_megatron():
            model = build_empty_model(cfg)
            load_model(model, c["mc"][2] / MODEL_SUBDIR)
            full = gather_full_state_dict([model])
        hf = dict(mcore_to_hf_named_tensors(full, cfg, vocab_size=meta["original_vocab_size"]))
        ref = {k: v for k, v in c["model"].state_dict().items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        assert set(hf) == set(ref)
        assert all(torch.equal(hf[k], ref[k]) for k in ref), case


# ------------------------------------------------------------------------------------------------ errors
def _no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.tmp") for p in parent.iterdir())


def test_output_dir_not_empty(converted, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_mcore(converted["llama-tied"]["hf"], out)
    with pytest.raises(FileExistsError, match="not empty"):
        mcore_to_hf(converted["llama-tied"]["mc"][1], out)
    assert (out / "x").read_text() == "keep me"
    # an existing *empty* directory is fine
    (tmp_path / "empty").mkdir()
    hf_to_mcore(converted["llama-tied"]["hf"], tmp_path / "empty")
    assert (tmp_path / "empty" / "model").is_dir()


def test_unsupported_architecture_lists_supported(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        hf_to_mcore(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")


def test_tp_not_dividing_heads(converted, tmp_path):
    with pytest.raises(ValueError, match=r"TP=3 does not divide num_attention_heads=4"):
        hf_to_mcore(converted["llama-tied"]["hf"], tmp_path / "out", tp=3)
    with pytest.raises(ValueError, match=r"PP=4 does not divide num_hidden_layers=2"):
        hf_to_mcore(converted["llama-tied"]["hf"], tmp_path / "out", pp=4)


def test_missing_shard_and_shape_mismatch_leave_no_output(converted, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_amir.convert.hf_io import HFCheckpointError
    from megatron_amir.convert.mapping import MappingError

    src = converted["qwen3-qknorm"]["hf"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    os.remove(broken / shards[-1])
    with pytest.raises(HFCheckpointError, match=f"missing shard.*{shards[-1]}"):
        hf_to_mcore(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # a wrong shape in the last shard: the failure happens after most tensors were written
    shutil.copy(src / shards[-1], broken / shards[-1])
    tensors = load_file(str(broken / shards[-1]))
    victim = sorted(tensors)[0]
    tensors[victim] = torch.cat([tensors[victim], tensors[victim][:1]])
    save_file(tensors, str(broken / shards[-1]), metadata={"format": "pt"})
    with pytest.raises(MappingError, match=f"shape mismatch for tensor '{victim}'"):
        hf_to_mcore(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")


def test_cli_main(converted, tmp_path, capsys):
    from checkpoints_tools.cli import main

    hf = converted["mistral-nowindow-tied"]["hf"]
    assert main(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2", "--dtype", "fp32",
                 "--fsync"]) == 0
    assert main(["mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["hf-to-mcore", "--hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_export_from_trainer_step_dir(converted, tmp_path):
    """mcore-to-hf also reads a trainer step directory (model/ + meta.json holding the resolved config)."""
    import shutil

    src = converted["llama3-untied"]["mc"][1]
    meta = json.loads((src / "megatron_amir_model.json").read_text())
    step = tmp_path / "step_00000010"
    shutil.copytree(src / "model", step / "model")
    (step / "meta.json").write_text(json.dumps({"step": 10, "config": {"model": meta["model"]}}))
    mcore_to_hf(step, tmp_path / "hf", vocab_size=meta["original_vocab_size"])
    a, b = _load_dir(converted["llama3-untied"]["hf"]), _load_dir(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
