"""head_loss.py: the fast engine's LM head and cross entropy in chunks, against the model's own head.

The chunked function against a float64 derivation (autograd through F.linear, softcapping and F.cross_entropy)
on irregular sizes, ignored positions and chunks that do not divide the positions; `head_losses` against
`token_losses(logits_of(...))` on the tiny model, padded and packed, losses and LoRA gradients; and the probe
that keeps a model's own head where the chunked one would not be its maths.
"""
import gc
import logging

import pytest
import torch
import torch.nn.functional as F

import booster_fast as bf
from booster_fast import head_loss
from booster_fast.head_loss import _ChunkedHeadLoss, head_losses, probe_head
from booster_fast.kernels import launches
from booster_fast.kernels.model_kernels import available, cross_entropy_grad_
from booster_fast.losses import IGNORE_INDEX, logits_of, token_losses
from booster_fast.packing import pack

from test_fast import SEED, builtin_batches, randomize_lora_b_

P, H, V = 37, 29, 53  # positions, hidden size, vocabulary: irregular, none divides another


def _inputs(dtype, gen, bias=True):
    x = torch.randn(P, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, V, (P,), generator=gen)
    t[torch.rand(P, generator=gen) < 0.3] = IGNORE_INDEX
    return x, w, b, t


def _derived(x, w, b, t, softcap):
    """Per-position losses and d(sum_i c_i loss_i)/dx by autograd in float64."""
    x64 = x.detach().double().requires_grad_(True)
    z = F.linear(x64, w.double(), None if b is None else b.double())
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return x64, F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("chunk", [1, 8, P, 1000])
def test_chunked_losses_and_gradient_match_a_float64_derivation(chunk, softcap):
    gen = torch.Generator().manual_seed(SEED + chunk)
    x, w, b, t = _inputs(torch.float64, gen)
    # a different upstream gradient per position, exact in fp32 (the losses' dtype, so the gradient's too)
    weights = torch.rand(P, generator=gen).double()
    got = _ChunkedHeadLoss.apply(x, w, b, t, softcap, chunk)
    (got.double() * weights).sum().backward()
    x64, want = _derived(x, w, b, t, softcap)
    (want * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (P,)
    assert (got[t == IGNORE_INDEX] == 0).all() and (got[t != IGNORE_INDEX] > 0).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-10, atol=1e-12)
    assert (x.grad[t == IGNORE_INDEX] == 0).all() and x.grad.abs().sum() > 0



def _needs_kernels():
    if not available("cpu") and not torch.cuda.is_available():
        pytest.skip("the Triton kernels run on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("vocab, scale", [(1, 1.0), (53, 4.0), (4096, 4.0), (4097, 30.0), (9001, 300.0)])
def test_the_fused_cross_entropy_matches_float64(vocab, scale, softcap):
    """cross_entropy_grad_ (one kernel, in the logits' place) against F.cross_entropy's float64 autograd: fp32
    logits, irregular vocabularies (one block of CE_BLOCK exactly, one logit past it, several blocks with a
    partial last one), logits up to ±1000 (the online max keeps exp from overflowing), a third of the targets
    ignored (zero loss, zero gradient), with and without softcapping."""
    _needs_kernels()
    gen = torch.Generator().manual_seed(SEED + vocab)
    z = (torch.randn(37, vocab, generator=gen) * scale).double()  # exact in fp32: the kernel's error alone
    t = torch.randint(0, vocab, (37,), generator=gen)
    t[torch.rand(37, generator=gen) < 0.3] = IGNORE_INDEX
    z64 = z.clone().requires_grad_(True)
    capped = softcap * torch.tanh(z64 / softcap) if softcap else z64
    want = F.cross_entropy(capped, t, ignore_index=IGNORE_INDEX, reduction="none")
    want.sum().backward()
    got_z = z.float().to(DEVICE)
    got = cross_entropy_grad_(got_z, t.to(DEVICE), softcap).cpu()
    assert got.dtype == torch.float32 and (got[t == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_z.cpu().double(), z64.grad, rtol=0, atol=2e-6)
    assert (got_z.cpu()[t == IGNORE_INDEX] == 0).all()


def test_the_fused_cross_entropy_in_bf16_rounds_its_gradient_once():
    """bf16 logits: the losses are fp32 arithmetic on the bf16 values (as the torch path's), the gradient is
    rounded once to bf16 (within one bf16 step of the float64 one; Triton's interpreter truncates, the GPU rounds
    to nearest). Bad operands are refused with one line."""
    _needs_kernels()
    gen = torch.Generator().manual_seed(SEED)
    z = (torch.randn(29, 3001, generator=gen) * 5).bfloat16()
    t = torch.randint(0, 3001, (29,), generator=gen)
    z64 = z.double().requires_grad_(True)
    want = F.cross_entropy(z64, t, reduction="none")
    want.sum().backward()
    got_z = z.to(DEVICE)
    got = cross_entropy_grad_(got_z, t.to(DEVICE)).cpu()
    assert got_z.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_z.cpu().double(), z64.grad, rtol=2 ** -7, atol=2 ** -12)
    with pytest.raises(ValueError, match="needs contiguous float"):
        cross_entropy_grad_(got_z.t(), t.to(DEVICE))
    with pytest.raises(ValueError, match="needs contiguous float"):
        cross_entropy_grad_(got_z, t[:5].to(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_compiled_fused_cross_entropy_at_llamas_vocabulary(softcap):
    """The kernel compiled for the GPU on bf16 logits of Llama-2's 32,000 entries (8 blocks, the last partial):
    losses to fp32 rounding and the gradient rounded to nearest bf16 (half a step, where the CPU's interpreter
    truncates), against float64; and the chunked head with it against its torch ops, on the GPU."""
    gen = torch.Generator().manual_seed(SEED)
    z = (torch.randn(67, 32000, generator=gen) * 6).bfloat16()
    t = torch.randint(0, 32000, (67,), generator=gen)
    t[::5] = IGNORE_INDEX
    z64 = z.double().requires_grad_(True)
    capped = softcap * torch.tanh(z64 / softcap) if softcap else z64
    want = F.cross_entropy(capped, t, ignore_index=IGNORE_INDEX, reduction="none")
    want.sum().backward()
    got_z = z.cuda()
    got = cross_entropy_grad_(got_z, t.cuda(), softcap).cpu()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_z.cpu().double(), z64.grad, rtol=2 ** -8, atol=2 ** -14)
    x, w, b, t = (v.cuda() for v in _inputs(torch.bfloat16, gen))
    x = x.detach().requires_grad_(True)
    runs = []
    for fused in (False, True):
        x.grad = None
        losses = _ChunkedHeadLoss.apply(x, w, b, t, softcap, 8, fused)
        losses.sum().backward()
        runs.append((losses.detach(), x.grad.float()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_the_chunked_head_with_the_fused_cross_entropy_is_the_torch_paths(softcap):
    """_ChunkedHeadLoss with the kernel against its torch ops, several uneven chunks: losses and input gradient."""
    _needs_kernels()
    gen = torch.Generator().manual_seed(SEED)
    x, w, b, t = (v.to(DEVICE) for v in _inputs(torch.float32, gen))
    x = x.detach().requires_grad_(True)
    results = []
    for fused in (False, True):
        x.grad = None
        losses = _ChunkedHeadLoss.apply(x, w, b, t, softcap, 8, fused)
        (losses * torch.linspace(0.5, 1.5, P, device=DEVICE)).sum().backward()
        results.append((losses.detach(), x.grad.clone()))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_chunk_holds_the_bytes_the_memory_estimate_counts(monkeypatch, dtype, softcap, fused):
    """The forward's high-water mark beyond what it keeps (the losses, the fp32 input gradient), per logit of a
    chunk: chunk_bytes_per_logit, which memory.py's estimate uses. Two chunks, the second shorter: one chunk's
    logits must be gone before the next chunk's exist (they were not once: 9.5 bytes a bf16 logit, not 6)."""
    from test_memory import LiveBytes

    if fused:
        _needs_kernels()
        # Triton's interpreter keeps a launch's tensors in reference cycles until the garbage collector runs (a
        # compiled kernel keeps none): collected after each launch, as test_memory does
        kernel = head_loss.cross_entropy_grad_
        monkeypatch.setattr(head_loss, "cross_entropy_grad_", lambda *a: (kernel(*a), gc.collect())[0])
    positions, hidden, vocab, chunk = 150, 48, 4099, 79  # (a program per position under the interpreter)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(positions, hidden, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    t = torch.randint(0, vocab, (positions,), generator=gen)
    with LiveBytes() as live:
        losses = _ChunkedHeadLoss.apply(x, w, None, t, softcap, chunk, fused)
    assert (losses > 0).all()
    kept = positions * (hidden + 1) * 4
    per_logit = (live.peak - kept) / (chunk * vocab)
    want = head_loss.chunk_bytes_per_logit(dtype.itemsize, softcapped=softcap is not None, fused=fused)
    assert want == (dtype.itemsize if fused else
                    {(2, False): 6, (4, False): 4}.get((dtype.itemsize, softcap is not None), 8))
    # beyond the logits: a row of the hidden size per position (the gradient before its copy), a few per position
    assert want <= per_logit < want * 1.02, per_logit

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_head_in_low_precision_is_the_heads_rounding(dtype, tol):
    """fp32 and bf16 inputs (the logits in the input's dtype, the cross entropy in fp32, as the model's head and
    token_losses run them) against the float64 derivation."""
    gen = torch.Generator().manual_seed(SEED)
    x, w, b, t = _inputs(dtype, gen, bias=False)
    got = _ChunkedHeadLoss.apply(x, w, b, t, None, 5)
    got.sum().backward()
    x64, want = _derived(x, w, b, t, None)
    want.sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    err = (x.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert err < tol, f"{dtype}: input gradient {err:.3g} from the float64 derivation"


def _tiny_with_lora(targets="all-linear"):
    model, tok = bf.load_model("tiny", seed=SEED, device="cpu", num_hidden_layers=2)
    torch.manual_seed(SEED)
    return randomize_lora_b_(bf.add_lora(model, r=4, alpha=8, targets=targets), SEED + 1), tok


def _losses_and_grads(model, batch, losses_of):
    model.zero_grad(set_to_none=True)
    losses = losses_of(model, batch)
    weights = torch.linspace(0.5, 1.5, losses.numel()).view_as(losses)  # per-position upstream gradients
    (losses * weights).sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("chunk_logits", [head_loss.CHUNK_LOGITS, 2485 * 7])  # one chunk; several, uneven
def test_head_losses_are_the_models_own(monkeypatch, form, chunk_logits, fused):
    if fused:
        _needs_kernels()
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", chunk_logits)
    model, tok = _tiny_with_lora()
    ((align, _),) = builtin_batches(tok, 1, batch_size=5, max_length=96)
    batch = {k: v for k, v in align.items() if k != "attention_mask"}  # right-padded: exact without it
    if form == "packed":
        batch = pack(align)
    own, own_grads = _losses_and_grads(model, batch, lambda m, b: token_losses(logits_of(m, b), b))
    kernels = []
    with launches.observed(kernels.append):
        got, grads = _losses_and_grads(model, batch, lambda m, b: head_losses(m, b, fused))
    assert kernels.count("_cross_entropy_grad_kernel") == (-(-own.numel() // (chunk_logits // 2485)) if fused else 0)
    assert got.shape == own.shape and (own > 0).any()
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, own_grads, strict=True):
        assert (g - g0).norm() <= 1e-5 * g0.norm(), f"{form}: a LoRA gradient {(g - g0).norm() / g0.norm():.3g} off"


def test_the_probe_keeps_the_models_own_head_where_it_must(caplog):
    model, _ = _tiny_with_lora()
    assert probe_head(model) is None
    lora_head, _ = _tiny_with_lora(("q_proj", "lm_head"))
    assert probe_head(lora_head) == "its LM head is a LoRA target: it trains"
    other, _ = _tiny_with_lora()
    head = other.get_output_embeddings()
    head.__class__ = type("ScaledHead", (torch.nn.Linear,), {})  # a head class of a model's own
    assert probe_head(other).endswith("ScaledHead, not a plain torch.nn.Linear")
    # a softcapping the config names but the model's code does not apply: the chunked losses would differ
    model.config.final_logit_softcapping = 1.0
    assert "the chunked losses differ from the model's own" in probe_head(model)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        booster = bf.Booster(lora_head, bf.BoosterConfig(impl="fast"))
    assert not booster.engine.chunked_head
    assert "LM head: the model's own, over all positions at once (its LM head is a LoRA target: it trains)" in \
        [r.getMessage() for r in caplog.records]


def test_the_engine_runs_the_fused_cross_entropy_with_its_fused_ops_and_drops_a_kernel_that_disagrees(
        monkeypatch, caplog):
    """fused_ops on: the chunked head's cross entropy runs as the kernel (launched in the step; the memory estimate
    counts the logits alone). A kernel whose losses are not the model's is refused when the engine is built: the
    head stays chunked, with its torch ops, and a warning says why."""
    _needs_kernels()
    from booster_fast import memory

    model, tok = _tiny_with_lora()
    booster = bf.Booster(model, bf.BoosterConfig(impl="fast", fused_ops=True, merge_passes=True))
    assert booster.engine.chunked_head and booster.engine.fused_head
    ((align, harmful),) = builtin_batches(tok, 1, batch_size=1, max_length=48)  # (the interpreter: few tokens)
    a, h = booster.to_device(align, "cpu"), booster.to_device(harmful, "cpu")
    kernels = []
    with launches.observed(kernels.append):
        booster.step(a, h)
    assert kernels.count("_cross_entropy_grad_kernel") == 2  # the merged pass and the perturbed one: a chunk each
    with monkeypatch.context() as m:  # the estimate is told which head runs
        m.setattr(memory, "estimate", lambda shape, **settings: settings)
        assert memory.of_booster(booster, 1, 1, 48)["fused_head"] is True

    kernel = head_loss.cross_entropy_grad_
    monkeypatch.setattr(head_loss, "cross_entropy_grad_", lambda *args: kernel(*args) * 1.01)
    model, _ = _tiny_with_lora()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        booster = bf.Booster(model, bf.BoosterConfig(impl="fast", fused_ops=True))
    assert booster.engine.chunked_head and not booster.engine.fused_head
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith(
        "LM head: chunked, its cross entropy in torch ops (with the fused kernel the chunked losses differ from the "
        "model's own by ") for r in caplog.records)


def test_gemma2s_final_softcapping_runs_chunked(monkeypatch):
    """Gemma 2 softcaps its logits (config.final_logit_softcapping; 1.0 here, so that it bends the tiny model's
    small logits): the probe accepts the chunked head, which softcaps too, and its losses and LoRA gradients are
    the model's own."""
    from test_fused_ops import _gemma

    model = _gemma("gemma2", 300)
    model.config.final_logit_softcapping = 1.0
    assert head_loss.softcap_of(model) == 1.0 and probe_head(model) is None
    ids = torch.randint(4, 300, (3, 21), generator=torch.Generator().manual_seed(SEED))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    own, own_grads = _losses_and_grads(model, batch, lambda m, b: token_losses(logits_of(m, b), b))
    got, grads = _losses_and_grads(model, batch, head_losses)
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, own_grads, strict=True):
        assert (g - g0).norm() <= 1e-5 * g0.norm()
    # without the softcapping the chunked losses would be another function, which the probe refuses
    monkeypatch.setattr(head_loss, "softcap_of", lambda model: None)
    assert (head_losses(model, batch) - own).abs().max() > 1e-2
    assert "the chunked losses differ from the model's own" in probe_head(model)


def test_the_probe_takes_a_bf16_models_own_softcapping_rounding(monkeypatch):
    """A bf16 Gemma 2 softcaps its bf16 logits, the chunked head their fp32 copy (2.3e-3 apart, measured): within
    bf16's tolerance, while a softcap left out (0.29 off) is still refused."""
    from booster_fast.compute import Autocast
    from test_fused_ops import _gemma

    model = _gemma("gemma2", 300)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    autocast = Autocast(model, torch.device("cpu"))
    assert probe_head(model, autocast) is None
    monkeypatch.setattr(head_loss, "softcap_of", lambda model: None)
    assert "the chunked losses differ from the model's own" in probe_head(model, autocast)
