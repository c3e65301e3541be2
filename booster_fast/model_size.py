"""How big a model's weights are, from its shape or config alone, and whether they fit the device.

`load_model` checks a model before it builds or loads anything: a preset's parameters are counted from its
shape, a pretrained model's from its config (the model built on the meta device), and their bytes (in bf16,
fp32 or NF4) are weighed against the device's free memory (CUDA's, or the host's available memory for the
CPU). `booster-fast memory` starts its estimate from the same counts.
"""
from __future__ import annotations

import torch
from torch import nn

from .models import PRESETS, ModelError, from_hub


def weight_bytes(linear: int, rest: int, quant: str = "none", dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a model's weights from its parameter counts: `linear` in the Linear layers that NF4 quantises (all
    but the LM head), `rest` elsewhere (norms, embeddings, the LM head), which stay in `dtype`. NF4 packs a weight
    into 4 bits plus, per block of 64, one 8-bit scale (double quantisation: 8-bit scales with an fp32 one per
    256 of them). LoRA and activations are not included."""
    size = torch.finfo(dtype).bits // 8
    if quant == "nf4":
        return int(linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + rest * size
    return (linear + rest) * size


def preset_weight_counts(name: str, **overrides) -> tuple[int, int]:
    """(parameters NF4 quantises, the others) of a shape preset."""
    c = {**PRESETS[name], **overrides}
    h, n_layers, vocab = c["hidden_size"], c["num_hidden_layers"], c.get("vocab_size", 32000)
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    linear = n_layers * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])
    return linear, n_layers * 2 * h + h + 2 * vocab * h  # norms, final norm, embeddings, LM head


def preset_weight_bytes(name: str, quant: str = "none", dtype: torch.dtype = torch.bfloat16, **overrides) -> int:
    """Bytes of a shape preset's weights once built (weight_bytes)."""
    return weight_bytes(*preset_weight_counts(name, **overrides), quant, dtype)


def pretrained_weight_counts(path: str, trust_remote_code: bool = False) -> tuple[int, int] | None:
    """(parameters NF4 quantises, the others) of a pretrained model, from its config alone (meta_model); None
    when that cannot be done (the load itself will then say why) or when the checkpoint is quantised already
    (its weights are smaller than the counts say)."""
    model = meta_model(path, trust_remote_code)
    return None if model is None else weight_counts(model)


def meta_model(path: str, trust_remote_code: bool = False, quiet: bool = True) -> nn.Module | None:
    """A preset, or a pretrained model built from its config alone, on the meta device (no memory, no weight
    read); None when the checkpoint is quantised already, or (quiet) when it cannot be built; not quiet, that
    error is raised."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path in PRESETS:  # the layers' names and shapes (the tiny model's vocabulary size aside)
        with init_empty_weights():
            return LlamaForCausalLM(LlamaConfig(**PRESETS[path]))
    try:
        config = from_hub(AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None):
            return None
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - quiet: a check ahead of the load, which reports its own errors
        if quiet:
            return None
        raise


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters in the Linear layers NF4 quantises: all but the LM head, the others) of a built model."""
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return linear, sum(p.numel() for p in model.parameters()) - linear


def cuda_free_bytes(device) -> int:
    """What this process can still allocate on `device`: the driver's free memory plus the blocks torch's
    caching allocator holds unused (freed tensors stay cached, and mem_get_info counts them as taken)."""
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def host_available_bytes() -> int | None:
    """The memory a new allocation can still take on the host, as the kernel estimates it (MemAvailable in
    /proc/meminfo: free memory plus the caches it can drop), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # (in kB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(device: torch.device) -> int | None:
    """What the weights may take on `device` (for check_fits): CUDA's free memory, the host's available memory
    for the CPU; None where it cannot be told."""
    if device.type == "cuda":
        return cuda_free_bytes(device)
    return host_available_bytes() if device.type == "cpu" else None


def check_fits(name: str, quant: str, dtype: torch.dtype, free_bytes: int, device="cuda", counts=None,
               **overrides):
    """ModelError when a model's weights alone exceed the device's free memory (naming the 4-bit way out): a
    preset's, or any model's given its parameter `counts` (pretrained_weight_counts)."""
    counts = counts or preset_weight_counts(name, **overrides)
    need = weight_bytes(*counts, quant, dtype)
    if need <= free_bytes:
        return
    def gib(n: int) -> str:
        return f"{n / 2**30:.{0 if n >= 10 * 2**30 else 1}f}"

    hint = f"; with --quant nf4 they take ~{gib(weight_bytes(*counts, 'nf4', dtype))} GiB" if quant == "none" else ""
    kind = "NF4" if quant == "nf4" else str(dtype).removeprefix("torch.")
    raise ModelError(f"{name} needs ~{gib(need)} GiB for its {kind} weights alone and {device} has "
                     f"{gib(free_bytes)} GiB free{hint}")
