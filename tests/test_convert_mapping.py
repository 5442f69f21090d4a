"""HF <-> Megatron mapping, config bridge and safetensors IO (fast; no Megatron process groups).

Layouts are checked against references written here with explicit loops over groups / heads / rows.
"""

import json
import struct

import pytest
import torch

from checkpoints_tools.testing import CASES, make_hf_model
from megatron_amir.config import ModelConfig
from megatron_amir.convert import hf_io
from megatron_amir.convert.hf_config import hf_config_from_model_config, model_config_from_hf
from megatron_amir.convert.mapping import (
    GatedMLPMapping,
    MappingError,
    QKVMapping,
    VocabMapping,
    gather_tp_shards,
    group_hf_tensors,
    hf_to_mcore_named_tensors,
    mcore_tp_shard_to_hf,
    mcore_to_hf_named_tensors,
    model_mapping,
    padded_vocab_size,
    strip_vocab,
    supported_architectures,
)

torch.set_num_threads(1)


def _cfg(**kw):
    base = dict(arch="llama", vocab_size=256, hidden_size=24, ffn_hidden_size=40, num_layers=2,
                num_attention_heads=6, num_kv_heads=2, head_dim=4)
    return ModelConfig(**{**base, **kw})


def _qkv_loop_reference(q, k, v, nh, ng, d):
    """Megatron linear_qkv rows, built one row at a time: for each group g, its nh/ng q heads, then k_g, v_g."""
    rows = []
    per = nh // ng
    for g in range(ng):
        for h in range(g * per, (g + 1) * per):
            for r in range(d):
                rows.append(q[h * d + r])
        for r in range(d):
            rows.append(k[g * d + r])
        for r in range(d):
            rows.append(v[g * d + r])
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_layout_matches_loop_reference(bias):
    cfg = _cfg()
    nh, ng, d, H = 6, 2, 4, 24
    tail = () if bias else (H,)
    q, k, v = (torch.randn(n * d, *tail, dtype=torch.float64) for n in (nh, ng, ng))
    name = "decoder.layers.{L}.self_attention.linear_qkv." + ("bias" if bias else "weight")
    mp = QKVMapping(name, ("q", "k", "v"))
    fused = mp.to_mcore([q, k, v], cfg, 256)
    assert torch.equal(fused, _qkv_loop_reference(q, k, v, nh, ng, d))
    back = mp.to_hf(fused, cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    # a TP rank's shard (contiguous rows) holds whole groups: it maps to that rank's slice of q, k and v
    for tp in (1, 2):
        for r in range(tp):
            qs, ks, vs = mp.to_hf(mp.tp_shard(fused, r, tp), cfg)
            assert torch.equal(qs, q.chunk(tp)[r]) and torch.equal(ks, k.chunk(tp)[r]) and torch.equal(vs, v.chunk(tp)[r])


def test_gated_mlp_layout_and_tp_shards():
    cfg = _cfg()
    gate, up = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    mp = GatedMLPMapping("decoder.layers.{L}.mlp.linear_fc1.weight", ("g", "u"))
    fc1 = mp.to_mcore([gate, up], cfg, 256)
    ref = torch.stack([gate[i] for i in range(40)] + [up[i] for i in range(40)])
    assert torch.equal(fc1, ref)
    for tp in (2, 4):
        for r in range(tp):
            shard = mp.tp_shard(fc1, r, tp)
            n = 40 // tp
            ref_shard = torch.stack([gate[r * n + i] for i in range(n)] + [up[r * n + i] for i in range(n)])
            assert torch.equal(shard, ref_shard)  # Megatron's swiglu layout per rank: [gate_r; up_r]
            g, u = mp.to_hf(shard, cfg)
            assert torch.equal(g, gate[r * n:(r + 1) * n]) and torch.equal(u, up[r * n:(r + 1) * n])


def test_vocab_padding_and_strip():
    assert padded_vocab_size(300, 1) == 384 and padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(512, 2) == 512 and padded_vocab_size(513, 4) == 1024
    cfg = _cfg(vocab_size=384)
    emb = torch.randn(300, 24)
    mp = VocabMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
    out = mp.to_mcore([emb], cfg, 300)
    assert out.shape == (384, 24) and torch.equal(out[:300], emb) and not out[300:].any()
    assert torch.equal(strip_vocab(out, 300), emb)
    with pytest.raises(MappingError, match="rows > padded vocab"):
        mp.to_mcore([torch.randn(400, 24)], cfg, 400)


def _case_model(case: str):
    """(HF model, its ModelConfig with the vocabulary padded for TP=2, original vocabulary size)."""
    model = make_hf_model(case)
    mc = model_config_from_hf(json.loads(model.config.to_json_string()))
    return model, mc.model_copy(update={"vocab_size": padded_vocab_size(mc.vocab_size, 2)}), mc.vocab_size


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_and_tp_gather(case):
    model, mc, vocab = _case_model(case)
    sd = model.state_dict()
    mcore = dict(hf_to_mcore_named_tensors(sd.items(), mc, vocab_size=vocab))
    assert set(mcore) == set(model_mapping(mc).expected_mcore_names())
    assert ("output_layer.weight" in mcore) == (not mc.tie_word_embeddings)
    back = dict(mcore_to_hf_named_tensors(mcore, mc, vocab_size=vocab))
    expected = set(sd) - ({"lm_head.weight"} if mc.tie_word_embeddings else set())
    assert set(back) == expected
    assert all(torch.equal(back[n], sd[n]) for n in back)
    # per-TP-rank path (weight sync from each rank): shards -> HF pieces -> gathered == full HF tensors
    mm = model_mapping(mc)
    for name, full in mcore.items():
        mp, _ = mm.find_mcore(name)
        per_rank = [mcore_tp_shard_to_hf(name, mp.tp_shard(full, r, 2), mc) for r in range(2)]
        for j, (hf_name, _, axis) in enumerate(per_rank[0]):
            gathered = gather_tp_shards([p[j][1] for p in per_rank], axis)
            if isinstance(mp, VocabMapping):
                gathered = strip_vocab(gathered, vocab)
            assert torch.equal(gathered, sd[hf_name]), hf_name


@pytest.mark.parametrize("case", list(CASES))
def test_mcore_rows_rebuild_to_mcore(case):
    """The row plan hf_to_mcore copies file to file gives exactly to_mcore's tensor (vocab padding included)."""
    model, mc, vocab = _case_model(case)
    seen = 0
    for mp, _, parts in group_hf_tensors(model.state_dict().items(), mc):
        full = mp.to_mcore(parts, mc, vocab)
        rows = [parts[i][first:first + n] if i is not None else full.new_zeros((n, *full.shape[1:]))
                for i, first, n in mp.mcore_rows(mc, vocab)]
        assert torch.equal(torch.cat(rows), full), mp.mcore
        seen += 1
    assert seen == len(model_mapping(mc).expected_mcore_names())


def test_te_spelling_and_pipeline_offset():
    mc = _cfg(num_layers=4)
    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(24),
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": torch.full((24,), 2.0),
          "decoder.layers.0.self_attention.linear_qkv._extra_state": None}
    out = dict(mcore_to_hf_named_tensors(te, mc, layer_offset=2, strict=False))
    assert set(out) == {"model.layers.2.input_layernorm.weight", "model.layers.2.post_attention_layernorm.weight"}
    with pytest.raises(MappingError, match="lacks"):
        dict(mcore_to_hf_named_tensors(te, mc, layer_offset=2))  # layer 0 is incomplete


def test_mapping_errors_name_the_tensor():
    mc = _cfg()
    good = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(24, 24),
            "model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 24),
            "model.layers.0.self_attn.v_proj.weight": torch.zeros(9, 24)}
    with pytest.raises(MappingError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight.*\(9, 24\)"):
        list(hf_to_mcore_named_tensors(good.items(), mc, vocab_size=256))
    with pytest.raises(MappingError, match="model.layers.0.self_attn.foo"):
        list(hf_to_mcore_named_tensors([("model.layers.0.self_attn.foo", torch.zeros(1))], mc, vocab_size=256))
    with pytest.raises(MappingError, match=r"missing.*v_proj"):
        list(hf_to_mcore_named_tensors(list(good.items())[:2], mc, vocab_size=256))
    # RoPE buffers some older checkpoints carry are derived, not weights: skipped
    inv = [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(2))]
    assert list(hf_to_mcore_named_tensors(inv, mc, vocab_size=256)) == []
    with pytest.raises(MappingError, match="layer 7"):
        list(hf_to_mcore_named_tensors([("model.layers.7.input_layernorm.weight", torch.zeros(24))], mc,
                                       vocab_size=256))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    import transformers

    model = make_hf_model(case)
    hf = json.loads(model.config.to_json_string())
    mc = model_config_from_hf(hf)
    back = hf_config_from_model_config(mc, base=hf)
    ref = type(model.config)(**{k: v for k, v in hf.items() if k != "transformers_version"}).to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                "max_position_embeddings", "architectures", "bos_token_id", "eos_token_id"):
        assert back.get(key) == ref.get(key), key
    # the exported dict builds the same architecture in transformers
    cfg2 = transformers.AutoConfig.for_model(**back)
    m2 = transformers.AutoModelForCausalLM.from_config(cfg2)
    assert {n: p.shape for n, p in m2.state_dict().items()} == {n: p.shape for n, p in model.state_dict().items()}


def test_config_fields():
    model = make_hf_model("llama3-untied")
    mc = model_config_from_hf(json.loads(model.config.to_json_string()))
    assert mc.rope_theta == 500000.0 and mc.rope_scaling["factor"] == 8.0 and mc.rope_scaling["rope_type"] == "llama3"
    q3 = model_config_from_hf(json.loads(make_hf_model("qwen3-qknorm").config.to_json_string()))
    assert q3.arch == "qwen3" and q3.head_dim == 32 and q3.use_qk_norm and not q3.use_qkv_bias
    q2 = model_config_from_hf(json.loads(make_hf_model("qwen2-bias-tied").config.to_json_string()))
    assert q2.use_qkv_bias and q2.tie_word_embeddings and q2.rope_theta == 1e6
    # transformers 4.x spelling of the same settings
    legacy = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
              "rope_theta": 5e5, "max_position_embeddings": 9000, "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    mc = model_config_from_hf(legacy)
    assert (mc.rope_theta, mc.rope_scaling["factor"], mc.params_dtype, mc.num_kv_heads) == (5e5, 32.0, "bf16", 4)


@pytest.mark.parametrize("patch, match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "supported: LlamaForCausalLM, MistralForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_refused(patch, match):
    hf = json.loads(make_hf_model("llama3-untied").config.to_json_string())
    hf.update(patch)
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(hf)


def test_mistral_sliding_window_refused():
    import transformers

    hf = transformers.MistralConfig(sliding_window=4096).to_dict()
    hf["architectures"] = ["MistralForCausalLM"]
    with pytest.raises(ValueError, match="sliding_window=4096"):
        model_config_from_hf(hf)
    assert "Qwen3ForCausalLM" in supported_architectures()


# ------------------------------------------------------------------------------------------------ safetensors IO
def test_streaming_reader_matches_safetensors_and_detects_truncation(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4, 2).to(torch.bfloat16), "empty": torch.zeros(0, 3)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    got = dict(hf_io.iter_safetensors(path))
    ref = load_file(str(path))
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(hf_io.HFCheckpointError, match="cut.safetensors: not a readable safetensors file"):
        list(hf_io.iter_safetensors(tmp_path / "cut.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(hf_io.HFCheckpointError, match="bad.safetensors: not a readable"):
        list(hf_io.iter_safetensors(tmp_path / "bad.safetensors"))


def test_sharded_writer_and_index(tmp_path):
    w = hf_io.ShardedWriter(tmp_path, max_shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each -> 2 per shard
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / hf_io.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 200 and index["weight_map"]["t4"] == files[2].name
    got = dict(hf_io.iter_hf_tensors(hf_io.list_shards(tmp_path)))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    files[1].unlink()
    with pytest.raises(hf_io.HFCheckpointError, match="missing shard"):
        hf_io.list_shards(tmp_path)
    with pytest.raises(hf_io.HFCheckpointError, match="no model.safetensors"):
        hf_io.list_shards(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ torch_dist writer
@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write-fallback"])
def test_torch_dist_writer_reads_back_with_dcp(tmp_path, monkeypatch, kernel_copy):
    """Chunks from file ranges and from memory, and an object, read back by DCP's own reader."""
    import io
    import os

    import torch.distributed.checkpoint as dcp

    from megatron_amir.convert.torch_dist import TorchDistWriter, slice_pieces

    if not kernel_copy:
        def no_copy(*args, **kwargs):
            raise OSError(18, "EXDEV")
        monkeypatch.setattr(os, "copy_file_range", no_copy)
    w = torch.randn(4, 6)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10 + w[:2].numpy().tobytes())
    fd = os.open(src, os.O_RDONLY)
    try:
        pieces = [(fd, 10, 48), w[2:].numpy().tobytes()]
        assert slice_pieces(pieces, 40, 16) == [(fd, 50, 8), memoryview(w[2:].numpy().tobytes())[:8]]
        writer = TorchDistWriter(tmp_path / "ckpt", sync=not kernel_copy)
        writer.add_tensor("w", (4, 6), torch.float32, [((0, 0), (2, 6), 0), ((2, 0), (2, 6), 48)], lambda: pieces)
        writer.add_tensor("b", (3,), torch.bfloat16, [((0,), (3,), 0)],
                          lambda: [torch.arange(3).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()])
        writer.add_object("obj/shard_0_1", {"format": "x"})
        writer.close()
    finally:
        os.close(fd)
    state = {"w": torch.zeros(4, 6), "b": torch.zeros(3, dtype=torch.bfloat16), "obj/shard_0_1": io.BytesIO()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(tmp_path / "ckpt"), no_dist=True)
    assert torch.equal(state["w"], w) and torch.equal(state["b"], torch.arange(3).to(torch.bfloat16))
    assert state["obj/shard_0_1"] == [{"format": "x"}]
    assert json.loads((tmp_path / "ckpt" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"

    def broken():
        raise MappingError("no bytes for 'x'")
    writer = TorchDistWriter(tmp_path / "bad")
    writer.add_tensor("x", (2,), torch.float32, [((0,), (2,), 0)], broken)
    writer.add_tensor("y", (2,), torch.float32, [((0,), (2,), 0)], lambda: [bytes(8)])
    with pytest.raises(MappingError, match="no bytes for 'x'"):
        writer.close()
    assert not (tmp_path / "bad" / ".metadata").exists()  # the caller removes the directory


def test_short_llama3_rope_scaling_exports_megatron_values():
    """A config giving only {rope_type: llama3, factor} (the model builder fills in Megatron's fixed 1/4/8192)
    exports those values, so transformers builds the same rotary embedding instead of rejecting the config."""
    import transformers

    cfg = ModelConfig(arch="llama", vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                      num_attention_heads=2, num_kv_heads=1, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 16.0})
    hf = hf_config_from_model_config(cfg)
    assert hf["rope_parameters"] == {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                     "rope_theta": 500000.0}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))  # accepted and built
