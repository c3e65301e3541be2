"""The fused model kernels (RMSNorm, SwiGLU, rotary embedding): against float64 references on irregular sizes, against
transformers' own modules in bf16, switched in and out of a model, and the fast step with them against the
reference step. On the CPU the kernels run under Triton's interpreter (conftest.py), which rounds fp32 to bf16
by truncation where the GPU rounds to nearest: the CPU's bf16 bounds allow for that, the GPU tests' do not."""
import logging

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.activations import GELUTanh
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import booster_fast as bf
from booster_fast import fused_ops
from booster_fast.kernels.model_kernels import gelu_tanh_mul, rms_norm, rope, silu_mul
from booster_fast.kernels.reference import gelu_tanh_mul_ref, rms_norm_ref, rope_ref, silu_mul_ref
from booster_fast.compute import enable_gradient_checkpointing
from booster_fast.packing import pack

from test_fast import SEED, first_update, make_model, randomize_lora_b_, relative, step_gradient
from test_kernels import _gen, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernels against float64: a few roundings and one reduction over the row (the norm); the norm weight's
# gradient sums over up to ~130 rows of values up to ~10
TOL = {torch.float32: (1e-5, 1e-5)}
TOL_SUM = {torch.float32: (1e-4, 1e-5)}


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 781), (129, 1000), (2, 0, 64), (5, 4096)])
def test_rms_norm_matches_float64(shape, unit_offset):
    g = _gen("rms_norm", shape, unit_offset)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + (-0.5 if unit_offset else 0.5)).to(DEVICE).requires_grad_()  # Gemma: ~0
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y = rms_norm(x, w, 1e-6, unit_offset=unit_offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    want = rms_norm_ref(x, w, 1e-6, dy, unit_offset=unit_offset)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y, want["y"], f"y {shape}", TOL)
    assert_close(dx, want["dx"], f"dx {shape}", TOL)
    assert_close(dw, want["dweight"], f"dweight {shape}", TOL_SUM)


@pytest.mark.parametrize("gated, ref", [(silu_mul, silu_mul_ref), (gelu_tanh_mul, gelu_tanh_mul_ref)],
                         ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1,), (2047,), (2049,), (3, 1823, 7), (0, 5)])
def test_gated_activations_match_float64(shape, gated, ref):
    g = _gen(gated.__name__, shape)
    gate, up = ((torch.randn(shape, generator=g) * 4).to(DEVICE).requires_grad_() for _ in range(2))
    dh = torch.randn(shape, generator=g).to(DEVICE)
    h = gated(gate, up)
    dgate, dup = torch.autograd.grad(h, (gate, up), dh)
    want = ref(gate, up, dh)
    assert_close(h, want["h"], f"h {shape}", TOL)
    assert_close(dgate, want["dgate"], f"dgate {shape}", TOL)
    assert_close(dup, want["dup"], f"dup {shape}", TOL)


def _tables(batch, T, D, g):
    """cos and sin [batch, T, D] as Llama builds them (the angles repeated over the two halves)."""
    angles = torch.rand(batch, T, D // 2, generator=g, dtype=torch.float64) * 20
    return (f(torch.cat([angles, angles], -1)).float().to(DEVICE) for f in (torch.cos, torch.sin))


@pytest.mark.parametrize("B, H, T, D, table_rows, layout", [
    (2, 3, 7, 10, 2, "attention"),   # [B, T, H, D] memory seen as [B, H, T, D], as the attention makes it
    (1, 5, 33, 48, 1, "attention"),  # a packed row: one table row; the tiny model's head size (half of 24)
    (3, 1, 17, 2, 1, "contiguous"),
    (2, 4, 9, 16, 2, "strided"),     # the last dimension not contiguous: copied first
    (1, 2, 0, 8, 1, "attention"),    # no tokens
])
def test_rope_matches_float64(B, H, T, D, table_rows, layout):
    g = _gen("rope", B, H, T, D, layout)
    if layout == "attention":
        x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    elif layout == "strided":
        x = torch.randn(B, H, D, T, generator=g).transpose(2, 3)
    else:
        x = torch.randn(B, H, T, D, generator=g)
    x = x.to(DEVICE).requires_grad_()
    cos, sin = _tables(table_rows, T, D, g)
    dy = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    y = rope(x, cos, sin)
    (dx,) = torch.autograd.grad(y, x, dy)
    want = rope_ref(x, cos, sin, dy)
    if layout == "attention":
        assert y.stride() == x.stride(), "the result should keep the attention's layout"
    assert_close(y, want["y"], f"y {B, H, T, D}", TOL)
    assert_close(dx, want["dx"], f"dx {B, H, T, D}", TOL)


def test_kernels_refuse_mismatched_operands():
    with pytest.raises(ValueError, match="weight of shape"):
        rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="gelu_tanh_mul: gate"):
        gelu_tanh_mul(torch.randn(3, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="rope"):
        rope(torch.randn(1, 2, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))  # odd head size


def _bf16_against_transformers(bound_out: float, bound_grad: float):
    g = _gen("bf16")
    norm = LlamaRMSNorm(781, eps=1e-5).to(DEVICE, torch.bfloat16)
    gemma_norm = GemmaRMSNorm(781, eps=1e-6).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(781, generator=g) + 0.5)
        gemma_norm.weight.copy_(torch.rand(781, generator=g) - 0.5)
    x = (torch.randn(53, 781, generator=g) * 3).to(DEVICE, torch.bfloat16).requires_grad_()
    gate, up = ((torch.randn(41, 333, generator=g) * 3).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(2))
    q = (torch.randn(2, 11, 4, 64, generator=g)).to(DEVICE, torch.bfloat16).transpose(1, 2).requires_grad_()
    cos, sin = (t.to(torch.bfloat16) for t in _tables(2, 11, 64, g))
    original = getattr(modeling_llama.apply_rotary_pos_emb, "_booster_original", modeling_llama.apply_rotary_pos_emb)
    pairs = {"rms_norm": ((x,), norm(x), rms_norm(x, norm.weight, norm.variance_epsilon)),
             "gemma_rms_norm": ((x,), gemma_norm(x), rms_norm(x, gemma_norm.weight, gemma_norm.eps, unit_offset=True)),
             "silu_mul": ((gate, up), nn.functional.silu(gate) * up, silu_mul(gate, up)),
             "gelu_tanh_mul": ((gate, up), GELUTanh()(gate) * up, gelu_tanh_mul(gate, up)),
             "rope": ((q,), original(q, q, cos, sin)[0], rope(q, cos, sin))}
    for name, (inputs, want, got) in pairs.items():
        assert got.dtype == want.dtype == torch.bfloat16
        err = relative(got.float(), want.float())
        assert err <= bound_out, f"{name}: {err:.3g} from transformers' bf16 result"
        seed = torch.randn(want.shape, generator=g).to(DEVICE, torch.bfloat16)
        pairs_of_grads = zip(torch.autograd.grad(got, inputs, seed), torch.autograd.grad(want, inputs, seed))
        for i, (a, b) in enumerate(pairs_of_grads):
            err = relative(a.float(), b.float())
            assert err <= bound_grad, f"{name}: gradient of input {i} is {err:.3g} from transformers' bf16 one"


def test_bf16_kernels_follow_transformers_roundings():
    """In bf16 the kernels round where transformers' modules round (one bf16 ulp is 2^-8 relative at most);
    the interpreter's truncating casts cost up to about one more."""
    _bf16_against_transformers(8e-3, 1.5e-2)


@pytest.mark.gpu
def test_bf16_kernels_follow_transformers_roundings_on_cuda():
    _bf16_against_transformers(3e-3, 6e-3)


# ---------------------------------------------------------------------------------------------------------
# installed in a model: fused inside `active()`, the model's own forward outside
# ---------------------------------------------------------------------------------------------------------
def _counting(monkeypatch, gate="silu_mul"):
    calls = {"rms_norm": 0, gate: 0, "rope": 0}
    for name in calls:
        kernel = getattr(fused_ops, name)

        def spy(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(fused_ops, name, spy)
    return calls


def test_install_fuses_inside_active_only(monkeypatch):
    model, tok = make_model()
    ids = torch.randint(4, tok.vocab_size, (2, 19), generator=_gen("ids"))
    before = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    counts = fused_ops.install(model)
    assert counts == {"LlamaRMSNorm": 2 * layers + 1, "LlamaMLP": layers, "apply_rotary_pos_emb": layers}
    assert fused_ops.install(model) == counts, "installing twice must add nothing"
    calls = _counting(monkeypatch)
    outside = model(input_ids=ids).logits
    assert calls == {"rms_norm": 0, "silu_mul": 0, "rope": 0} and torch.equal(outside, before), "changed outside"
    with fused_ops.active():
        inside = model(input_ids=ids).logits
    assert calls == {"rms_norm": 2 * layers + 1, "silu_mul": layers, "rope": 2 * layers}  # queries and keys
    assert relative(inside, before) <= 1e-5
    with fused_ops.active(False):
        assert not fused_ops._active
    with fused_ops.active():  # nested: an inner active(False) (the engine's, fused ops off) leaves the outer on
        with fused_ops.active(False):
            assert fused_ops._active
        assert fused_ops._active
    assert not fused_ops._active


def test_a_kind_whose_fused_forward_disagrees_keeps_its_own(monkeypatch, caplog):
    monkeypatch.setattr(fused_ops, "rms_norm", lambda x, weight, eps: x * weight)  # forgets to normalise
    monkeypatch.setattr(fused_ops, "rope", lambda x, cos, sin: x * cos[:, None])  # forgets to rotate
    original = getattr(modeling_llama.apply_rotary_pos_emb, "_booster_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)  # as if never installed in this process
    model, _ = make_model()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        counts = fused_ops.install(model)
    assert counts == {"LlamaMLP": model.config.num_hidden_layers}
    assert "LlamaRMSNorm kept its own forward" in caplog.text
    assert caplog.text.count("apply_rotary_pos_emb kept") == 1, caplog.text
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    assert modeling_llama.apply_rotary_pos_emb is original


def test_a_kind_whose_fused_backward_disagrees_keeps_its_own(monkeypatch, caplog):
    """The install check runs the backward too: a kernel whose forward is right and whose gradient is not (here
    half the output gradient added to the input's) is not installed."""
    real_norm, real_rope = fused_ops.rms_norm, fused_ops.rope
    def skewed(real):  # the same output, and half the output gradient more for the input
        return lambda x, *rest: real(x, *rest) + 0.5 * (x - x.detach())

    monkeypatch.setattr(fused_ops, "rms_norm", skewed(real_norm))
    monkeypatch.setattr(fused_ops, "rope", skewed(real_rope))
    original = getattr(modeling_llama.apply_rotary_pos_emb, "_booster_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    model, _ = make_model()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        counts = fused_ops.install(model)
    assert counts == {"LlamaMLP": model.config.num_hidden_layers}
    assert "LlamaRMSNorm kept its own forward (the fused one differs by" in caplog.text
    assert modeling_llama.apply_rotary_pos_emb is original


def test_a_kind_whose_fused_kernels_fail_keeps_its_own(monkeypatch, caplog):
    """A kernel that does not compile or launch on this GPU fails the install check, not the first step: that
    kind keeps its own forward, with one warning naming the error; the other kinds are fused."""
    def broken(gate, up):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120\n(more lines)")

    monkeypatch.setattr(fused_ops, "silu_mul", broken)
    model, _ = make_model()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        counts = fused_ops.install(model)
    layers = model.config.num_hidden_layers
    assert counts == {"LlamaRMSNorm": 2 * layers + 1, "apply_rotary_pos_emb": layers}
    assert caplog.text.count("fused ops: LlamaMLP kept its own (the fused kernels fail: RuntimeError: PTX "
                             ".version 8.7 does not support .target sm_120)") == 1, caplog.text


def test_a_rope_whose_kernel_fails_keeps_the_original_function(monkeypatch, caplog):
    """The rotary kernel failing the install check: transformers' apply_rotary_pos_emb stays as it was (not
    counted as fused), with the failure said once and no difference from the eager formula logged (there is
    none to log); a kind that fails logs no "kept its own forward" line of a measured difference either."""
    def broken(*args):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120")

    original = getattr(modeling_llama.apply_rotary_pos_emb, "_booster_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)  # as if never installed in this process
    monkeypatch.setattr(fused_ops, "rope", broken)
    monkeypatch.setattr(fused_ops, "silu_mul", broken)
    model, _ = make_model()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        counts = fused_ops.install(model)
    assert set(counts) == {"LlamaRMSNorm"} and modeling_llama.apply_rotary_pos_emb is original, counts
    assert "apply_rotary_pos_emb kept its own (the fused kernels fail" in caplog.text
    assert "LlamaMLP kept its own (the fused kernels fail" in caplog.text
    assert "differs by" not in caplog.text and "kept its own forward" not in caplog.text, caplog.text


def test_out_of_memory_in_the_install_check_is_raised(monkeypatch):
    """Out of memory while the install check runs a kernel is the machine's limit, not a kernel that cannot run
    here: raised as it is (the CLI's exit 4), not a kind quietly left unfused."""
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(fused_ops, "silu_mul", oom)
    with pytest.raises(torch.OutOfMemoryError):
        fused_ops.install(make_model()[0])


def test_a_norm_that_places_its_epsilon_otherwise_keeps_its_own(caplog):
    """A norm class of a recognised name whose own forward divides by (RMS + eps) instead of sqrt(mean + eps): at
    unit variance the two agree to ~1e-5, so only the install check's small-scale input tells them apart."""
    class LlamaRMSNorm(modeling_llama.LlamaRMSNorm):  # the name the kernels are chosen by
        def forward(self, x):
            rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
            return self.weight * (x.float() / (rms + self.variance_epsilon)).to(x.dtype)

    model = nn.Sequential(LlamaRMSNorm(64, eps=1e-5))
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert fused_ops.install(model) == {}
    assert "LlamaRMSNorm kept its own forward" in caplog.text
    model = nn.Sequential(modeling_llama.LlamaRMSNorm(64, eps=1e-5))  # transformers' own: fused
    assert fused_ops.install(model) == {"LlamaRMSNorm": 1}


def test_nothing_to_fuse_and_no_device_for_it(monkeypatch):
    assert fused_ops.install(nn.Sequential(nn.Linear(4, 4), nn.SiLU())) == {}
    monkeypatch.setattr(fused_ops, "available", lambda device: False)
    with pytest.raises(ValueError, match="fused ops need CUDA"):
        fused_ops.install(make_model()[0])
    with pytest.raises(ValueError, match="fused ops need CUDA"):
        bf.Booster(make_model()[0], bf.BoosterConfig(fused_ops=True))


def test_cpu_default_leaves_the_model_alone():
    model, _ = make_model()
    booster = bf.Booster(model, bf.BoosterConfig())
    assert booster.engine.fused is False
    assert not any(getattr(m, "_booster_fused", False) for m in model.modules())


def _gemma(arch: str, vocab_size: int):
    """A small random Gemma (1 or 2: softcapping, a sliding window, four norms a layer) in fp32, with LoRA."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                 hidden_activation="gelu_pytorch_tanh", pad_token_id=0)
    torch.manual_seed(SEED)
    if arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**shape))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**shape, sliding_window=32, query_pre_attn_scalar=16,
                                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    with torch.no_grad():  # Gemma initialises its norm weights to 0 (that is, 1 + 0): make them matter
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(torch.rand(m.weight.shape) - 0.5)
    torch.manual_seed(SEED)
    return randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1)


@pytest.mark.parametrize("arch, norms_per_layer", [("gemma", 2), ("gemma2", 4)])
def test_install_fuses_gemma(monkeypatch, arch, norms_per_layer):
    """Gemma's `(1 + w)` norm and GELU-tanh gate: installed, inert outside active(), the model's logits inside."""
    model = _gemma(arch, 300)
    ids = torch.randint(4, 300, (2, 19), generator=_gen("ids", arch))
    before = model(input_ids=ids).logits
    layers, name = model.config.num_hidden_layers, type(model.base_model.model).__name__.replace("ForCausalLM", "")
    norms = norms_per_layer * layers + 1
    assert fused_ops.install(model) == {f"{name}RMSNorm": norms, f"{name}MLP": layers, "apply_rotary_pos_emb": layers}
    calls = _counting(monkeypatch, gate="gelu_tanh_mul")
    assert torch.equal(model(input_ids=ids).logits, before) and not any(calls.values()), "changed outside"
    with fused_ops.active():
        inside = model(input_ids=ids).logits
    assert calls == {"rms_norm": norms, "gelu_tanh_mul": layers, "rope": 2 * layers}, calls
    assert relative(inside, before) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# the fast step with the fused ops
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_batch():
    """An alignment and a harmful batch of two rows each, random tokens right-padded to 24 (rows of 24, 15, 19 and
    11 tokens, labels on all but each row's first 6): few tokens, as the interpreter runs a kernel program by
    program, and unequal lengths, so that packing has padding to remove."""
    vocab = bf.load_model("tiny", device="cpu")[0].config.vocab_size
    gen, width, prompt = torch.Generator().manual_seed(SEED), 24, 6

    def batch(lengths):
        ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        labels = torch.where(mask.bool() & (torch.arange(width) >= prompt), ids, -100)
        return {"input_ids": ids * mask, "labels": labels, "attention_mask": mask}

    return batch([24, 15]), batch([19, 11])


@pytest.mark.parametrize("merge, packing", [(True, False), (True, True), (False, True)])
def test_fused_fast_step_gives_the_reference_gradient(small_batch, monkeypatch, merge, packing):
    ref = first_update("reference", small_batch, layers=2)  # (the interpreter runs a launch program by program)
    calls = _counting(monkeypatch)
    batch = tuple(pack(b) for b in small_batch) if packing else small_batch
    fast = first_update("fast", batch, layers=2, fused_ops=True, merge_passes=merge, packing=packing)
    assert all(calls.values()), f"a fused kernel did not run: {calls}"
    err = relative(fast[:ref.numel()], ref)
    assert err <= 1e-5, f"merge={merge} packing={packing}: fused gradient differs from the reference by {err:.3g}"


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_fused_fast_step_on_gemma_gives_the_reference_gradient(small_batch, monkeypatch, arch):
    """Gemma packs; Gemma2 (logit softcapping, which packed attention does not implement) runs padded. Either
    way the fused step's combined gradient is the reference's."""
    vocab = int(max(b["input_ids"].max() for b in small_batch)) + 1
    ref = step_gradient(bf.Booster(_gemma(arch, vocab), bf.BoosterConfig(impl="reference")), *small_batch)[0]
    booster = bf.Booster(_gemma(arch, vocab), bf.BoosterConfig(fused_ops=True))
    assert booster.engine.pack == (arch == "gemma")
    calls = _counting(monkeypatch, gate="gelu_tanh_mul")
    fast = step_gradient(booster, *(booster.to_device(b, "cpu") for b in small_batch))[0]
    assert all(calls.values()), f"a fused kernel did not run: {calls}"
    err = relative(fast[:ref.numel()], ref)
    assert err <= 1e-5, f"{arch}: fused gradient differs from the reference by {err:.3g}"


def test_checkpointed_recompute_runs_fused(small_batch, monkeypatch):
    """With gradient checkpointing the backward recomputes each layer: it must do so with the fused forwards
    too (the step holds active() across the backward), and give the same gradient."""
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model, _ = bf.load_model("tiny", seed=SEED, device="cpu", num_hidden_layers=2)  # (the interpreter: few layers)
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(SEED)
        booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                             bf.BoosterConfig(fused_ops=True, merge_passes=True))
        calls[checkpointing] = _counting(monkeypatch)
        grads[checkpointing] = step_gradient(booster, *small_batch)[0]
        monkeypatch.undo()
    layers = model.config.num_hidden_layers
    # per forward: 2 norms a layer + the final one; the recompute adds the layers' 2 each, once per forward
    assert calls[True]["rms_norm"] - calls[False]["rms_norm"] == 2 * 2 * layers, calls
    assert calls[True]["silu_mul"] == 2 * calls[False]["silu_mul"], calls
    assert calls[True]["rope"] == 2 * calls[False]["rope"], calls
    err = relative(grads[True], grads[False])
    assert err <= 1e-6, f"checkpointed fused gradient differs by {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["off", "on"])
def test_fused_step_on_cuda_matches_unfused(small_batch, graphs):
    """bf16 tiny model on CUDA: the fused step's gradient and losses against the unfused one's, eager and
    captured (5 steps, so that replays are compared too)."""
    outs = {}
    for fused in (False, True):
        model, _ = bf.load_model("tiny", seed=SEED, device="cuda", dtype=torch.bfloat16)
        torch.manual_seed(SEED)
        booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                             bf.BoosterConfig(fused_ops=fused, graphs=graphs))
        assert booster.engine.fused is fused
        a, h = (booster.to_device(b, "cuda") for b in small_batch)
        outs[fused] = [booster.step(a, h) for _ in range(5)]
        outs[fused, "W"] = booster.engine.flat.W.clone()
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed"):
        got, want = (torch.stack([o[key] for o in outs[f]]) for f in (True, False))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{key}: {m}")
    assert relative(outs[True, "W"], outs[False, "W"]) <= 2e-2


def test_fused_step_in_bf16_on_the_cpu(small_batch):
    """The dtype plumbing of the fused ops under bf16 autocast, end to end on the CPU (merged, packed): the same
    losses as the unfused step within bf16's reach, and a combined gradient within a few percent (the
    interpreter truncates on bf16 casts, a bias the GPU's rounding does not have; measured 3e-2)."""
    runs = {}
    for fused in (False, True):
        model, _ = bf.load_model("tiny", seed=SEED, device="cpu", dtype=torch.bfloat16, num_hidden_layers=2)
        torch.manual_seed(SEED)
        booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                             bf.BoosterConfig(fused_ops=fused, merge_passes=True, packing=True))
        runs[fused] = step_gradient(booster, *(booster.to_device(b, "cpu") for b in small_batch))
    (g0, o0), (g1, o1) = runs[False], runs[True]
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed"):
        torch.testing.assert_close(o1[key], o0[key], rtol=1e-3, atol=0, msg=lambda m: f"{key}: {m}")
    assert relative(g1, g0) <= 5e-2, f"bf16 fused gradient differs by {relative(g1, g0):.3g}"


def test_rope_with_tables_whose_halves_differ():
    """[K9] model_kernels.py _rope_kernel: the backward's transposed rotation pairs dy1 with sin's second half
    and dy2 with its first. Llama's tables repeat the angles over both halves, so the existing tests cannot
    tell the halves apart; rope_ref is written per half."""
    from booster_fast.kernels.model_kernels import rope
    from booster_fast.kernels.reference import rope_ref
    from test_kernels import assert_close

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 10, generator=g).requires_grad_()
    cos, sin = (f(torch.rand(2, 7, 10, generator=g, dtype=torch.float64) * 20).float() for f in (torch.cos, torch.sin))
    dy = torch.randn(2, 3, 7, 10, generator=g)
    y = rope(x, cos, sin)
    (dx,) = torch.autograd.grad(y, x, dy)
    want = rope_ref(x, cos, sin, dy)
    tol = {torch.float32: (1e-5, 1e-5)}
    assert_close(y, want["y"], "y", tol)
    assert_close(dx, want["dx"], "dx", tol)


def test_gemma_rms_norm_returns_the_dtype_of_its_input():
    """[K12] model_kernels.py _RMSNorm: Gemma's norm computes in fp32 and rounds once to the dtype of x
    (GemmaRMSNorm: output.type_as(x)), whatever the weight's dtype; Llama's promotes x and the weight."""
    from booster_fast.kernels.model_kernels import rms_norm

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = torch.zeros(64)  # fp32
    assert rms_norm(x, w, 1e-6, unit_offset=True).dtype == torch.bfloat16
    assert rms_norm(x, w + 1, 1e-6).dtype == torch.float32


def test_a_kind_whose_fused_forward_gives_nan_keeps_its_own(monkeypatch):
    """[F1, F2] fused_ops.py install/_install_rope: a NaN verdict (`not err <= tol`) refuses, as a large one does;
    `err > tol` would install a kernel that returns NaN."""

    monkeypatch.setattr(fused_ops, "rms_norm", lambda x, weight, eps: x * float("nan"))
    monkeypatch.setattr(fused_ops, "rope", lambda x, cos, sin: x * float("nan"))
    original = getattr(modeling_llama.apply_rotary_pos_emb, "_booster_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    model, _ = make_model()
    assert fused_ops.install(model) == {"LlamaMLP": model.config.num_hidden_layers}
    assert modeling_llama.apply_rotary_pos_emb is original


def test_a_module_with_its_own_instance_forward_is_left_alone():
    """[F3] fused_ops.py install: a module whose instance forward someone else set keeps it."""

    model, _ = make_model()
    norm = model.get_base_model().model.norm
    own = norm.forward

    def theirs(x):
        return own(x)

    norm.forward = theirs
    counts = fused_ops.install(model)
    assert counts["LlamaRMSNorm"] == 2 * model.config.num_hidden_layers
    assert vars(norm)["forward"] is theirs and not getattr(norm, "_booster_fused", False)


def test_the_fused_norm_uses_the_models_epsilon():
    """[F5] fused_ops.py _norm_forward: the module's variance_epsilon (Llama-2's is 1e-5, the tiny model's 1e-6:
    the tests above cannot tell them apart; install's agreement check, on unit-variance input, does not see it)."""

    model, tok = make_model(rms_norm_eps=1e-2)
    ids = torch.randint(4, tok.vocab_size, (2, 19), generator=_gen("ids"))
    before = model(input_ids=ids).logits
    assert fused_ops.install(model)["LlamaRMSNorm"] == 2 * model.config.num_hidden_layers + 1
    with fused_ops.active():
        inside = model(input_ids=ids).logits
    assert relative(inside, before) <= 1e-5


def test_active_is_off_again_after_an_error():
    """[F6] fused_ops.py active(): an error inside (out of memory in a step) must not leave the fused forwards on
    for evaluation and generation."""

    with pytest.raises(RuntimeError):
        with fused_ops.active():
            raise RuntimeError("out of memory, say")
    assert not fused_ops._active


def test_rope_tables_that_need_a_gradient_run_the_original():
    """[F7] fused_ops.py _rope_wrapper: the fused kernel gives no gradient to cos/sin, so tables that require one
    take transformers' function, also inside active()."""

    fused_ops.install(make_model()[0])
    fn = modeling_llama.apply_rotary_pos_emb
    assert getattr(fn, "_booster_fused", False)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 5, 3, 8, generator=g).transpose(1, 2) for _ in range(2))
    angles = torch.rand(2, 5, 4, generator=g) * 6
    seed = torch.randn(2, 3, 5, 8, generator=g)
    grads = {}
    for name, f, on in (("original", fn._booster_original, False), ("wrapped", fn, True)):
        cos, sin = (f_(torch.cat([angles, angles], -1)).requires_grad_() for f_ in (torch.cos, torch.sin))
        with fused_ops.active(on):
            qe, ke = f(q, k, cos, sin)
        grads[name] = torch.autograd.grad(((qe + ke) * seed).sum(), (cos, sin), allow_unused=True)
    for got, want in zip(grads["wrapped"], grads["original"]):
        assert got is not None and torch.allclose(got, want, atol=1e-6)


def test_the_install_check_of_a_4bit_mlp_runs_in_the_models_hidden_dtype(monkeypatch):
    """An MLP of 4-bit weights has no float weight of its own to tell its input's dtype: the check takes the
    model's (fp32 for the tiny model's norms and embeddings), the dtype its forward meets in training, so that
    the kernel variant checked is the one that runs."""
    real, seen = fused_ops.silu_mul, []

    def recording(gate, up):
        seen.append(gate.dtype)
        return real(gate, up)

    monkeypatch.setattr(fused_ops, "silu_mul", recording)
    model, _ = bf.load_model("tiny", quant="nf4", device="cpu", num_hidden_layers=1)
    model = bf.add_lora(model)  # (the base frozen, as the engines install them)
    assert fused_ops.install(model)["LlamaMLP"] == 1
    assert seen and set(seen) == {torch.float32}, seen


def test_mlps_under_lora_dropout_are_fused_and_the_callers_generator_is_untouched():
    """LoRA dropout on the MLP's projections draws random masks: the install check draws the same ones for both
    forwards (a forked generator), so the MLP is fused, and the caller's random stream goes on as before."""
    model, _ = bf.load_model("tiny", device="cpu", num_hidden_layers=1)
    torch.manual_seed(0)
    model = bf.add_lora(model, r=4, alpha=8, targets="gate_proj,up_proj,down_proj", dropout=0.3)
    model.train()
    torch.manual_seed(5)
    counts = fused_ops.install(model)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3)), "the install check moved the caller's generator"
    assert counts["LlamaMLP"] == 1, counts


def test_a_kernel_that_gives_nan_at_the_small_scale_only_keeps_its_own(monkeypatch):
    """The check's second scale (an RMS of 1e-3) counts even when it alone gives NaN: the worse of the two is
    taken with NaN kept, as a NaN verdict refuses."""
    real = fused_ops.rms_norm

    def nan_when_small(x, weight, eps):
        y = real(x, weight, eps)
        return y * float("nan") if float(x.float().pow(2).mean()) < 1e-4 else y

    monkeypatch.setattr(fused_ops, "rms_norm", nan_when_small)
    assert "LlamaRMSNorm" not in fused_ops.install(make_model()[0])


def test_an_error_of_the_modules_own_forward_is_not_blamed_on_the_kernels(monkeypatch):
    """The install check runs the module's own forward first: what that raises is raised as it is, not logged as
    a fused kernel that fails."""
    class LlamaRMSNorm(modeling_llama.LlamaRMSNorm):
        def forward(self, x):
            raise KeyError("broken custom norm")

    with pytest.raises(KeyError, match="broken custom norm"):
        fused_ops.install(nn.Sequential(LlamaRMSNorm(64, eps=1e-5)))
