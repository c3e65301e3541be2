"""Attention without transformers' mask building: mask-free causal SDPA for right-padded batches, and
per-segment attention for packed ones.

transformers builds each forward's attention mask itself. With its standard "sdpa" implementation that costs
a host sync per forward on CUDA: given a padding mask it calls `.all()` on it to see whether SDPA's causal
kernels may be used; given none, it checks the position ids for packed sequences, again with `.all()`. Inside
a CUDA-graph capture it skips both checks and materialises a 4D mask instead, so a captured step would run
other attention kernels than the eager one.

Registered under a name of its own that has no mask function, transformers' SDPA attention gets no mask (mask
creation exits early for such implementations) and runs with `is_causal=True`: no host sync, no mask tensor,
the flash kernels, the same in eager and captured steps. That is exact exactly when the batch needs no mask:
right-padded, with the pads unlabelled (real tokens never attend to the pads after them). So it is switched on
only around the forward of a batch that carries no attention mask; `Booster.to_device` leaves the mask out for
the fast engine after checking the padding on the host.

Packed batches (packing.py) run `varlen_attention_forward` instead, registered the same way: each segment attends
causally to itself only. On CUDA in bf16/fp16 that is flash attention's variable-length kernel
(torch.nn.attention.varlen), which computes no position twice and syncs with nothing. Elsewhere (the CPU, fp32,
a torch without it) the tokens are scattered into a [segments, max_seqlen] grid, run through causal SDPA and
gathered back: exact, device-side, but it computes the grid's empty slots too.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import math

import torch
import torch.nn.functional as F

from .errors import described, reason

log = logging.getLogger("booster_fast")
CAUSAL_SDPA = "booster_causal_sdpa"
VARLEN = "booster_varlen"
_registered = False
_calls = {CAUSAL_SDPA: 0, VARLEN: 0}  # calls of our registered functions: probe_attention counts them
# packed attention's calls in this process by the kernel that ran: "flash varlen", or "segment grid (why not
# flash)". Python calls only: a CUDA graph's replay reruns what its capture counted once. The bench reports them
packed_kernel_calls: collections.Counter = collections.Counter()
_logged: set[str] = set()
_flash_failed: str | None = None  # why flash's kernel failed at run time, once: the grid path from then on
# Grouped-query k/v where varlen_attn takes no enable_gqa (torch 2.11): the flash kernel behind it divides the query
# heads into groups by itself (FlashAttention-2's varlen kernels take fewer k/v heads), though the API does not
# say so. probe_flash tries them as they are, and only where that fails or disagrees repeats them to every query
# head from then on (the backward then also keeps them repeated).
_gqa_repeat = False


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def causal_sdpa_forward(*args, **kwargs):
            _calls[CAUSAL_SDPA] += 1
            return sdpa_attention_forward(*args, **kwargs)

        AttentionInterface.register(CAUSAL_SDPA, causal_sdpa_forward)
        AttentionInterface.register(VARLEN, varlen_attention_forward)
        _registered = True


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """(torch's variable-length flash attention, the names of its parameters, the keyword that makes it causal),
    or (None, None, why not). The API moved between releases: torch 2.10 takes `is_causal` (and no `scale`),
    2.11 a `window_size` and `scale`, 2.13 `enable_gqa` too."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None, "this torch has no torch.nn.attention.varlen"
    params = frozenset(inspect.signature(varlen_attn).parameters)
    if "is_causal" in params:
        return varlen_attn, params, {"is_causal": True}
    if "window_size" in params:  # causal = a window of (all before, none after)
        return varlen_attn, params, {"window_size": (-1, 0)}
    return None, None, "torch.nn.attention.varlen.varlen_attn takes no causal flag"


def packed_kv_grouped(device) -> bool:
    """Whether packed attention on `device` keeps grouped-query k/v at their own head count (memory.py counts
    what the backward keeps): the grid path and a flash varlen that takes grouped k/v do; one that took them
    wrongly in probe_flash gets them repeated to every query head."""
    flash, params, _ = _flash_varlen()
    return torch.device(device).type != "cuda" or flash is None or "enable_gqa" in params or not _gqa_repeat


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _flash(q, k, v, cu, max_seqlen: int, scaling, dropout: float):
    """Flash's variable-length kernel on q [P, H, D], k/v [P, H_kv, D], or (None, why it cannot run here)."""
    global _flash_failed
    flash, params, causal = _flash_varlen()
    why = (causal if flash is None else _flash_failed if _flash_failed else "not a CUDA tensor" if not _on_cuda(q)
           else f"{q.dtype} (it needs bf16 or fp16)" if q.dtype not in (torch.bfloat16, torch.float16)
           else "attention dropout" if dropout else None)
    kwargs = dict(causal) if why is None else {}
    if why is None and scaling is not None:
        if "scale" in params:
            kwargs["scale"] = scaling
        elif not math.isclose(scaling, q.shape[-1] ** -0.5, rel_tol=1e-6):
            why = "this torch's varlen_attn takes no scale, and the model's is not 1/sqrt(head_dim)"
    if why is not None:
        return None, why
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif _gqa_repeat:  # a kernel that took grouped heads wrongly (probe_flash): repeat the kv heads
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    try:
        return flash(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, **kwargs), None
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # a build without these kernels, an
        # API that refuses these arguments: found by probe_flash or the eager warm-up, before any capture. Out of
        # memory is the step's, not the kernel's: raised as it is, the kernel kept for the next step
        if isinstance(e, torch.OutOfMemoryError) or (torch.cuda.is_available()
                                                     and torch.cuda.is_current_stream_capturing()):
            raise
        _flash_failed = f"flash varlen failed: {reason(e)}"
        return None, _flash_failed


def probe_flash(device, dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Run flash's variable-length kernel once, forward and backward, on a few random segments (an empty one
    among them) of the model's head shape, against the exact grid path. Returns None when it agrees, else why
    not; after a failure every packed attention takes the grid path (one log line says so). Grouped-query k/v
    on an API without enable_gqa go in as they are first and, where that fails, repeated (_gqa_repeat). Called
    once when an engine that packs is built on CUDA, outside any step: it reads its verdict back to the host."""
    global _flash_failed, _gqa_repeat
    why = _probe_flash(device, dtype, heads, kv_heads, head_dim)
    flash, params, _ = _flash_varlen()
    if why is None or kv_heads == heads or flash is None or "enable_gqa" in params or _gqa_repeat:
        return why
    log.info("flash varlen with %d k/v heads for %d query heads: %s; the k/v heads go in repeated", kv_heads, heads,
             why)
    _flash_failed, _gqa_repeat = None, True
    return _probe_flash(device, dtype, heads, kv_heads, head_dim)


def _probe_flash(device, dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """probe_flash's one check, as _flash runs the kernel now."""
    global _flash_failed
    g = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 7, 7, 20, 21, 48], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(48, h, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(48, heads, head_dim, generator=g, device=device, dtype=dtype)
    scale = head_dim ** -0.5
    with torch.enable_grad():
        out, why = _flash(q, k, v, cu, 27, scale, 0.0)
        if out is None:
            return why
        try:
            got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        except (RuntimeError, NotImplementedError) as e:  # a forward without a backward (an early API)
            _flash_failed = f"flash varlen backward failed: {reason(e)}"
            return _flash_failed
        exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = segment_attention(*exact, cu, 27, scale=scale)
        want = (ref, *torch.autograd.grad(ref, exact, grad.float()))
    got, want = [t.detach().float() for t in got], [t.detach() for t in want]
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))  # host read, once
    if not worst <= 2e-2:  # bf16 rounding is ~4e-3 relative
        _flash_failed = f"flash varlen disagrees with the exact path ({worst:.2g} relative)"
        return _flash_failed
    return None


def _log_once(msg: str, *args):
    text = msg % args
    if text not in _logged:
        _logged.add(text)
        log.info(text)


def segment_attention(q, k, v, cu_seqlens, max_seqlen: int, scale=None, dropout: float = 0.0):
    """Causal attention within each segment of packed tokens, by way of a padded grid. q [P, H, D], k and v
    [P, H_kv, D]; segment s holds tokens cu_seqlens[s]:cu_seqlens[s+1], none longer than max_seqlen. Returns
    [P, H, D]. Device ops only: no host sync, static shapes."""
    tokens, segments = q.shape[0], cu_seqlens.numel() - 1
    t = torch.arange(tokens, device=q.device)
    starts = cu_seqlens.long()
    seg = torch.searchsorted(starts[1:], t, right=True)  # empty segments (repeated starts) are skipped
    slot = seg * max_seqlen + (t - starts[seg])

    def grid(x):  # [P, H, D] -> [segments, H, max_seqlen, D], zeros in the empty slots
        g = x.new_zeros(segments * max_seqlen, *x.shape[1:]).index_copy(0, slot, x)
        return g.view(segments, max_seqlen, *x.shape[1:]).transpose(1, 2)

    # real queries attend only to earlier slots of their own segment: all real, so the empty ones never count
    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), dropout_p=dropout, is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(segments * max_seqlen, *q.shape[1:]).index_select(0, slot)


def varlen_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention interface for packed batches: query [1, H, P, D], key/value [1, H_kv, P, D];
    cu_seq_lens_q and max_length_q come in through the model's forward kwargs (losses.logits_of passes them).
    Returns ([1, P, H, D], None)."""
    _calls[VARLEN] += 1
    if "cu_seq_lens_q" not in kwargs or "max_length_q" not in kwargs:  # (probe_attention: packing off for it)
        raise ValueError("packed attention: the layer was not handed the packed sequences' boundaries "
                         "(cu_seq_lens_q, max_length_q): the model does not pass its forward's arguments on to it")
    cu, max_seqlen = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    window = kwargs.get("sliding_window")
    if window is not None and max_seqlen > window:  # Booster.to_device sends such batches padded
        raise ValueError(f"packed attention: segments of up to {max_seqlen} tokens exceed the layer's sliding window "
                         f"of {window}, which it does not implement")
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:  # a layer that needs them must not run without them (probe_attention finds such models)
        raise ValueError(f"packed attention does not implement {', '.join(unsupported)}, which this layer uses")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one row of packed tokens, got {query.shape[0]} rows")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [P, H, D]
    out, why = _flash(q, k, v, cu, max_seqlen, scaling, dropout)
    packed_kernel_calls["flash varlen" if out is not None else f"segment grid ({why})"] += 1
    if out is None:
        if _on_cuda(q):
            _log_once("packed attention: no flash variable-length kernel (%s); segment grid + SDPA instead", why)
        out = segment_attention(q, k, v, cu, max_seqlen, scale=scaling, dropout=dropout)
    else:
        _log_once("packed attention: flash variable-length kernel")
    return out[None], None


def sliding_window(model) -> int | None:
    """The model's sliding attention window (None: full attention). Packed batches run on such a model as long as
    no sequence is longer than the window, where it changes nothing (Booster.to_device sends longer ones padded)."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return int(window) if window else None


def supports_packing(model) -> str | None:
    """None when packed batches can run on this model (probe_attention then checks that they run exactly), else
    why not."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r} (needs sdpa or eager)"
    if getattr(config, "is_causal", True) is False:
        return "the model is not a causal decoder"
    if not isinstance(getattr(model, "get_output_embeddings", lambda: None)(), torch.nn.Module):
        return "the model has no output embeddings (LM head) to restrict to the labelled positions"
    return None


@torch.no_grad()
def probe_attention(model, autocast=contextlib.nullcontext) -> tuple[str | None, str | None]:
    """(why packed batches cannot run on `model`, why right-padded batches cannot leave their mask out), each
    None when they can. Both forms rely on the model looking its attention up in transformers' registry, which
    many causal LMs with attention code of their own do not (Bloom, GPT-Neo, Falcon, XGLM, ...): there packing
    would let sequences attend to each other, silently. So two random rows (7 and 3 tokens, fewer for a narrower
    sliding window) run three ways, without dropout: padded with the mask (the model's own path), packed, and
    without the mask; the packed form must reach our attention function in every layer, the mask-free one in
    every layer when it is switched in, and both must give the padded logits at the real positions (within the
    compute dtype's rounding). Run once when the fast engine is built (a few host reads); a failure is a
    reason, never an exception."""
    device = next(model.parameters()).device
    config = model.config
    g = torch.Generator().manual_seed(0)
    longest = min(7, sliding_window(model) or 7)  # rows that fit a sliding window: those are the ones that pack
    lengths = torch.tensor([longest, max(1, longest // 2)])
    real = torch.arange(longest) < lengths[:, None]
    ids = torch.randint(min(3, config.vocab_size - 1), config.vocab_size, (2, longest), generator=g) * real
    layers = getattr(config, "num_hidden_layers", None)
    from .compute import compute_dtype

    # bf16 rounding differs between attention kernels (the padded run's takes a mask, the others none), and a
    # deep random-init model amplifies that ~20x into its logits: measured on the CPU, llama-7b-shape's packed
    # logits differ by 3e-3, by 5e-2 with 0.2 % noise on every attention output, and by 0.8 when the two rows
    # leak into each other (one segment). So bf16 gets 1e-1; the layer counts below catch a bypassed registry
    low_precision = compute_dtype(model) != torch.float32
    tolerance = 1e-1 if low_precision else 1e-4

    switched = {}  # whether the mask-free run had our function switched in (not where a window is narrower)
    errors = {}  # the relative error of each form that ran, for the log line

    def check(name, run, counter):
        before = _calls[counter]
        try:
            with autocast():
                got = run().float()
        except Exception as e:  # any model code that cannot take this form: the reason, logged by the caller
            return f"its {name} forward failed ({described(e)})"
        calls = _calls[counter] - before
        if switched.get(counter, True) and (calls == 0 or (layers and calls != layers)):
            return (f"its attention reached the {name} function {calls} times for {layers} layers (it does not look "
                    f"attention up in transformers' registry)")
        err = errors[name] = float((got - want).norm() / want.norm().clamp_min(1e-30))
        return None if err <= tolerance else f"the {name} logits differ from the padded ones by {err:.2g} relative"

    with probing(model):
        with autocast():
            want = model(input_ids=ids.to(device), attention_mask=real.long().to(device), use_cache=False).logits
            want = want[real.to(device)].float()
        cu = torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32, device=device)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None].to(device)

        def packed():
            with packed_attention(model):
                return model(input_ids=ids[real][None].to(device), position_ids=positions, use_cache=False,
                             cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                             max_length_k=longest).logits[0]

        def unmasked():
            with unmasked_causal(model, {"input_ids": ids}):
                switched[CAUSAL_SDPA] = config._attn_implementation == CAUSAL_SDPA
                return model(input_ids=ids.to(device), use_cache=False).logits[real.to(device)]

        why_mask = check("mask-free", unmasked, CAUSAL_SDPA)
        why_pack = (supports_packing(model) or (why_mask and f"it needs its attention masks ({why_mask})")
                    or check("packed", packed, VARLEN))
    if low_precision and any(errors.values()):  # the margin in bf16, where the forms do not agree bit for bit
        # (a GPU's kernels round apart)
        log.info("attention probe: the %s logits differ from the padded ones by %s relative (tolerance %.0e)",
                 " and ".join(errors), " and ".join(f"{e:.1e}" for e in errors.values()), tolerance)
    return why_pack, why_mask


@contextlib.contextmanager
def probing(model):
    """Inside: the model in eval mode (no dropout) for a probe's forwards, except bitsandbytes' 4-bit layers: on the
    CPU an eval-mode forward without grad repacks their weights for inference in place, after which training
    computes zero gradients. Each module's mode is restored on the way out."""
    modes = {m: m.training for m in model.modules()}
    for m in modes:
        m.training = type(m).__name__ == "Linear4bit" and m.training
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def packed_attention(model):
    """Inside: the model's attention is `varlen_attention_forward` (for packed batches; see packing.py)."""
    if model.config._attn_implementation == VARLEN:  # already inside (the step holds it across the backward)
        yield
        return
    why = supports_packing(model)
    if why is not None:
        raise ValueError(f"packed batches cannot run on this model: {why}")
    _register()
    config, previous = model.config, model.config._attn_implementation
    config._attn_implementation = VARLEN
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def unmasked_causal(model, batch: dict):
    """Inside: a model on transformers' "sdpa" attention runs the mask-free causal SDPA, when `batch` has no
    attention mask. Any other model or batch is left as it is, and so is a model whose mask is more than causal
    for this batch (a sliding window narrower than its rows: mask building adds it; a model that is not causal
    at all)."""
    config = getattr(model, "config", None)
    window = sliding_window(model)
    if (batch.get("attention_mask") is not None or getattr(config, "_attn_implementation", None) != "sdpa"
            or (window and batch["input_ids"].shape[-1] > window) or getattr(config, "is_causal", True) is False):
        yield
        return
    _register()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
