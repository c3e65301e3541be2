"""Flat buffers for the LoRA weights and their gradients, and per-token gradient routing.

`FlatLoRA` moves every trainable LoRA tensor into one fp32 buffer `W` (each peft parameter becomes a view of
it, so peft still saves and loads its own adapters), and points each parameter's `.grad` at a view of `G_f`.
Autograd accumulates in place into an existing `.grad` (as DDP's `gradient_as_bucket_view` relies on), so a
backward pass writes straight into the flat buffer and every later bookkeeping op is one op on one tensor.

Routing. Each LoRA weight also gets an *alias*: a second leaf tensor over the same storage whose `.grad` is a
view of `G_h`. The LoRA layers' forward is replaced by `_routed_forward`, whose autograd function
(`_RoutedLoRA`) computes the LoRA delta of all positions at once (the values are the same) and, in the backward,
hands the weight gradients of the first `harmful_tokens` positions of the batch (rows x length, flattened: whole
rows of a padded batch, whole segments of a packed one) to the aliases and of the rest to the parameters. The
frozen base matmul runs once over all of them. So one backward of `loss_h + loss_f` over the concatenated batch leaves
∇h(w) in G_h and ∇f(w) in G_f (sequences never interact in a decoder), and a harmful-only pass (everything
routed to the aliases) lands its gradient in G_h whatever the parameters' `.grad` say.
"""
from __future__ import annotations

import contextlib
import types

import torch

ALL_TOKENS = 1 << 62  # route every position to the harmful aliases
# The buffers are padded to a multiple of ALIGN elements (the pad stays zero: no parameter views it, so its
# gradient is 0 and AdamW leaves it at 0). Triton specialises a length divisible by 16 and then moves the
# element-wise kernels' data in 128-bit vectors (scalar 32-bit accesses otherwise); G_f = G[1] starts 256-byte
# aligned.
ALIGN = 64


def _check_plain_lora(model, layers) -> None:
    """Refuse what `_routed_forward` does not compute: trainable parameters other than the A/B weights of LoRA
    Linear layers (peft's modules_to_save, biases, DoRA's magnitudes, LoRA on embeddings), LoRA layers of another
    kind (convolutions, LoRA on a module's weight tensor: peft's target_parameters), DoRA. The reference engine
    trains any of them."""
    routed, why = set(), []
    for m in layers:
        if getattr(m, "parameter_name", None):  # peft's ParamWrapper: LoRA added to a weight tensor (target_parameters,
            # e.g. fused MoE experts), whose module's forward is no `x @ W.T`
            why.append(f"LoRA on parameters ({type(m.get_base_layer()).__name__}.{m.parameter_name}: peft's "
                       f"target_parameters, MoE experts)")
        if len(getattr(m, "lora_embedding_A", ())):
            why.append("LoRA on embeddings")
        for name in m.lora_A:
            a, b = m.lora_A[name], m.lora_B[name]
            if not (type(a) is torch.nn.Linear and type(b) is torch.nn.Linear):
                why.append(f"{type(m).__name__} LoRA layers ({type(a).__name__})")
            if getattr(m, "use_dora", {}).get(name, False):
                why.append("DoRA")
            routed |= {id(a.weight), id(b.weight)}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in routed]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        why.append(f"trainable parameters outside LoRA's A/B weights ({shown})")
    if why:
        raise ValueError(f"the fast engine trains plain LoRA on Linear layers only, not {'; '.join(dict.fromkeys(why))}:"
                         f" use impl='reference' for this model")


class FlatLoRA:
    def __init__(self, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # (module, attribute) that holds each parameter: views_intact checks that it still holds that one
        self._owners = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n, _ in named]
        if not self.params:
            from .lora import no_trainable_reason

            raise ValueError(no_trainable_reason(model))
        layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        if not layers:
            raise ValueError("the model has no LoRA layers; call add_lora first (the fast engine trains LoRA weights)")
        _check_plain_lora(model, layers)
        devices = {p.device for p in self.params}
        if len(devices) > 1:  # a model split across devices (device_map="auto"): one flat buffer cannot hold them
            raise ValueError(f"impl='fast' keeps every LoRA weight in one buffer on one device; this model's are on "
                             f"{', '.join(sorted(map(str, devices)))}: load the model on one device (in 4 bits, "
                             f"quant='nf4', where it does not fit)")
        if any(p.dtype == torch.float64 for p in self.params):  # the masters are fp32, as are the kernels
            raise ValueError("impl='fast' keeps the LoRA weights in fp32 (its flat buffers and kernels); this model's "
                             "are float64: use impl='reference' for a float64 run")
        device = self.params[0].device
        self.sizes = [p.numel() for p in self.params]
        n = sum(self.sizes)
        padded = -(-n // ALIGN) * ALIGN
        self.W = torch.zeros(padded, dtype=torch.float32, device=device)
        self.B = torch.empty_like(self.W)              # backup of W across the perturbed pass
        self.G = torch.zeros(2, padded, dtype=torch.float32, device=device)
        self.G_h, self.G_f = self.G[0], self.G[1]      # harmful grad, alignment (then combined) grad

        self._w_views = list(self.W[:n].split(self.sizes))
        self._gh_views = [g.view_as(p) for g, p in zip(self.G_h[:n].split(self.sizes), self.params)]
        self._gf_views = [g.view_as(p) for g, p in zip(self.G_f[:n].split(self.sizes), self.params)]
        with torch.no_grad():
            for view, p in zip(self._w_views, self.params):
                view.copy_(p.detach().reshape(-1))
                # each parameter keeps a version counter of its own: an in-place write to W between a forward and
                # its backward would go unseen by autograd's check. The step writes W only between passes
                # (perturb, restore, AdamW), never inside one
                p.data = view.view_as(p)
        self.attach_grads()

        # aliases: same storage as each parameter, gradient into G_h
        self._alias = {}
        for p, gh in zip(self.params, self._gh_views):
            a = p.detach().requires_grad_(True)
            a.grad = gh
            self._alias[id(p)] = a
        self.harmful_tokens = self.harmful_head_positions = 0
        self.merged_positions = None  # (body, LM head) positions of the merged batch being routed (route)
        # the LM head of a packed batch sees only its labelled positions (losses.kept_positions): routed by those
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if any(head is m for m in layers) else None
        for m in layers:
            m.forward = types.MethodType(_routed_forward, m)
            m._booster_alias = self._alias
            m._booster_route = self

    @property
    def numel(self) -> int:
        """LoRA elements in the buffers (which hold up to ALIGN - 1 more, always zero)."""
        return sum(self.sizes)

    def attach_grads(self):
        """Point every parameter's .grad at its view of G_f (again, if someone set them to None)."""
        for p, g in zip(self.params, self._gf_views):
            p.grad = g

    def views_intact(self) -> bool:
        """Whether the model still holds every LoRA parameter, each still its view of W: a cast (`model.half()`),
        a move or a `load_state_dict(assign=True)` after the engine was built gives the model parameters or
        storage of their own, which the step would neither read nor update. Host-side only."""
        return all(m._parameters.get(attr) is p and p.data_ptr() == v.data_ptr()
                   for (m, attr), p, v in zip(self._owners, self.params, self._w_views))

    def grads_attached(self) -> bool:
        return self.params[0].grad is self._gf_views[0]

    @contextlib.contextmanager
    def route(self, harmful_tokens: int, harmful_head_positions: int | None = None,
              merged: tuple[int, int] | None = None):
        """Inside: the first `harmful_tokens` positions of every batch get their LoRA gradient in G_h; in the LM
        head, when it has LoRA, the first `harmful_head_positions` (default: the same count; fewer for a
        packed batch, whose LM head runs on the labelled positions only). `merged`: the positions of a merged
        batch in the body and in the LM head; a LoRA layer that sees another count raises (it runs on a subset
        of the tokens, as a mixture-of-experts expert does, so its first positions are not the harmful ones)."""
        prev = self.harmful_tokens, self.harmful_head_positions, self.merged_positions
        self.harmful_tokens = harmful_tokens
        self.harmful_head_positions = harmful_tokens if harmful_head_positions is None else harmful_head_positions
        self.merged_positions = merged
        try:
            yield
        finally:
            self.harmful_tokens, self.harmful_head_positions, self.merged_positions = prev


class MixedPositions(ValueError):
    """A LoRA layer in a merged pass saw another number of positions than the merged batch has."""


class _RoutedLoRA(torch.autograd.Function):
    """``result + scaling * (x @ a^T) @ b^T`` over x [positions, in], with the weight gradients of the first
    `n` positions going to the aliases (ah, bh) and of the rest to the parameters (a, b).

    Two GEMMs forward, the second adding into the base layer's result in its epilogue (eager peft makes a delta
    tensor, scales it and adds it: three more passes over [positions, out]); backward two GEMMs for the input
    gradient through the rank-r bottleneck (dout·B, then ·A) and one per segment for each weight, on row slices
    (views, no copies).
    All in the dtype of x and result (bf16 under autocast: the fp32 masters are cast once per call)."""

    @staticmethod
    def forward(ctx, result, x, a, b, ah, bh, n: int, scaling: float):
        with torch.autocast(x.device.type, enabled=False):  # x and result come in the compute dtype
            a_c, b_c = a.to(x.dtype), b.to(x.dtype)
            xa = x @ a_c.t()
            ctx.save_for_backward(x, xa, a_c, b_c)
            ctx.n, ctx.scaling = n, scaling
            return torch.addmm(result, xa, b_c.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, dout):
        x, xa, a_c, b_c = ctx.saved_tensors
        n, s = ctx.n, ctx.scaling
        with torch.autocast(x.device.type, enabled=False):
            dout = dout.to(x.dtype)
            dxa = (dout @ b_c).mul_(s)                      # [positions, r]
            dx = dxa @ a_c if ctx.needs_input_grad[1] else None

            def weights(rows):                              # (dA, dB) of the positions `rows`
                return dxa[rows].t() @ x[rows], (dout[rows].t() @ xa[rows]).mul_(s)

            positions = x.shape[0]
            grads_f = weights(slice(n, None)) if n < positions else (None, None)
            grads_h = weights(slice(0, n)) if n > 0 else (None, None)
        return dout, dx, *grads_f, *grads_h, None, None


def _routed_forward(self, x, *args, **kwargs):
    """peft LoRA Linear forward with per-token gradient routing (one active adapter, no variants)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:  # (peft's flag: the adapter merged into the base weights)
        return result
    route = self._booster_route
    head = self is route.head
    n = route.harmful_head_positions if head else route.harmful_tokens
    positions = x.numel() // x.shape[-1]
    expected = None if route.merged_positions is None else route.merged_positions[1 if head else 0]
    if expected is not None and positions != expected:
        raise MixedPositions(f"a LoRA layer saw {positions} positions of a merged batch of {expected}: "
                             "it runs on a subset of the tokens (as a mixture-of-experts expert does), so the "
                             "merged pass cannot tell the harmful rows from the alignment rows")
    n = max(0, min(n, positions))
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        ah, bh = self._booster_alias[id(a)], self._booster_alias[id(b)]
        lora_in = self.lora_dropout[name](x)
        # the compute dtype: autocast's (bf16) when it is on, as peft's F.linear would get, else the weights' (fp32)
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else a.dtype
        flat_in, flat_out = lora_in.reshape(-1, x.shape[-1]).to(dtype), result.reshape(-1, result.shape[-1])
        out = _RoutedLoRA.apply(flat_out.to(dtype), flat_in, a, b, ah, bh, n, float(self.scaling[name]))
        result = out.view(result.shape).to(result.dtype)
    return result
