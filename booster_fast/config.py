"""BoosterConfig: every knob of a Booster update, with the paper's defaults.

One dataclass, TRL style: each field says what it does in its `help` metadata, and `__post_init__`
rejects values that cannot work with a one-line ValueError (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

IMPLS = ("reference", "fast")
GRAPH_MODES = ("auto", "on", "off")
# the number fields, each with its range: True > 0 (0 means nothing sensible: perturb_eps 0 would give 0/0 for a
# zero ∇h), False >= 0, None checked on its own (max_grad_norm, whose 0 disables clipping)
NUMBERS = {"lamb": False, "alpha": True, "lr": True, "weight_decay": False, "adam_eps": False, "max_grad_norm": None,
           "perturb_eps": True, "rho": True}
# read once, when an engine is built (the optimizer's hyperparameters live in its param_groups from then on); the
# others are read at every step (fast.STEP_KNOBS)
BUILD_FIELDS = ("impl", "graphs", "merge_passes", "packing", "fused_ops", "perturb_aware", "lr", "weight_decay",
                "betas", "adam_eps")
OPTIMIZER_FIELDS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "adam_eps": "eps"}


def is_integer(value) -> bool:
    """An int or a numpy integer, not a bool (True would count as 1): what a count or a seed must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (int, float, numpy), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class BoosterConfig:
    lamb: float = field(default=5.0, metadata={"help": "λ, weight of the harmful-perturbation regulariser (paper: 5)."})
    alpha: float = field(default=0.1, metadata={"help": "α, step size of the normalised harmful perturbation (paper: 0.1)."})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate, constant schedule (paper: 5e-4)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (paper: 0.1)."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (β1, β2)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW ε."})
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clip the combined gradient to this global L2 norm (HF Trainer default 1.0); 0 disables."},
    )
    perturb_eps: float = field(default=1e-7, metadata={"help": "Added to ‖∇h‖ before normalising (original: 1e-7)."})
    impl: str = field(
        default="fast",
        metadata={"help": "'reference' mirrors the original trainer op for op; 'fast' uses flat buffers, fused kernels "
                          "and the merged pass."},
    )
    merge_passes: bool | None = field(
        default=None,
        metadata={"help": "fast only: run the harmful and alignment batches at w as ONE forward/backward. None picks "
                          "the device's default: off for the CPU (measured), on for CUDA (by design, until the GPU "
                          "suite measures it)."},
    )
    packing: bool | None = field(
        default=None,
        metadata={"help": "fast only: feed the passes pad-free batches (the real tokens of all rows back to back, "
                          "per-sequence attention), so no pad position is computed. None: on (measured on the CPU; "
                          "on CUDA by design, until the GPU suite measures it); models it cannot run exactly "
                          "(attention of their own, softcapping, non-causal; checked when the engine is built) stay "
                          "padded, and so do batches with sequences longer than a sliding window."},
    )
    fused_ops: bool | None = field(
        default=None,
        metadata={"help": "fast only: run the model's RMSNorm, gated MLP activation and rotary embedding as fused "
                          "Triton kernels inside the step (Llama, Mistral, Qwen2/3, Gemma 1-3). None: on for CUDA, "
                          "off for the CPU (Triton needs a GPU there)."},
    )
    meta_term: bool = field(
        default=True,
        metadata={"help": "Keep the −λ·∇h(w̃) term (3 passes). False is an ablation, not in the original code: "
                          "∇f + λ·∇h."},
    )
    perturb_aware: bool = field(
        default=False,
        metadata={"help": "Booster + Vaccine (the original's perturb_aware): take the alignment gradient with every "
                          "attention output perturbed by ρ along its normalised gradient (one more pass)."},
    )
    rho: float = field(
        default=5.0,
        metadata={"help": "ρ, size of the attention-output perturbation when perturb_aware (the original's "
                          "Booster + Vaccine script: 5)."},
    )
    grad_accum: int = field(
        default=1,
        metadata={"help": "Micro-batches per update; exact: k micro-batches of b equal one batch of k·b."},
    )
    skip_nonfinite: bool = field(
        default=True,
        metadata={"help": "fast: skip the update (weights and optimizer state untouched) when the combined gradient "
                          "is not finite; decided on the device, counted in the step's `skipped` output."},
    )
    graphs: str = field(
        default="auto",
        metadata={"help": "CUDA graphs for the fast step: 'auto' (capture on CUDA, else eager), 'on', 'off'."},
    )

    def __post_init__(self):
        self.check()

    def check(self):
        """ValueError (one line, naming the field) for a value that cannot work. Numbers may come as numpy or 0-dim
        torch scalars (kept as floats from then on), never as bools or strings."""
        for name in NUMBERS:
            value = getattr(self, name)
            if getattr(value, "shape", None) == ():  # a numpy or 0-dim torch scalar
                value = value.item()
            if not is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(is_number(b) for b in self.betas)):
            raise ValueError(f"betas must be a pair of numbers (beta1, beta2), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {self.graphs!r}")
        if self.alpha == 0:
            raise ValueError("alpha must be > 0: at alpha 0 the perturbed point is w itself and the update is plain "
                             "fine-tuning (method sft)")
        for name, positive in NUMBERS.items():  # finite, in its range
            value = getattr(self, name)
            if positive is not None and not ((value > 0 if positive else value >= 0) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")
        for flag in ("meta_term", "perturb_aware", "skip_nonfinite"):
            if not isinstance(getattr(self, flag), bool):  # a string such as "False" would read as on
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for flag in ("merge_passes", "packing", "fused_ops"):
            if getattr(self, flag) is not None and not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True, False or None (the device's default), got "
                                 f"{getattr(self, flag)!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        # an integral type, not an integral value: a float 2.0 would reach torch's chunk() in the step
        if not is_integer(self.grad_accum) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {self.grad_accum!r}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")

    def snapshot(self) -> tuple:
        """Every field's value: an engine compares it between steps to see a changed config (`recheck`)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def recheck(self, built: tuple, seen: tuple) -> tuple:
        """The snapshot to compare the next step with. Where the config changed since `seen` (the last step's
        snapshot), its values are checked again (check()), and a changed field that the engine reads only when it
        is built (BUILD_FIELDS; `built`: the snapshot then) is refused, since the step would not follow it.
        Host-side Python values only."""
        if self.snapshot() == seen:
            return seen
        self.check()
        now = self.snapshot()
        for f, before, after in zip(fields(self), built, now):
            if f.name in BUILD_FIELDS and before != after:
                where = (f"set it in the optimizer's param_groups['{OPTIMIZER_FIELDS[f.name]}'], as a scheduler does"
                         if f.name in OPTIMIZER_FIELDS else "build a new Booster with it")
                raise ValueError(f"BoosterConfig.{f.name} changed from {before!r} to {after!r} after the engine was "
                                 f"built, which reads it only then: {where}")
        return now

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (used by the CLI)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
