"""LoRA on a loaded model: target names checked by peft's rule, the adapter added, its trainable weights.

`add_lora` wraps a model with a peft LoRA adapter (the paper's r 32, alpha 4 on q/k/v by default) and keeps only
the LoRA weights trainable, as fp32 masters whatever the base computes in; both engines train exactly those.
"""
from __future__ import annotations

import math

from torch import nn

from .compute import enable_gradient_checkpointing
from .config import is_integer, is_number
from .errors import reason
from .models import ModelError


def split_targets(targets) -> tuple[str, ...]:
    """LoRA target names from a sequence or one comma-separated string, stripped, empty ones dropped."""
    names = targets.split(",") if isinstance(targets, str) else targets
    return tuple(n.strip() for n in names if n.strip())


def check_lora_targets(model: nn.Module, targets) -> tuple[str, ...]:
    """`targets` (split_targets) as add_lora takes them, after checking that each names linear layers of `model`
    by peft's rule; ModelError, one line, naming the linear layers there are."""
    targets = split_targets(targets)
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items()
              if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Conv1D")]  # Conv1D: GPT-2's

    def matches(t: str, names) -> bool:  # peft's rule: the module's full name, or its last dotted components
        return any(n == t or n.endswith("." + t) for n in names)

    missing = [t for t in targets if t != "all-linear" and not matches(t, linear)]
    if missing or not targets:
        others = [t for t in missing if matches(t, modules)]
        kind = f"; {', '.join(others)} {'is' if len(others) == 1 else 'are'} not a linear layer" if others else ""
        raise ModelError(f"LoRA targets {missing or list(targets)} not found in the model{kind}; it has linear "
                         f"layers named {sorted({n.rsplit('.', 1)[-1] for n in linear})} (or all-linear)")
    if "all-linear" in targets and len(targets) > 1:
        raise ModelError(f"LoRA targets {list(targets)}: all-linear names every linear layer; give it alone")
    return targets


def add_lora(model: nn.Module, r: int = 32, alpha: float = 4, targets=("q_proj", "k_proj", "v_proj"),
             dropout: float = 0.0):
    """Wrap `model` with a peft LoRA adapter (paper defaults); only LoRA weights stay trainable, in fp32.
    `targets`: module names in peft's spellings, as a sequence or one comma-separated string ("all-linear")."""
    from peft import LoraConfig, get_peft_model

    targets = check_lora_targets(model, targets)
    if not is_integer(r) or r < 1:
        raise ModelError(f"add_lora: r (the LoRA rank) must be an integer >= 1, got {r!r}")
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"add_lora: alpha must be a finite number > 0 (the scale is alpha / r), got {alpha!r}")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ModelError(f"add_lora: dropout must be a number with 0 <= dropout < 1, got {dropout!r}")
    # plain Python numbers for peft (numpy ones would not serialise into adapter_config.json)
    r, dropout = int(r), float(dropout)
    alpha = int(alpha) if is_integer(alpha) else float(alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                     target_modules="all-linear" if targets == ("all-linear",) else list(targets))  # peft's form
    checkpointed = getattr(model, "_booster_checkpointing", False)
    try:
        model = get_peft_model(model, cfg)
    except (RuntimeError, MemoryError) as e:  # a rank whose LoRA weights do not fit (--lora-r 10**8 asked 77 GB)
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise ModelError(f"LoRA rank {r} (--lora-r): its weights do not fit in memory ({reason(e)})") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointed and dropout > 0:  # the recompute must now replay the dropout masks
        enable_gradient_checkpointing(model.get_base_model())
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def no_trainable_reason(model: nn.Module) -> str:
    """Why a model has nothing to train: no LoRA at all, or LoRA weights that were loaded frozen."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        return ("the model's LoRA weights are frozen (PeftModel.from_pretrained loads an adapter so unless "
                "is_trainable=True is passed)")
    return "the model has no trainable parameters; call add_lora first"
