"""Tests of nanochat.gpt and nanochat.optim on tiny CPU models: each checks that two routes agree."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, attention
from nanochat.optim import MuonAdamW, zeropower_via_newtonschulz5

V, T = 256, 32


def tiny_config(**overrides) -> GPTConfig:
    # head_dim 32, the smallest shape that still has several heads and several layers
    cfg = dict(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    model.init_weights()
    return model


def batch(seed: int = 1, B: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def train_steps(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    for _ in range(n):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return loss.item()


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------- config and FLOPs


def test_from_depth_matches_upstream_widths():
    c12 = GPTConfig.from_depth(12, 32768, 2048)
    assert (c12.n_layer, c12.n_embd, c12.n_head, c12.n_kv_head) == (12, 768, 6, 6)
    c20 = GPTConfig.from_depth(20, 32768, 2048)
    assert (c20.n_layer, c20.n_embd, c20.n_head, c20.n_kv_head) == (20, 1280, 10, 10)
    # 9 * 64 = 576 is not a multiple of 128: rounded up to 640 = 5 heads
    c9 = GPTConfig.from_depth(9, 32768, 2048)
    assert (c9.n_embd, c9.n_head) == (640, 5)


@pytest.mark.parametrize("n_kv_head", [6, 2])
def test_estimate_flops_from_closed_form(n_kv_head):
    cfg = GPTConfig.from_depth(12, 32768, 2048)
    cfg.n_kv_head = n_kv_head
    with torch.device("meta"):  # shapes only: no memory for a 100M+ parameter model
        model = GPT(cfg)
    d, L, H, V_, S = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.sequence_len
    hd = d // H
    kv = n_kv_head * hd
    per_layer = d * d + 2 * d * kv + d * d + 2 * 4 * d * d  # q, k+v, attn proj, mlp in+out
    linear = L * per_layer + d * V_  # + lm_head; the embedding is a lookup
    assert model.estimate_flops() == 6 * linear + 12 * L * H * hd * S
    assert model.num_params() == linear + V_ * d


# ---------------------------------------------------------------------------- forward pass


def test_init_is_deterministic_given_seed():
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if "c_proj" not in name:  # zero-init projections are equal whatever the seed
            assert not torch.equal(pa, pc), name
    assert all(p.dtype == torch.float32 for p in a.parameters())
    # lm_head std 0.001 -> near-uniform predictions at init, loss ~ ln(V)
    x, y = batch()
    assert abs(a(x, y).item() - torch.log(torch.tensor(float(V))).item()) < 0.05


def test_causality():
    model = tiny_model()
    x, _ = batch()
    t = 10
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randint(0, V, x2[:, t + 1 :].shape)
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_short_sequence_matches_prefix_of_full_one():
    # T < sequence_len must slice the rotary tables at the same positions
    model = tiny_model()
    model.transformer.h[0].attn.c_proj.weight.data.normal_(0, 0.1)  # make attention matter
    x, _ = batch()
    with torch.no_grad():
        full, short = model(x), model(x[:, :7])
    assert short.shape == (4, 7, V)
    torch.testing.assert_close(short, full[:, :7], rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny_model(n_head=4, n_kv_head=2, n_embd=128)
    mha = tiny_model(seed=9, n_head=4, n_kv_head=4, n_embd=128)
    for block in gqa.transformer.h:  # non-zero projections so attention reaches the logits
        block.attn.c_proj.weight.data.normal_(0, 0.05)
        block.mlp.c_proj.weight.data.normal_(0, 0.05)
    sd = gqa.state_dict()
    rep, hd = 2, 32
    for k in list(sd):
        if k.endswith(("c_k.weight", "c_v.weight")):
            # kv head j serves query heads j*rep .. j*rep+rep-1
            w = sd[k].view(2, hd, 128)
            sd[k] = w.repeat_interleave(rep, dim=0).reshape(4 * hd, 128)
    mha.load_state_dict(sd)
    x, y = batch()
    with torch.no_grad():
        logits = gqa(x)
        assert logits.shape == (4, T, V)
        torch.testing.assert_close(logits, mha(x), rtol=1e-5, atol=1e-5)


def test_single_query_attention_matches_sdpa_with_the_same_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, n, 32, generator=g) for n in (1, 10, 10))
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.4
    mask[..., 0] = True  # every row sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask, causal=False), expected, rtol=1e-5, atol=1e-5)


def test_fused_qkv_projects_like_the_separate_matrices_and_reloads_them():
    model = tiny_model(n_head=4, n_kv_head=2, n_embd=128)
    attn = model.transformer.h[0].attn
    separate = copy.deepcopy(attn)
    attn.fuse_qkv()
    assert not hasattr(attn, "c_q") and attn.c_qkv.weight.shape == (128 + 2 * 64, 128)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        for a, b in zip(attn.project_qkv(x), separate.project_qkv(x), strict=True):
            torch.testing.assert_close(a, b)
        separate.c_k.weight.mul_(2.0)  # the trained model moves on; the fused copy follows on reload
        attn.load_qkv(separate.c_q, separate.c_k, separate.c_v)
        torch.testing.assert_close(attn.project_qkv(x)[1], separate.c_k(x))


def test_loss_matches_cross_entropy_of_logits_and_ignores_minus_one():
    model = tiny_model(n_kv_head=1)
    x, y = batch()
    y[0, :5] = -1
    y[2, 20:] = -1
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
        per_token = model(x, y, loss_reduction="none")
    assert logits.dtype == loss.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    keep = y != -1
    expected = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, expected)
    assert per_token.shape == (4, T)
    assert torch.all(per_token[~keep] == 0)
    torch.testing.assert_close(per_token[keep].mean(), loss)
    # the ignored positions' targets do not matter at all
    y2 = y.clone()
    y2[~keep] = -1
    y3 = torch.where(keep, y, torch.zeros_like(y))
    with torch.no_grad():
        assert torch.equal(model(x, y2), loss)
        assert not torch.equal(model(x, y3), loss)


def test_autocast_bf16_forward_keeps_float32_outputs():
    model = tiny_model()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
        logits = model(x)
    assert loss.dtype == logits.dtype == torch.float32
    with torch.no_grad():
        ref = model(x, y)
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 64, 192)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 1e-3  # the scale must not matter
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    # the quintic trades exact convergence for speed: singular values land in about [0.68, 1.14]
    assert s.min() > 0.6 and s.max() < 1.2
    # same singular vectors as G: X is U S' V^T where G = U S V^T, so U^T X V is diagonal
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.mT @ X @ Vh.mT
    off_diag = D - torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1))
    assert off_diag.abs().max() < 1e-3
    # batched == one matrix at a time
    if G.ndim == 3:
        torch.testing.assert_close(X[1], zeropower_via_newtonschulz5(G[1]))


def test_newton_schulz_zero_and_bf16():
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(8, 16)), torch.zeros(8, 16))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(32, 64), dtype=torch.bfloat16).float())
    assert s.min() > 0.5 and s.max() < 1.3


def test_setup_optimizer_groups():
    model = tiny_model(n_embd=128, n_head=4, n_kv_head=2)
    opt = model.setup_optimizer(ns_dtype=torch.bfloat16)
    kinds = [g["kind"] for g in opt.param_groups]
    assert kinds.count("adamw") == 2
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    scale = (128 / 768) ** -0.5
    adamw_lrs = sorted(g["lr"] for g in opt.param_groups if g["kind"] == "adamw")
    assert adamw_lrs == pytest.approx([0.004 * scale, 0.2 * scale])
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert len({p.shape for p in g["params"]}) == 1 and g["ns_dtype"] == torch.bfloat16
    train_steps(model, opt, *batch(), n=2)  # the bf16 Newton-Schulz path runs


def test_overfits_one_batch():
    model = tiny_model()
    opt = model.setup_optimizer()
    x, y = batch(B=2)
    with torch.no_grad():
        start = model(x, y).item()  # ~ ln(256) = 5.5
    end = train_steps(model, opt, x, y, n=30)
    assert end < 0.05 * start


def test_every_parameter_trains_and_frozen_ones_do_not():
    model = tiny_model()
    model.transformer.wte.weight.requires_grad_(False)
    opt = model.setup_optimizer()
    before = snapshot(model)
    # two steps: the layers feeding a zero-init projection get their first gradient on step 2
    train_steps(model, opt, *batch(), n=2)
    after = snapshot(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name != "transformer.wte.weight"), name


def test_grad_scaler_skips_muon_and_adamw_together():
    model = tiny_model()
    opt = model.setup_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch()

    def scaled_step(poison: bool) -> None:
        scaler.scale(model(x, y)).backward()
        if poison:  # one non-finite grad, in a Muon matrix
            model.transformer.h[1].mlp.c_fc.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    scaled_step(poison=False)
    scaled_step(poison=False)  # now every parameter has a non-zero update (see above)
    before, scale = snapshot(model), scaler.get_scale()
    state_before = {k: v.clone() for k, v in opt.state[model.lm_head.weight].items() if torch.is_tensor(v)}

    scaled_step(poison=True)
    assert scaler.get_scale() == scale / 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # Muon and AdamW params alike
    for k, v in state_before.items():
        assert torch.equal(opt.state[model.lm_head.weight][k], v)

    scaled_step(poison=False)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_grad_scaler_unscale_matches_unscaled_step():
    # scale -> unscale_ -> step must give the same update as a plain step
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = a.setup_optimizer(), b.setup_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch()
    for _ in range(3):
        a(x, y).backward()
        opt_a.step()
        a.zero_grad(set_to_none=True)
        scaler.scale(b(x, y)).backward()
        scaler.step(opt_b)
        scaler.update()
        b.zero_grad(set_to_none=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_round_trip_is_bit_exact():
    x, y = batch()
    model = tiny_model()
    opt = model.setup_optimizer(weight_decay=0.01)
    train_steps(model, opt, x, y, n=3)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = resumed.setup_optimizer(weight_decay=0.01)
    resumed_opt.load_state_dict(ckpt["optim"])

    # a schedule and a momentum warmup act on both the same way
    for o in (opt, resumed_opt):
        for g in o.param_groups:
            g["lr"] = g["initial_lr"] * 0.5
            if g["kind"] == "muon":
                g["momentum"] = 0.9
    train_steps(model, opt, x, y, n=3)
    train_steps(resumed, resumed_opt, x, y, n=3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_rejects_unknown_kind_and_non_matrix_muon_params():
    with pytest.raises(ValueError):
        MuonAdamW([dict(kind="sgd", params=[torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)])
    with pytest.raises(ValueError):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(4))], lr=0.1)])
