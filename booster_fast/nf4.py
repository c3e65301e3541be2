"""bitsandbytes NF4 base weights: quantising a model's decoder layers (or one layer as a preset is built), keeping
4-bit layers trainable on the CPU, the tensors beside a 4-bit weight, and telling whether a model has any.

NF4 with double quantisation and a bf16 compute dtype, as the paper's QLoRA setting has it (bitsandbytes' float32
compute default is silently slow); embeddings and the LM head stay unquantised, as bitsandbytes' own loader does.
bitsandbytes is imported where it is used: the bf16/fp32 paths need none.
"""
from __future__ import annotations

import torch
from torch import nn


def quantize_nf4_(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the decoder layers by a bitsandbytes NF4 Linear4bit, in place.

    Double quantisation, bf16 compute dtype; the LM head and embeddings stay as they are.
    """
    for layer in model.get_decoder().layers:
        quantize_linears_(layer)
    model.is_loaded_in_4bit = True
    return model


def quantize_linears_(layer: nn.Module) -> nn.Module:
    """Every nn.Linear inside `layer` becomes an NF4 Linear4bit (double quantisation, bf16 compute), in place."""
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            # Params4bit quantises when moved to a device, on that device (no trip through host memory)
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q.to(child.weight.device))
    return layer


def keep_nf4_trainable_(model: nn.Module) -> int:
    """Keep a 4-bit model's CPU weights in the layout that has a backward; returns how many layers it restored.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks an NF4 weight for its inference kernel at the first
    forward in eval mode without grad (a model fresh from from_pretrained is in eval mode, and a held-out loss
    runs that way), and a repacked weight's matmul has no autograd kernel: every gradient through it is then
    silently zero. A model that trains turns that repack off on each 4-bit layer and undoes one already done
    (the packed weights come back exactly, the doubly quantised statistics within their 8-bit rounding). A no-op
    without bitsandbytes."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:  # no bitsandbytes, or one without the CPU repack (then nothing to undo either)
        return 0
    restored = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        m.support_avx512bf16_for_cpu = False  # the repack's switch (Linear4bit.forward reads it)
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = unpack(m.weight.data, state)
            if getattr(m, "quant_state", None) is not None:  # the module's back link to its weight's state
                m.quant_state = m.weight.quant_state
            restored += 1
    return restored


def quant_state_tensors(p) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside an NF4 weight (its statistics, doubly quantised); [] for others."""
    out, qs = [], getattr(p, "quant_state", None)
    while qs is not None:
        out += [v for v in vars(qs).values() if torch.is_tensor(v)]
        qs = getattr(qs, "state2", None)
    return out


def is_quantized(model: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layer either (the bf16/fp32 paths need none)
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
