"""The LM head and the cross entropy of the fast engine, in chunks of positions: the full logits never exist.

A causal LM's loss needs, per labelled position, the log-sum-exp of its logits and the logit of its target; its
backward needs (softmax − one-hot)·W_head. The model's own head computes the logits of every position at once and
the cross entropy keeps an fp32 log-softmax of them for the backward: ~12 bytes per position and vocabulary entry
at the peak (memory.HEAD_BYTES_PER_LOGIT), 1.8 GiB for a merged 7B pass of 20 x 256 tokens over Llama-2's 32,000
entries, 15 GiB over Gemma-2's 256,000. Here the positions go through the head CHUNK_LOGITS logits at a time,
and each chunk's gradient with respect to the head's input is taken at once, in the forward: since the head is
frozen (LoRA does not train it), that gradient is all its backward needs. What is kept for the backward is one
fp32 row of the hidden size per position; the backward scales each row by its position's incoming gradient (the
token mean's 1/count, different for the harmful and alignment rows of a merged pass). The FLOPs are those of the
model's head and its backward; only the memory changes. Where the engine runs its fused ops, each chunk's cross
entropy and gradient is one Triton kernel working in the logits' own memory (kernels.model_kernels
.cross_entropy_grad_: three passes over a chunk and no copy); elsewhere its torch twin (cross_entropy_grad_torch_,
beside it) works on an fp32 copy.

`head_losses` runs the model's forward with its head swapped for one that keeps its input and returns no logits
(the forward's own steps around the head, such as packing's choice of positions, still run), then this module's
head. It reproduces a plain `nn.Linear` head with, where the config has it, Gemma's final logit softcapping;
`probe_head` checks that on the model when the engine is built, and a model whose head is anything else (a LoRA
target, a quantised layer, logits scaled by its own code) keeps its own head and the full logits.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .attention import probing
from .compute import compute_dtype
from .errors import described
from .kernels.model_kernels import cross_entropy_grad_, cross_entropy_grad_torch_
from .losses import IGNORE_INDEX, logits_of, targets_of, token_losses

# logits per chunk: 2^25, 1,048 positions of Llama-2's vocabulary, 131 of Gemma-2's. With the torch ops a chunk's
# peak is the fp32 logits (4 bytes each) and, from bf16 logits, one bf16 copy beside them (the logits, then the
# gradient cast for the head's matmul): ~200 MB for bf16 logits, where the model's head holds ~12 bytes a logit
# for every position; a softcapped head keeps a second fp32 copy, the slope, until the gradient has used it. The
# fused kernel works in the logits' own memory: 67 MB (chunk_bytes_per_logit).
CHUNK_LOGITS = 2 ** 25


def chunk_positions(vocab: int) -> int:
    """Positions per chunk for a vocabulary of `vocab` entries (CHUNK_LOGITS logits, at least one position)."""
    return max(1, CHUNK_LOGITS // vocab)


def chunk_bytes_per_logit(logit_bytes: int, softcapped: bool = False, fused: bool = False) -> int:
    """A chunk's peak per logit: 6 for bf16 logits, 4 for fp32, 8 for either softcapped; with the fused kernel
    the logits alone (it works in their place). A chunk's tensors are freed before the next chunk's logits exist;
    test_head_loss measures it."""
    if fused:
        return logit_bytes
    return max(4 + (logit_bytes if logit_bytes < 4 else 0), 8 if softcapped else 0)


def _chunk(x, weight, bias, targets, softcap, losses, grad_x, fused):
    """One chunk: its losses and its gradient with respect to `x`, written into `losses` and `grad_x` (the chunk's
    rows of the outputs). A function of its own, so that its tensors the size of the logits are freed when it
    returns, before the next chunk's logits exist. `fused`: the cross entropy and its gradient as one kernel in
    the logits' own place (kernels.model_kernels.cross_entropy_grad_), else its torch twin on an fp32 copy."""
    z = F.linear(x, weight, bias)  # the logits as the head computes them (bf16 under autocast)
    dtype = z.dtype
    if fused and dtype != torch.float64:  # (the kernel computes in fp32: an fp64 model keeps the torch ops)
        losses.copy_(cross_entropy_grad_(z, targets, softcap, IGNORE_INDEX))
    else:
        z = z.to(grad_x.dtype)  # fp32 (bf16: a copy, and the bf16 logits go); fp64 for an fp64 model
        losses.copy_(cross_entropy_grad_torch_(z, targets, softcap, IGNORE_INDEX))
    # through the head, in its logits' dtype, as the head's own backward would run it
    grad_x.copy_(z.to(dtype) @ weight.to(dtype))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Per-position cross entropy of `x @ weight.T (+ bias)`, softcapped where `softcap` is set; zero where the target
    is IGNORE_INDEX. x: [P, H] (requires grad), weight: [V, H] (frozen), targets: [P]. Returns fp32 losses [P].
    `fused`: each chunk's cross entropy as one Triton kernel (where the kernels run: CUDA, or Triton's interpreter)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, softcap, chunk, fused=False):
        losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        # d loss_i / d x_i, kept for the backward: in fp32 (fp64 for an fp64 model)
        grad_x = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            _chunk(x[rows], weight, bias, targets[rows], softcap, losses[rows], grad_x[rows], fused)
        ctx.save_for_backward(grad_x)
        ctx.x_dtype = x.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_x,) = ctx.saved_tensors
        return (grad_losses.float().unsqueeze(1) * grad_x).to(ctx.x_dtype), None, None, None, None, None, None


@contextlib.contextmanager
def _head_inputs(head, kept: list):
    """Inside: `head` appends its input to `kept` and returns no logits (a [..., 0] tensor), so the model's
    forward runs everything but the head's matmul. The head's pre-hooks still run (losses.kept_positions)."""
    had_own = "forward" in head.__dict__
    own = head.__dict__.get("forward")

    def keep(x):
        kept.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    head.forward = keep
    try:
        yield
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward


def softcap_of(model) -> float | None:
    """Gemma 2/3's final logit softcapping from the config (None where there is none)."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    return getattr(text, "final_logit_softcapping", None) or None


def head_losses(model, batch: dict, fused: bool = False) -> torch.Tensor:
    """What `token_losses(logits_of(model, batch), batch)` gives — per-position cross entropy, [B, T-1] for a
    padded batch, [1, K] for a packed one — with the LM head run in chunks (the module docstring); `fused`: each
    chunk's cross entropy as one kernel (the engine's fused_ops)."""
    head, kept = model.get_output_embeddings(), []
    with _head_inputs(head, kept):
        logits_of(model, batch)
    (x,) = kept
    targets = targets_of(batch)
    x = x[:, :targets.shape[1]].reshape(-1, x.shape[-1])
    losses = _ChunkedHeadLoss.apply(x, head.weight, head.bias, targets.reshape(-1), softcap_of(model),
                                    chunk_positions(head.out_features), fused)
    return losses.view_as(targets)


def probe_head(model, autocast=contextlib.nullcontext, fused: bool = False) -> str | None:
    """Why the chunked head cannot stand in for `model`'s own, or None when it can: the head must be a plain,
    frozen nn.Linear, and the chunked losses of two random rows must match those of the model's logits. The
    head's input is scaled for the check so that the logits spread as a trained model's do (std 8): a random
    model's logits are small, and a softcapping or scaling the chunked head lacks would hardly show on them. Run
    once when the engine is built (a few host reads); a failure is a reason, never an exception. `fused`: check
    the chunked head with its fused cross entropy, as the engine will run it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and (hasattr(head, "lora_A") or any(p.requires_grad for p in
                                                                               head.parameters())):
        return "its LM head is a LoRA target: it trains"
    if type(head) is not torch.nn.Linear:
        kind = type(head)
        return f"its LM head is a {kind.__module__}.{kind.__qualname__}, not a plain torch.nn.Linear"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, head.out_features - 1), head.out_features, (2, 6), generator=g)
    batch = {"input_ids": ids.to(head.weight.device), "labels": ids.to(head.weight.device)}
    try:
        with torch.no_grad(), probing(model), autocast():
            scale = 8 / max(float(logits_of(model, batch).float().std()), 1e-6)
            handle = head.register_forward_pre_hook(lambda module, args: (args[0] * scale, *args[1:]))
            try:
                want = token_losses(logits_of(model, batch), batch)
                got = head_losses(model, batch, fused)
            finally:
                handle.remove()
    except Exception as e:  # noqa: BLE001 - any model code that cannot take it: the reason, logged by the caller
        return f"its forward without the head's logits failed ({described(e)})"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    # in bf16 a model may softcap its bf16 logits where the chunked head softcaps their fp32 copy: measured 2.3e-3
    # on a small Gemma 2; a softcap left out gives 0.29 there
    tolerance = 1e-3 if compute_dtype(model) == torch.float32 else 2e-2
    return None if err <= tolerance else f"the chunked losses differ from the model's own by {err:.2g} relative"
