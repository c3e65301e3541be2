"""Booster + Vaccine (perturb_aware): the fast engine's three passes give the reference's four-pass update, for
merged and separate passes, padded and packed batches, gradient accumulation, checkpointing and two processes.
The reference itself is checked against a float64 hand derivation in test_reference.py."""

import pytest
import torch

import booster_fast as bf
from booster_fast.packing import pack
from booster_fast.compute import enable_gradient_checkpointing
from booster_fast.opcount import count_ops
from test_fast import (builtin_batches, first_update, lora_state, make_model, randomize_lora_b_, relative,
                       step_gradient, worst_relative_error)

RHO = 2.0  # large enough that the update differs from plain Booster's by ~90% on the tiny model
KEYS = ("loss", "loss_perturbed", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm")


@pytest.fixture(scope="module")
def batches():
    _, tok = bf.load_model("tiny", device="cpu")
    out = builtin_batches(tok, 3, batch_size=6, max_length=160)  # ~60% real tokens: packing shrinks them
    assert all(pack(x)["input_ids"].numel() < x["input_ids"].numel() for b in out for x in b)
    return out


# As in test_fast/test_packing, the engines are compared on the combined gradient the optimizer receives (fp32
# summation order, ~1e-6) and on the logged values, not on the weights after several AdamW steps: Adam's first
# update lr·g/(|g| + 1e-8) turns the summation noise of near-zero coordinates into ~1e-4 relative changes.
def build(impl, checkpointing=False, device="cpu", **cfg):
    model, _ = bf.load_model("tiny", seed=7, device=device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(7)
    model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), 8)  # make_model's LoRA
    return bf.Booster(model, bf.BoosterConfig(impl=impl, perturb_aware=True, rho=RHO, **cfg))


def first_step(impl, batches, **cfg):
    """(combined gradient, outputs) of the first step on `batches[0]`, as Booster.to_device prepares them."""
    booster = build(impl, **cfg)
    grad, out = step_gradient(booster, *(booster.to_device(b, "cpu") for b in batches[0]))
    return grad, out, booster


@pytest.fixture(scope="module")
def reference(batches):
    return first_step("reference", batches)[:2]


def test_the_perturbation_changes_the_update(batches, reference):
    """Else the comparisons below could not tell the variant from plain Booster."""
    plain = first_update("reference", batches[0])
    assert relative(plain, reference[0]) > 0.1
    out = reference[1]
    assert out["loss_perturbed"] > out["loss"], "e climbs the alignment loss"


def assert_matches(grad, out, reference, what):
    ref_grad, ref_out = reference
    assert ref_grad.norm() > 0
    err = relative(grad[:ref_grad.numel()], ref_grad)  # the fast buffer ends in a zero pad
    assert err <= 1e-5, f"{what}: the combined gradient differs from the reference's by {err:.3g}"
    for key in KEYS:
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}, {key}: {m}")


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_fast_matches_reference(batches, reference, merge, packing):
    grad, out, booster = first_step("fast", batches, merge_passes=merge, packing=packing)
    assert booster.engine.pack == packing and booster.engine.merge == merge
    assert_matches(grad, out, reference, f"merge={merge} packing={packing}")


def test_later_steps_match_too(batches):
    """Three steps, fp32: the weights stay within Adam's amplified noise of the reference's, and each step's
    logged values agree."""
    engines = [build("reference"), build("fast", merge_passes=True, packing=False)]
    outs = [[e.step(*(e.to_device(b, "cpu") for b in pair)) for pair in batches] for e in engines]
    assert_runs_match(engines, outs, f"after {len(batches)} steps")


def assert_runs_match(engines, outs, what):
    """(reference, fast) after the same steps: weights within Adam's amplified noise (1e-4), and every step's
    logged values within 1e-5."""
    err, name = worst_relative_error(lora_state(engines[1].model), lora_state(engines[0].model))
    assert err <= 1e-4, f"{what}: {name} differs by {err:.3g}"
    for key in KEYS:
        torch.testing.assert_close(torch.stack([o[key] for o in outs[1]]), torch.stack([o[key] for o in outs[0]]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}, {key}: {m}")


def test_merged_pass_slices_the_alignment_rows_of_padded_batches(batches, reference):
    """Booster.to_device trims each padded batch to its longest row, so the two batches of a pair rarely share a
    width and the merged pass above falls back to two passes. Here both keep the collated width: the merged pass
    runs (three model calls), and the alignment rows' attention gradients are sliced out of [h ; f] right."""
    from booster_fast.batches import without_mask

    booster = build("fast", merge_passes=True, packing=False)
    calls = [0]
    booster.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    a, h = batches[0]
    assert a["input_ids"].shape == h["input_ids"].shape
    grad, out = step_gradient(booster, without_mask(a), without_mask(h))
    assert calls[0] == 3
    assert_matches(grad, out, reference, "merged, padded to one width")


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_gradient_checkpointing_gives_the_same_update(batches, reference, merge):
    """A checkpointed layer's recompute is perturbed too (the hooks are held across the backward)."""
    grad, out, booster = first_step("fast", batches, checkpointing=True, merge_passes=merge)
    assert booster.model.is_gradient_checkpointing
    assert_matches(grad, out, reference, f"checkpointed, merge={merge}")


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_grad_accumulation_is_exact(impl):
    """One ‖∂f/∂o‖ over all micro-batches: 4 micro-batches of 2 rows give the update of one batch of 8."""
    (batch,) = builtin_batches(make_model()[1], 1, batch_size=8)
    g1 = first_update(impl, batch, grad_accum=1, perturb_aware=True, rho=RHO)
    g4 = first_update(impl, batch, grad_accum=4, perturb_aware=True, rho=RHO)
    plain = first_update(impl, batch, grad_accum=1)
    assert relative(plain, g1) > 0.1
    assert relative(g4, g1) <= 1e-5, f"{impl}: 4 micro-batches differ from 1 batch by {relative(g4, g1):.3g}"


def test_fast_runs_three_passes_and_reads_nothing_back(batches):
    """The merged fast step runs the model three times where the reference runs it four, and none of its ops
    reads a value back to the host (so it can be captured)."""
    calls = {}

    def counting(impl, **cfg):
        model, _ = make_model()
        booster = bf.Booster(model, bf.BoosterConfig(impl=impl, perturb_aware=True, rho=RHO, **cfg))
        n = [0]
        model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        a, h = (booster.to_device(b, "cpu") for b in batches[0])
        booster.step(a, h)
        calls[impl] = n[0]
        return booster, a, h

    booster, a, h = counting("fast", merge_passes=True)
    counting("reference")
    assert calls == {"fast": 3, "reference": 4}
    syncs = count_ops(booster.step, a, h)["host_syncs"]
    assert not syncs, f"the perturb_aware step reads back to the host: {syncs}"


def test_sft_step_ignores_it(batches):
    """The SFT baseline's update is the same with the flag on (bit for bit)."""
    a, _ = batches[0]
    weights = []
    for pa in (True, False):
        model, _ = make_model()
        bf.Booster(model, bf.BoosterConfig(perturb_aware=pa)).sft_step(a)
        weights.append(lora_state(model))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[1])
    assert not all(torch.equal(weights[0][n], w) for n, w in lora_state(make_model()[0]).items()), "nothing moved"


@pytest.mark.parametrize("rho", [0.0, -1.0, float("inf"), float("nan")])
def test_rho_must_be_finite_and_positive(rho):
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        bf.BoosterConfig(perturb_aware=True, rho=rho)


def test_the_perturbation_is_rho_along_the_global_gradient_norm():
    """e = ρ·g/(‖g‖ + ε) with one norm over every recorded gradient (micro-batches and layers, any dtype), in the
    fast engine's own bookkeeping (the reference computes its norm itself, so comparing the engines alone would
    leave this to one side)."""
    from booster_fast.perturb_aware import AttentionPerturbation

    model, _ = make_model()
    p = AttentionPerturbation(model)
    g = torch.Generator().manual_seed(3)
    layers = len(p.modules)
    assert layers >= 2
    p.grads = [[torch.randn(2, 5, 8, generator=g) for _ in range(layers)],
               [None] + [torch.randn(1, 3, 8, generator=g).bfloat16() for _ in range(layers - 1)]]
    kept = [t.double() for t in p.recorded()]
    expected = sum(float((t ** 2).sum()) for t in kept) ** 0.5
    norm = p.norm()
    assert norm.dtype == torch.float32 and abs(norm.item() - expected) <= 1e-5 * expected
    p.scale_(norm, rho=2.0)
    for before, after in zip(kept, p.recorded()):
        want = 2.0 * before / (norm.double() + p.eps)
        assert torch.allclose(after.double(), want, rtol=1e-2 if after.dtype == torch.bfloat16 else 1e-6)


def test_a_string_flag_is_refused():
    """BoosterConfig(perturb_aware="False") would otherwise read as on (a non-empty string)."""
    with pytest.raises(ValueError, match="perturb_aware must be True or False"):
        bf.BoosterConfig(perturb_aware="False")


def test_a_model_without_self_attn_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no `self_attn` modules"):
        from booster_fast.perturb_aware import attention_modules

        attention_modules(model)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["off", "on"])
def test_fast_matches_reference_on_cuda(batches, graphs):
    """On the GPU, with the step captured (graphs='on': the hooks run at capture, the replays hold their ops):
    five steps against the reference, both fed the padded batches without masks."""
    cuda = [tuple({k: v.cuda() for k, v in b.items() if k != "attention_mask"} for b in pair) for pair in batches]
    cuda = (cuda * 2)[:5]
    engines = [build("reference", device="cuda"),  # the fused model ops round otherwise: test_fast has them
               build("fast", device="cuda", merge_passes=True, graphs=graphs, fused_ops=False)]
    outs = [[e.step(*pair) for pair in cuda] for e in engines]
    if graphs == "on":
        assert engines[1].engine.graphs.replays >= 1
    assert_runs_match(engines, outs, f"cuda graphs={graphs}, after 5 steps")


def test_a_step_that_raised_leaves_nothing_behind(batches, reference):
    """A step stopped between its recording and perturbed passes (say by an out-of-memory error the caller
    catches) must not leave its recorded gradients in the next step's norm."""
    booster = build("fast", merge_passes=False)
    hidden = booster.engine.hidden
    applied = hidden.applied

    def fail_once(index):
        hidden.applied = applied
        raise RuntimeError("out of memory, say")

    hidden.applied = fail_once
    halves = [[booster.to_device({k: v[i::2] for k, v in b.items()}, "cpu") for i in (0, 1)] for b in batches[1]]
    with pytest.raises(RuntimeError, match="out of memory"):
        booster.step(*halves)  # two micro-batches recorded, the next step has one
    grad, out = step_gradient(booster, *(booster.to_device(b, "cpu") for b in batches[0]))
    assert_matches(grad, out, reference, "after a failed step")


@pytest.mark.slow
def test_nf4_matches_reference(batches):
    """NF4 base weights (bf16 compute), merged: the first combined gradient within the NF4 bound of the plain
    step's test (test_fast: the fast LoRA path rounds once per layer where peft rounds three times). Two layers and
    four rows a batch: bf16 matmuls are slow on a CPU without bf16 instructions (measured: 7.6e-3)."""
    batch = tuple({k: v[:4] for k, v in x.items()} for x in batches[0])
    ref = first_update("reference", batch, quant="nf4", layers=2, perturb_aware=True, rho=RHO)
    fast = first_update("fast", batch, quant="nf4", layers=2, merge_passes=True, perturb_aware=True, rho=RHO)
    plain = first_update("reference", batch, quant="nf4", layers=2)
    assert relative(plain, ref) > 0.1
    err = relative(fast[:ref.numel()], ref)
    assert err <= 2e-2, f"nf4: the combined gradient differs from the reference's by {err:.3g}"


def test_bookkeeping_does_not_grow_with_depth(batches):
    """The perturbation's norm and scaling are one foreach op each over all layers (the recording and the adding
    happen inside the model passes): the step's bookkeeping stays the same from 2 to 8 layers."""
    a, h = batches[0]
    counts = {}
    for layers in (2, 8):
        model, _ = make_model(num_hidden_layers=layers)
        booster = bf.Booster(model, bf.BoosterConfig(merge_passes=True, perturb_aware=True, rho=RHO))
        booster.step(a, h)
        counts[layers] = count_ops(booster.step, a, h)["bookkeeping"]
    assert counts[2] == counts[8], counts
    assert counts[2] <= 28, counts  # README: "at most 18 ops per step (28 with Vaccine)"


def test_a_zero_attention_gradient_gives_a_zero_perturbation():
    """[P2] perturb_aware.py scale_: e = ρ g / (‖g‖ + ε). An alignment batch without a labelled token gives g = 0:
    the ε keeps e = 0 (not 0/0 = NaN) and the step finite, in both engines."""
    from booster_fast.perturb_aware import AttentionPerturbation

    model, tok = make_model()
    p = AttentionPerturbation(model)
    p.grads = [[torch.zeros(2, 5, 8) for _ in p.modules]]
    p.scale_(p.norm(), rho=2.0)
    assert all(torch.equal(e, torch.zeros(2, 5, 8)) for e in p.recorded())

    (a, h), = builtin_batches(tok, 1, batch_size=2, max_length=48)
    a = {**a, "labels": torch.full_like(a["labels"], -100)}
    for impl in ("reference", "fast"):
        model, _ = make_model()
        booster = bf.Booster(model, bf.BoosterConfig(impl=impl, perturb_aware=True, rho=2.0))
        out = booster.step(*(booster.to_device(b, "cpu") for b in (a, h)))
        assert float(out["loss_perturbed"]) == 0.0, (impl, out["loss_perturbed"])  # (no labelled token)
        # a NaN perturbation would reach the gradient (NaN activations x zero upstream gradients): the reference's
        # weights would turn NaN, and the fast engine would skip the update
        assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad), impl
        assert float(out.get("skipped", 0.0)) == 0.0, impl


def test_layers_below_every_lora_weight_are_left_unperturbed():
    """[P8] perturb_aware.py recording: an attention output that needs no gradient (LoRA only on down_proj: layer
    0's attention sits below every LoRA weight) gets no hook and no perturbation; both engines step and agree."""

    _, tok = bf.load_model("tiny", device="cpu")
    (batch,) = builtin_batches(tok, 1, batch_size=2, max_length=48)
    grads = {}
    for impl in ("reference", "fast"):
        model, _ = bf.load_model("tiny", seed=7, device="cpu")
        torch.manual_seed(7)
        model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16, targets=("down_proj",)), 8)
        booster = bf.Booster(model, bf.BoosterConfig(impl=impl, perturb_aware=True, rho=2.0))
        grads[impl], out = step_gradient(booster, *(booster.to_device(b, "cpu") for b in batch))
        assert torch.isfinite(out["loss_perturbed"]) and out["loss_perturbed"] > out["loss"], impl
    n = grads["reference"].numel()
    assert relative(grads["fast"][:n], grads["reference"]) <= 1e-5
