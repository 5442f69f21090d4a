"""Policy in one process (TP=PP=DP=1, gloo world of 1): log-probs, the summed micro-batch loss, save/load."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_amir.config import Config

torch.set_num_threads(2)

N, L, G, V = 8, 10, 4, 64


def make_cfg(**train):
    t = dict(lr=1e-3, micro_batch_size=2, clip_grad=1e9, seed=3, steps=10)
    t.update(train)
    return Config(
        model=dict(arch="llama", vocab_size=V, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                   num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64),
        algorithm=dict(amir=dict(enabled=True, lambda_init=0.05, adaptive_lambda=False)),
        data=dict(prompts_per_step=N // G), rollout=dict(group_size=G), train=t,
    )


def batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (N, L), generator=g)
    mask = torch.zeros(N, L - 1)
    for i in range(N):
        mask[i, 2 : 3 + i % 5] = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    return tokens, mask, rewards, torch.arange(N) // G


def prepared_for(cfg, old_logp, mask, rewards, gids):
    from megatron_amir.algorithms import AmirState, prepare_batch

    return prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old_logp,
                         cfg=cfg.algorithm, amir_state=AmirState.from_config(cfg.algorithm.amir))


def direct_logprobs(policy, tokens):
    """Independent path: one forward of the whole batch, float64 log_softmax, gather."""
    model = policy.model[0]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, pos, None)
    ls = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return ls.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def policy():
    from megatron_amir.training.policy import Policy

    return Policy(make_cfg())


def test_compute_logprobs_matches_direct_forward(policy):
    tokens, *_ = batch()
    with torch.no_grad():
        ref = direct_logprobs(policy, tokens)
    for mbs in (1, 3, 8):
        lp = policy.compute_logprobs(tokens, micro_batch_size=mbs)
        assert lp.shape == (N, L - 1) and lp.dtype == torch.float32
        assert float((lp.double() - ref).abs().max()) < 1e-5
    # temperature divides the logits
    lp_t = policy.compute_logprobs(tokens, temperature=0.7)
    with torch.no_grad():
        logits = policy.model[0](tokens, torch.arange(L).expand_as(tokens), None)
    ref_t = torch.log_softmax(logits[:, :-1].double() / 0.7, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert float((lp_t.double() - ref_t).abs().max()) < 1e-5


def test_right_padding_does_not_change_earlier_positions(policy):
    tokens, *_ = batch()
    other = tokens.clone()
    other[:, 6:] = (other[:, 6:] + 17) % V  # different "padding" after position 5
    a, b = policy.compute_logprobs(tokens), policy.compute_logprobs(other)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.equal(a[:, 5:], b[:, 5:])


def test_train_step_gradient_is_the_summed_loss_gradient():
    """4 micro-batches through Megatron's schedule == one full-batch autograd of the total loss."""
    from megatron_amir.algorithms import micro_batch_loss
    from megatron_amir.training.policy import Policy

    cfg = make_cfg()
    pol = Policy(cfg)
    tokens, mask, rewards, gids = batch()
    old = pol.compute_logprobs(tokens)
    prep = prepared_for(cfg, old, mask, rewards, gids)
    assert prep.pair_token_coef is not None  # the AMIR pair term takes part
    # reference: whole batch at once, float64 log-softmax, autograd (DDP hooks put grads in main_grad)
    for chunk in pol.model:
        chunk.zero_grad_buffer()
    logp = direct_logprobs(pol, tokens)
    ref_loss, _ = micro_batch_loss(logp, prep, cfg.algorithm)
    ref_loss.backward()
    params = [p for p in pol.model[0].parameters() if p.requires_grad]
    ref_grads = [p.main_grad.clone() for p in params]
    assert sum(float(g.abs().sum()) for g in ref_grads) > 0
    metrics = pol.train_step(tokens, prep)
    assert metrics["num_microbatches"] == 4
    assert abs(metrics["loss"] - float(ref_loss)) < 1e-5
    for p, g in zip(params, ref_grads):
        assert torch.allclose(p.main_grad, g, atol=1e-6, rtol=1e-4), float((p.main_grad - g).abs().max())
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads))
    assert abs(metrics["grad_norm"] - float(ref_norm)) < 1e-5 * float(ref_norm)
    assert metrics["lr"] == pytest.approx(1e-3)
    assert metrics["update_successful"] == 1.0
    assert 0 < metrics["entropy"] <= torch.log(torch.tensor(float(V))).item() + 1e-6
    assert metrics["num_tokens"] == float(mask.sum())


def test_micro_batch_size_does_not_change_the_step():
    from megatron_amir.training.policy import Policy

    tokens, mask, rewards, gids = batch()
    results = []
    for mbs in (1, 8):
        cfg = make_cfg(micro_batch_size=mbs)
        pol = Policy(cfg)
        prep = prepared_for(cfg, pol.compute_logprobs(tokens), mask, rewards, gids)
        m = pol.train_step(tokens, prep)
        results.append((m, pol.full_state_dict()))
    (m1, p1), (m8, p8) = results
    assert abs(m1["loss"] - m8["loss"]) < 1e-5 and abs(m1["grad_norm"] - m8["grad_norm"]) < 1e-5
    assert max(float((p1[k] - p8[k]).abs().max()) for k in p1) < 1e-5


def test_save_load_resumes_exactly(tmp_path):
    """Model + Adam + LR schedule round-trip: step 2 after a reload equals step 2 without it."""
    from megatron_amir.training.policy import Policy

    cfg = make_cfg(lr_warmup_steps=3, lr_decay_style="cosine")
    tokens, mask, rewards, gids = batch()
    a = Policy(cfg)
    prep = prepared_for(cfg, a.compute_logprobs(tokens), mask, rewards, gids)
    a.train_step(tokens, prep)
    a.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt").is_dir() and not list(tmp_path.glob("ckpt.tmp-*"))
    m_a = a.train_step(tokens, prep)
    want = a.full_state_dict()

    b = Policy(make_cfg(lr_warmup_steps=3, lr_decay_style="cosine", seed=99))  # different init
    b.load(tmp_path / "ckpt")
    assert b.num_steps == 1
    m_b = b.train_step(tokens, prep)
    got = b.full_state_dict()
    assert m_b["lr"] == m_a["lr"] and abs(m_b["loss"] - m_a["loss"]) < 1e-7
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-7
    with pytest.raises(FileExistsError):
        a.save(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        b.load(tmp_path / "missing")


def test_frozen_copy_keeps_the_old_weights(policy):
    tokens, mask, rewards, gids = batch()
    before = policy.compute_logprobs(tokens)
    frozen = policy.frozen_copy()
    prep = prepared_for(policy.cfg, before, mask, rewards, gids)
    policy.train_step(tokens, prep)
    after = policy.compute_logprobs(tokens)
    assert not torch.allclose(after, before)
    assert torch.equal(frozen.compute_logprobs(tokens), before)


def test_frozen_copy_loads_a_saved_policy(policy, tmp_path):
    """The reference policy of a resumed run: a frozen copy whose weights are replaced by a checkpoint's."""
    tokens, mask, rewards, gids = batch()
    saved = policy.compute_logprobs(tokens)
    policy.save(tmp_path / "start", save_optimizer=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "start").stat().st_mode & 0o777 == 0o777 & ~umask  # not tempfile's private 0700
    policy.train_step(tokens, prepared_for(policy.cfg, saved, mask, rewards, gids))
    frozen = policy.frozen_copy()
    assert not torch.equal(frozen.compute_logprobs(tokens), saved)
    frozen.load(tmp_path / "start")
    assert torch.equal(frozen.compute_logprobs(tokens), saved)
    assert not torch.equal(policy.compute_logprobs(tokens), saved)  # the policy itself is untouched


def test_offloaded_reference_matches_and_lives_on_the_host(policy, tmp_path):
    """algorithm.reference_offload: the frozen copy keeps its weights in host memory between passes, gives the
    same log-probs as a resident one, and still loads a checkpoint (onto the host copies)."""
    tokens, mask, rewards, gids = batch()
    resident, off = policy.frozen_copy(), policy.frozen_copy(offload=True)
    hosts = [h for _, h in off._host]
    assert hosts and all(h.device.type == "cpu" for h in hosts)
    assert all(t.data_ptr() == h.data_ptr() for t, h in off._host)  # the module points at the host copies
    assert torch.equal(off.compute_logprobs(tokens), resident.compute_logprobs(tokens))
    assert all(t.data_ptr() == h.data_ptr() for t, h in off._host)  # and again after a pass
    policy.save(tmp_path / "ref", save_optimizer=False)
    saved = policy.compute_logprobs(tokens)
    policy.train_step(tokens, prepared_for(policy.cfg, saved, mask, rewards, gids))
    off2 = policy.frozen_copy(offload=True)
    assert not torch.equal(off2.compute_logprobs(tokens), saved)
    off2.load(tmp_path / "ref")
    assert torch.equal(off2.compute_logprobs(tokens), saved)
    assert all(t.data_ptr() == h.data_ptr() and h.device.type == "cpu" for t, h in off2._host)


def test_full_state_dict_names_match_module(policy):
    full = policy.full_state_dict()
    own = {k: v for k, v in policy.modules()[0].state_dict().items() if not k.endswith("_extra_state")}
    assert set(full) == set(own)
    assert all(torch.equal(full[k], own[k]) for k in own)


def test_data_parallel_rows_and_errors(policy):
    assert policy.data_parallel_rows(8, 4).tolist() == list(range(8))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        policy.data_parallel_rows(7, 4)
    tokens, mask, rewards, gids = batch()
    prep = prepared_for(policy.cfg, policy.compute_logprobs(tokens), mask, rewards, gids)
    with pytest.raises(ValueError, match="response_mask has shape"):
        policy.train_step(tokens[:, :-1], prep)


def test_full_hf_state_dict_through_converter_mapping(policy):
    """HF names from the converter's table; values are the same tensors (llama: no re-layout of norms)."""
    hf = policy.full_hf_state_dict()
    full = policy.full_state_dict()
    assert "model.embed_tokens.weight" in hf and "lm_head.weight" in hf
    assert torch.equal(hf["model.embed_tokens.weight"], full["embedding.word_embeddings.weight"])
    assert torch.equal(hf["model.layers.1.post_attention_layernorm.weight"],
                       full["decoder.layers.1.pre_mlp_layernorm.weight"])
    # SwiGLU fc1 = [gate; up] in Megatron, two HF matrices
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(torch.cat([hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]]), fc1)


def test_fp16_overflow_goes_to_the_loss_scaler():
    """fp16: an overflowing update is skipped by Megatron's dynamic loss scaler, which lowers the scale until
    updates succeed (our own non-finite check must not pre-empt it, or the scale would stay at 2^32)."""
    from megatron_amir.training.policy import Policy

    cfg = make_cfg()
    cfg = Config(**{**cfg.model_dump(), "model": {**cfg.model.model_dump(), "params_dtype": "fp16"}})
    p = Policy(cfg)
    tokens, mask, rewards, gids = batch()
    first_scale, outs = float(p.optimizer.get_loss_scale()), []
    for _ in range(40):
        out = p.train_step(tokens, prepared_for(cfg, p.compute_logprobs(tokens), mask, rewards, gids))
        outs.append(out)
        if out["update_successful"]:
            break
    assert outs[0]["loss_scale_overflow"] == 1.0 and outs[-1]["update_successful"] == 1.0
    assert outs[-1]["loss_scale"] < first_scale


def test_lr_schedule_counts_optimizer_updates():
    """train.steps / lr_warmup_steps are RL steps; with k updates per RL step the schedule spans k x steps
    updates, and the logged lr is the rate the update used."""
    from megatron_amir.training.policy import Policy

    cfg = make_cfg(steps=2, lr_warmup_steps=1, lr_decay_style="linear", lr=1e-3)
    p = Policy(cfg, updates_per_step=2)
    tokens, mask, rewards, gids = batch()
    lrs = [p.train_step(tokens, prepared_for(cfg, p.compute_logprobs(tokens), mask, rewards, gids))["lr"]
           for _ in range(4)]
    # warm-up over 2 updates (0, 5e-4), then linear decay over the other 2 (1e-3, 5e-4)
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_bf16_load_without_optimizer_state_refreshes_the_fp32_main_weights():
    """bf16/fp16 Megatron optimizers keep fp32 main copies of the weights; loading model weights only (--init-from,
    model.hf_path) must refresh them, or the first step writes the random init back (plus one update)."""
    from megatron_amir.training.policy import Policy

    def bf16(seed):
        cfg = make_cfg(seed=seed, lr=1e-9)
        return Config(**{**cfg.model_dump(), "model": {**cfg.model.model_dump(), "params_dtype": "bf16"}})

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        saved = Policy(bf16(7))
        want = saved.full_state_dict()
        saved.save(f"{d}/ck", save_optimizer=False)
        p = Policy(bf16(99))
        p.load(f"{d}/ck", load_optimizer=False)
        tokens, mask, rewards, gids = batch()
        p.train_step(tokens, prepared_for(p.cfg, p.compute_logprobs(tokens), mask, rewards, gids))
        got = p.full_state_dict()
    assert max(float((got[k].float() - want[k].float()).abs().max()) for k in want) < 1e-2
