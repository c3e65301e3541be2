"""The reference Booster step against an independent, hand-derived expectation (and one step of the fast engine
against the same expectation: its weight decay and clipping act on the flat buffer).

The expectation is computed here from scratch, in float64, on a 1-layer Llama small enough to check
coordinate by coordinate:

    g1 = ∇h(w),  w~ = w − α g1/(‖g1‖ + 1e-7),  g2 = ∇h(w~),  gf = ∇f(w),  g = gf + λ(g1 − g2)
    clip: g *= min(1, max_norm/(‖g‖ + 1e-6))
    AdamW (first step): m = (1−β1) g, v = (1−β2) g², m̂ = g, v̂ = g²,
                        w ← w − lr·wd·w − lr·m̂/(√v̂ + eps)

The loss is the token-mean cross entropy over labels != -100 after the causal shift, written out by hand
(no import of booster_fast.losses), and its autograd gradient is itself checked against central finite
differences in float64, so the expectation does not merely restate the code under test.

On AdamW's first step m̂/√v̂ = sign(g): the weights alone would only test the sign of the gradient, and
clipping (a positive scale) would be invisible. So every test also compares the optimizer's first moment
(exp_avg = (1−β1)·g, the clipped combined gradient itself), and sets adam_eps to the mean |g| so that
g/(|g| + eps) is far from saturation and the updated weights depend on the gradient's magnitude too.

Tolerances: the step runs in float32 and the expectation in float64. Measured here: losses agree to
~1e-7 relative, gradients (including λ(g1 − g2), where g1 and g2 nearly cancel) to ≤ 4e-7·max|g|, the
updated weights to ≤ 7e-8 absolute (fp32 rounding of O(0.3) weights). The bounds below (2e-6 relative
for losses, GRAD_RTOL·max|g| for gradients, 2e-4·lr for weights) leave a margin of 20x or more.
"""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from booster_fast import Booster, BoosterConfig, add_lora

VOCAB, T = 50, 12
BETAS = (0.9, 0.999)
GRAD_RTOL = 1e-5         # gradient tolerance, relative to the largest entry


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_lora_model(seed: int = 0, layers: int = 1):
    """1-layer (or `layers`), 2-head Llama (vocab 50, hidden 16) with LoRA r=2 on q_proj/v_proj and random
    nonzero B."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.config.use_cache = False
    model = add_lora(model, r=2, alpha=4, targets=("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                # peft inits B to 0 (A's gradient would then be 0); make every LoRA tensor O(0.3)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * 0.3)
    return model


def make_batch(seed: int, rows: int = 4, prefixes=None, lengths=None):
    """Right-padded batch: a prompt prefix and the padding carry label -100, the mask is 0 on padding."""
    g = torch.Generator().manual_seed(seed)
    prefixes = prefixes or [int(torch.randint(1, 5, (), generator=g)) for _ in range(rows)]
    lengths = lengths or [int(torch.randint(7, T + 1, (), generator=g)) for _ in range(rows)]
    ids = torch.randint(1, VOCAB, (rows, T), generator=g)
    labels = ids.clone()
    mask = torch.ones(rows, T, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prefixes, lengths)):
        ids[i, n:] = 0
        mask[i, n:] = 0
        labels[i, :p] = -100
        labels[i, n:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Oracle:
    """Float64 copy of the model; the loss and its gradient as functions of the LoRA weights only."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).double()
        # Llama's RMSNorm computes in float32 whatever its input dtype: that rounding (~1e-9 in the loss) would
        # swamp central differences. Give the copy's norms the same formula in float64.
        for m in self.model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(_rmsnorm64, m)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = dict(self.model.named_parameters())

    def weights(self, model) -> dict[str, torch.Tensor]:
        return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def loss(self, w: dict, batch: dict, grad: bool = False):
        """Token-mean CE over labelled tokens after the causal shift, written out by hand."""
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(w[n])
        with torch.set_grad_enabled(grad):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1], dim=-1)          # position t predicts token t+1
            target = batch["labels"][:, 1:]
            keep = target != -100
            nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = (nll * keep).sum() / keep.sum()
        if not grad:
            return loss
        gs = torch.autograd.grad(loss, [self.params[n] for n in self.names])
        return loss.detach(), dict(zip(self.names, gs))


def _rmsnorm64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def gnorm(g: dict) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in g.values()))


def booster_expectation(o: Oracle, w, align, harmful, *, lamb, alpha, meta_term=True):
    h, g1 = o.loss(w, harmful, grad=True)
    n1 = gnorm(g1)
    w_t = {k: w[k] - alpha * g1[k] / (n1 + 1e-7) for k in w}
    h_t, g2 = o.loss(w_t, harmful, grad=True)
    f, gf = o.loss(w, align, grad=True)
    if meta_term:
        g = {k: gf[k] + lamb * (g1[k] - g2[k]) for k in w}
    else:
        g = {k: gf[k] + lamb * g1[k] for k in w}
    return g, {"loss": f, "harmful_loss": h, "harmful_loss_perturbed": h_t, "harmful_grad_norm": n1,
               "g1": g1, "g2": g2, "gf": gf, "w_t": w_t}


def clip(g: dict, max_norm: float):
    if max_norm <= 0:
        return g, 1.0
    coef = min(1.0, max_norm / (float(gnorm(g)) + 1e-6))
    return {k: v * coef for k, v in g.items()}, coef


def adamw_first_step(w: dict, g: dict, *, lr, wd, eps, betas=BETAS):
    b1, b2 = betas
    out = {}
    for k in w:
        m, v = (1 - b1) * g[k], (1 - b2) * g[k] ** 2
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)
        out[k] = w[k] - lr * wd * w[k] - lr * m_hat / (v_hat.sqrt() + eps)
    return out


def mean_abs(g: dict) -> float:
    return float(torch.cat([v.flatten() for v in g.values()]).abs().mean())


def max_abs(g: dict) -> float:
    return float(torch.cat([v.flatten() for v in g.values()]).abs().max())


def assert_close_dict(actual: dict, expected: dict, atol: float, rtol: float = 0.0, what: str = ""):
    for k in expected:
        a, e = actual[k].double(), expected[k].double()
        err = (a - e).abs().max().item()
        assert torch.allclose(a, e, atol=atol, rtol=rtol), f"{what} {k}: max |Δ| = {err:.3g} (atol {atol:.3g})"


def moment(booster: Booster, model, key: str) -> dict[str, torch.Tensor]:
    """AdamW's `key` state per LoRA tensor: the reference keeps one per parameter, the fast engine one flat
    tensor over its buffer W, laid out in the parameters' order."""
    st = booster.optimizer.state
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if booster.cfg.impl == "reference":
        return {n: st[p][key] for n, p in params}
    flat = st[booster.engine.W][key]
    sizes = [p.numel() for _, p in params]
    return {n: v.view_as(p) for (n, p), v in zip(params, flat[:sum(sizes)].split(sizes))}


def exp_avg(booster: Booster, model) -> dict[str, torch.Tensor]:
    return moment(booster, model, "exp_avg")


def exp_avg_sq(booster: Booster, model) -> dict[str, torch.Tensor]:
    return moment(booster, model, "exp_avg_sq")


def current(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def setup():
    model = tiny_lora_model(0)
    return model, Oracle(model), make_batch(10), make_batch(11)


# ------------------------------------------------------------------------------- the oracle is independent
def test_oracle_gradient_matches_central_differences(setup):
    """The hand-written loss's autograd gradient agrees with central differences (float64)."""
    model, o, align, harmful = setup
    w = o.weights(model)
    _, g = o.loss(w, harmful, grad=True)
    eps = 1e-6
    checked = 0
    for k in w:                                   # one coordinate in every LoRA tensor, the largest-gradient one
        idx = int(g[k].abs().flatten().argmax())
        wp = {n: v.clone() for n, v in w.items()}
        wm = {n: v.clone() for n, v in w.items()}
        wp[k].view(-1)[idx] += eps
        wm[k].view(-1)[idx] -= eps
        fd = (o.loss(wp, harmful) - o.loss(wm, harmful)) / (2 * eps)
        assert abs(float(fd) - float(g[k].view(-1)[idx])) <= 1e-7 + 1e-6 * abs(float(fd)), (k, float(fd))
        checked += 1
    assert checked == 4  # A and B of q_proj and v_proj


def test_oracle_loss_is_token_mean_cross_entropy(setup):
    """Cross-check the hand loss against torch's cross entropy with ignore_index (token mean)."""
    model, o, align, _ = setup
    w = o.weights(model)
    ours = o.loss(w, align)
    with torch.no_grad():
        logits = o.model(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), align["labels"][:, 1:].reshape(-1),
                                           ignore_index=-100)
    assert torch.allclose(ours, ce, rtol=1e-12)


# ------------------------------------------------------------------------------------- the Booster step
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("max_norm", [1e-2, 1e6], ids=["clipping-active", "clipping-inactive"])
def test_step_matches_hand_derivation(setup, max_norm, impl):
    """One step of either engine: losses, the clipped combined gradient (AdamW's moments) and the weights after
    decoupled weight decay and the update, against the float64 expectation."""
    model0, o, align, harmful = setup
    model = copy.deepcopy(model0)
    lamb, alpha, lr, wd = 5.0, 0.5, 1e-2, 0.1
    w = o.weights(model)
    g, info = booster_expectation(o, w, align, harmful, lamb=lamb, alpha=alpha)
    total = float(gnorm(g))
    if max_norm < 1:
        assert total > 10 * max_norm, "the clipping case must actually clip"
    else:
        assert total < max_norm
    g_clip, coef = clip(g, max_norm)
    adam_eps = mean_abs(g_clip)
    expected_w = adamw_first_step(w, g_clip, lr=lr, wd=wd, eps=adam_eps)

    cfg = BoosterConfig(impl=impl, lamb=lamb, alpha=alpha, lr=lr, weight_decay=wd, betas=BETAS,
                        adam_eps=adam_eps, max_grad_norm=max_norm)
    booster = Booster(model, cfg)
    out = booster.step(align, harmful)

    # returned metrics: f(w), h(w), h(w~), ‖g1‖
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
        assert out[key].shape == ()
        assert math.isclose(float(out[key]), float(info[key]), rel_tol=2e-6), (key, float(out[key]), float(info[key]))
    # sanity of the setup: w~ steps against ∇h, so the harmful loss drops there
    assert float(info["harmful_loss_perturbed"]) < float(info["harmful_loss"])

    # the clipped combined gradient, as AdamW's first moment (1 − β1)·g
    scale = max_abs(g_clip)
    m_expected = {k: (1 - BETAS[0]) * v for k, v in g_clip.items()}
    assert_close_dict(exp_avg(booster, model), m_expected, atol=GRAD_RTOL * scale * (1 - BETAS[0]), what="exp_avg")
    v_expected = {k: (1 - BETAS[1]) * v ** 2 for k, v in g_clip.items()}
    assert_close_dict(exp_avg_sq(booster, model), v_expected, atol=2e-4 * scale ** 2 * (1 - BETAS[1]),
                      what="exp_avg_sq")

    # the weights after one AdamW step: |update| ≈ lr/2 here, measured errors ≤ 7e-8
    assert_close_dict(current(model), expected_w, atol=lr * 2e-4, what="weights")
    # ...and they moved by much more than the tolerance
    moved = max_abs({k: current(model)[k].double() - w[k] for k in w})
    assert moved > 100 * lr * 2e-4


def test_reference_combined_gradient_against_finite_differences(setup):
    """Tie the step to numerics that do not use autograd at all: on a few coordinates, the combined gradient
    gf + λ(g1 − g2) from central differences of f at w and h at w and at w~ (w~ fixed)."""
    model0, o, align, harmful = setup
    model = copy.deepcopy(model0)
    lamb, alpha = 5.0, 0.5
    w = o.weights(model)
    _, info = booster_expectation(o, w, align, harmful, lamb=lamb, alpha=alpha)
    cfg = BoosterConfig(impl="reference", lamb=lamb, alpha=alpha, max_grad_norm=0.0)   # no clipping
    booster = Booster(model, cfg)
    booster.step(align, harmful)
    got = {k: v.double() / (1 - BETAS[0]) for k, v in exp_avg(booster, model).items()}

    def fd(fn, point, k, idx, eps=1e-6):
        wp = {n: v.clone() for n, v in point.items()}
        wm = {n: v.clone() for n, v in point.items()}
        wp[k].view(-1)[idx] += eps
        wm[k].view(-1)[idx] -= eps
        return float((fn(wp) - fn(wm)) / (2 * eps))

    f = lambda p: o.loss(p, align)           # noqa: E731
    h = lambda p: o.loss(p, harmful)         # noqa: E731
    for k in w:
        idx = int(got[k].abs().flatten().argmax())
        expected = fd(f, w, k, idx) + lamb * (fd(h, w, k, idx) - fd(h, info["w_t"], k, idx))
        actual = float(got[k].view(-1)[idx])
        assert math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-6), (k, idx, actual, expected)


def test_meta_term_false_combines_gf_plus_lambda_g1(setup):
    model0, o, align, harmful = setup
    model = copy.deepcopy(model0)
    lamb, alpha, lr, wd = 3.0, 0.5, 1e-2, 0.0
    w = o.weights(model)
    g, info = booster_expectation(o, w, align, harmful, lamb=lamb, alpha=alpha, meta_term=False)
    g_full, _ = booster_expectation(o, w, align, harmful, lamb=lamb, alpha=alpha, meta_term=True)
    adam_eps = mean_abs(g)
    cfg = BoosterConfig(impl="reference", lamb=lamb, alpha=alpha, lr=lr, weight_decay=wd, adam_eps=adam_eps,
                        max_grad_norm=0.0, meta_term=False)
    booster = Booster(model, cfg)
    out = booster.step(align, harmful)
    scale = max_abs(g)
    m = {k: v.double() / (1 - BETAS[0]) for k, v in exp_avg(booster, model).items()}
    assert_close_dict(m, g, atol=GRAD_RTOL * scale, what="combined grad")
    # and it is distinguishable from the meta-term combination
    assert max_abs({k: g[k] - g_full[k] for k in g}) > 100 * 1e-4 * scale
    assert_close_dict(current(model), adamw_first_step(w, g, lr=lr, wd=wd, eps=adam_eps), atol=lr * 2e-4,
                      what="weights")
    assert math.isclose(float(out["loss"]), float(info["loss"]), rel_tol=2e-6)
    assert math.isclose(float(out["harmful_loss"]), float(info["harmful_loss"]), rel_tol=2e-6)
    assert math.isclose(float(out["harmful_grad_norm"]), float(info["harmful_grad_norm"]), rel_tol=2e-5)
    assert math.isnan(float(out["harmful_loss_perturbed"]))     # no perturbed pass was run


# ------------------------------------------------------------------- Booster + Vaccine (perturb_aware)
def attention_output_grads(o: Oracle, w: dict, batch: dict) -> list[torch.Tensor]:
    """∂f/∂o_l of each layer's self-attention output o_l at w, in float64, read with retain_grad."""
    outs = []

    def keep(module, args, out):
        out[0].retain_grad()
        outs.append(out[0])

    hooks = [layer.self_attn.register_forward_hook(keep) for layer in o.model.base_model.model.model.layers]
    try:
        loss, _ = o.loss(w, batch, grad=True)
    finally:
        for h in hooks:
            h.remove()
    assert outs and all(t.grad is not None for t in outs)
    return [t.grad.detach().clone() for t in outs]


def perturbed_loss(o: Oracle, w: dict, batch: dict, e: list[torch.Tensor], grad: bool = False):
    """The oracle's loss with e_l added to each self-attention output (a constant)."""
    layers = o.model.base_model.model.model.layers
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, e=e_l: (out[0] + e, *out[1:]))
             for layer, e_l in zip(layers, e)]
    try:
        return o.loss(w, batch, grad=grad)
    finally:
        for h in hooks:
            h.remove()


def test_perturb_aware_matches_hand_derivation(setup):
    """Booster + Vaccine: g = ∇f(w; e) + λ(g1 − g2), e = ρ·∂f/∂o / (‖∂f/∂o‖ + 1e-7) on the attention outputs o
    (two layers here: one norm over both), with ∇f(w; e) tied to central differences (e fixed) on one
    coordinate per LoRA tensor."""
    _, _, align, harmful = setup
    model = tiny_lora_model(0, layers=2)
    o = Oracle(model)
    lamb, alpha, rho, lr = 5.0, 0.5, 0.7, 1e-2
    w = o.weights(model)
    _, info = booster_expectation(o, w, align, harmful, lamb=lamb, alpha=alpha)
    go = attention_output_grads(o, w, align)
    assert len(go) == 2
    norm = torch.sqrt(sum((t * t).sum() for t in go))
    e = [rho * t / (norm + 1e-7) for t in go]
    f_e, gf_e = perturbed_loss(o, w, align, e, grad=True)
    g = {k: gf_e[k] + lamb * (info["g1"][k] - info["g2"][k]) for k in w}
    # the perturbation matters: ∇f(w; e) is far from ∇f(w)
    assert max_abs({k: gf_e[k] - info["gf"][k] for k in w}) > 1e-2 * max_abs(gf_e)

    booster = Booster(model, BoosterConfig(impl="reference", lamb=lamb, alpha=alpha, lr=lr, weight_decay=0.0,
                                           max_grad_norm=0.0, perturb_aware=True, rho=rho))
    out = booster.step(align, harmful)
    got = {k: v.double() / (1 - BETAS[0]) for k, v in exp_avg(booster, model).items()}
    assert_close_dict(got, g, atol=GRAD_RTOL * max_abs(g), what="combined grad")
    assert math.isclose(float(out["loss"]), float(info["loss"]), rel_tol=2e-6)
    assert math.isclose(float(out["loss_perturbed"]), float(f_e), rel_tol=2e-6)
    assert float(out["loss_perturbed"]) > float(out["loss"])  # e climbs the alignment loss

    for k in w:
        idx = int(gf_e[k].abs().flatten().argmax())
        wp = {n: v.clone() for n, v in w.items()}
        wm = {n: v.clone() for n, v in w.items()}
        wp[k].view(-1)[idx] += 1e-6
        wm[k].view(-1)[idx] -= 1e-6
        fd = float(perturbed_loss(o, wp, align, e) - perturbed_loss(o, wm, align, e)) / 2e-6
        assert math.isclose(float(gf_e[k].view(-1)[idx]), fd, rel_tol=1e-5, abs_tol=1e-7), (k, fd)


@pytest.mark.parametrize("max_norm", [1e-3, 0.0], ids=["clipped", "unclipped"])
def test_sft_step_is_one_adamw_step_on_clipped_alignment_grad(setup, max_norm):
    model0, o, align, _ = setup
    model = copy.deepcopy(model0)
    lr, wd = 1e-2, 0.1
    w = o.weights(model)
    f, gf = o.loss(w, align, grad=True)
    if max_norm:
        assert float(gnorm(gf)) > 10 * max_norm
    g, _ = clip(gf, max_norm)
    adam_eps = mean_abs(g)
    booster = Booster(model, BoosterConfig(impl="reference", lr=lr, weight_decay=wd, adam_eps=adam_eps,
                                           max_grad_norm=max_norm))
    out = booster.sft_step(align)
    assert set(out) == {"loss"}
    assert math.isclose(float(out["loss"]), float(f), rel_tol=2e-6)
    m = {k: v.double() / (1 - BETAS[0]) for k, v in exp_avg(booster, model).items()}
    assert_close_dict(m, g, atol=GRAD_RTOL * max_abs(g), what="sft grad")
    assert_close_dict(current(model), adamw_first_step(w, g, lr=lr, wd=wd, eps=adam_eps), atol=lr * 2e-4,
                      what="weights")


# ----------------------------------------------------------------------------------- gradient accumulation
def test_grad_accum_equals_one_big_batch(setup):
    """grad_accum=4 over 8 rows == grad_accum=1, with rows of very different labelled-token counts."""
    model0, o, _, _ = setup
    # micro-batches of 2 rows: labelled tokens per row range from 1 to 10
    align = make_batch(20, rows=8, prefixes=[1, 9, 2, 2, 10, 1, 5, 3], lengths=[12, 11, 12, 8, 12, 12, 7, 9])
    harmful = make_batch(21, rows=8, prefixes=[10, 1, 1, 6, 2, 8, 1, 4], lengths=[12, 12, 9, 12, 12, 10, 12, 7])
    counts = (align["labels"][:, 1:] != -100).sum(1)
    assert counts.min() < 3 and counts.max() > 8

    w = o.weights(model0)
    g, info = booster_expectation(o, w, align, harmful, lamb=5.0, alpha=0.5)
    scale = max_abs(g)
    # the test is sensitive: the mean of per-micro-batch mean gradients is far from the token mean here
    micro = [{k: v[i:i + 2] for k, v in align.items()} for i in range(0, 8, 2)]
    naive = [o.loss(w, mb, grad=True)[1] for mb in micro]
    naive = {k: sum(d[k] for d in naive) / 4 for k in w}
    assert max_abs({k: naive[k] - info["gf"][k] for k in w}) > 100 * 1e-4 * scale

    adam_eps = mean_abs(g)
    results = {}
    for k in (1, 4):
        model = copy.deepcopy(model0)
        booster = Booster(model, BoosterConfig(impl="reference", grad_accum=k, alpha=0.5, lr=1e-2,
                                               adam_eps=adam_eps, max_grad_norm=0.0))
        out = booster.step(align, harmful)
        results[k] = (out, current(model), {n: v.clone() for n, v in exp_avg(booster, model).items()})
    (out1, w1, m1), (out4, w4, m4) = results[1], results[4]
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
        assert math.isclose(float(out4[key]), float(out1[key]), rel_tol=1e-5), key
        assert math.isclose(float(out4[key]), float(info[key]), rel_tol=2e-5), key
    assert_close_dict(m4, m1, atol=1e-5 * scale * (1 - BETAS[0]), what="accum vs one batch, exp_avg")
    assert_close_dict({k: v.double() / (1 - BETAS[0]) for k, v in m4.items()}, g, atol=GRAD_RTOL * scale,
                      what="accum vs hand")
    assert_close_dict(w4, w1, atol=1e-6, what="accum vs one batch, weights")


# ------------------------------------------------------------------------------------ what a step touches
def test_add_lora_leaves_only_lora_trainable(setup):
    model = setup[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 4
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["booster", "sft"])
def test_step_leaves_base_weights_bitwise_unchanged(setup, method):
    model0, _, align, harmful = setup
    model = copy.deepcopy(model0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    booster = Booster(model, BoosterConfig(impl="reference", lr=1e-2))
    for _ in range(2):
        booster.step(align, harmful) if method == "booster" else booster.sft_step(align)
    now = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(now[n], before), n
        assert now[n].grad is None, n
    assert all(not torch.equal(now[n], before) for n, before in lora.items())


def test_weight_decay_is_grouped_as_the_hf_trainer_groups_it():
    """With trainable tensors besides LoRA's (a norm weight, a bias), the reference's AdamW decays exactly the
    tensors HF's Trainer would (its get_decay_parameter_names), and one step leaves a no-decay tensor with zero
    gradient exactly where it was while a decayed one shrinks."""
    from transformers import Trainer

    model = tiny_lora_model()
    inner = model.get_base_model().model
    inner.norm.weight.requires_grad_(True)
    bias = torch.nn.Parameter(torch.randn(VOCAB))
    model.get_base_model().lm_head.bias = bias
    booster = Booster(model, BoosterConfig(impl="reference", lr=1e-2, weight_decay=0.5))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in booster.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model)) & trainable
    assert "base_model.model.model.norm.weight" not in decayed and "base_model.model.lm_head.bias" not in decayed
    assert any("lora_A" in n for n in decayed) and len(booster.optimizer.param_groups) == 2

    # a direct AdamW step with zero gradients: only decay moves a weight
    lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
    before = lora.detach().clone(), bias.detach().clone()
    for p in (p for g in booster.optimizer.param_groups for p in g["params"]):
        p.grad = torch.zeros_like(p)
    booster.optimizer.step()
    assert torch.equal(bias, before[1])
    torch.testing.assert_close(lora.detach(), before[0] * (1 - 1e-2 * 0.5))


def test_decay_exemptions_follow_the_hf_trainer_on_other_architectures():
    """[R4, R6] reference.py exempt_from_decay: HF's `_norm` name pattern (Qwen3/Gemma3's q_norm, k_norm) and its
    by-type rule (nn.LayerNorm under any name, GPT-2's ln_f) - the Llama test above has neither."""
    from transformers import Trainer

    from booster_fast.reference import exempt_from_decay

    class RMS(nn.Module):  # not an nn.LayerNorm: only its name tells
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.q_norm = nn.Linear(4, 4), RMS()

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ln_f = Attn(), nn.LayerNorm(4)

    model = Toy()
    params = list(model.named_parameters())
    exempt = exempt_from_decay(model, params)
    assert {"attn.q_norm.weight", "ln_f.weight"} <= exempt
    assert exempt == {n for n, _ in params} - set(Trainer.get_decay_parameter_names(None, model))


def test_a_step_started_in_eval_mode_trains_with_dropout():
    """[R9] reference.py step: model.train() first. A model left in eval mode (after an evaluation, or fresh from
    from_pretrained) must take the same update as one in train mode: LoRA dropout on."""


    def run(eval_first):
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, pad_token_id=0, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).float()
        model.config.use_cache = False
        model = add_lora(model, r=2, alpha=4, targets=("q_proj", "v_proj"), dropout=0.5)
        if eval_first:
            model.eval()
        booster = Booster(model, BoosterConfig(impl="reference"))
        torch.manual_seed(1)
        booster.step(make_batch(10), make_batch(11))
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, model.training

    (trained, mode), (from_eval, eval_mode) = run(False), run(True)
    assert mode and eval_mode, "the step left the model in eval mode"
    assert all(torch.equal(from_eval[n], trained[n]) for n in trained), "the eval-mode start trained without dropout"
