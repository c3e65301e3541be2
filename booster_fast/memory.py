"""Device memory of one Booster step, estimated from the model's shape before any of it is allocated.

A step's peak is four parts, and a fifth with CUDA graphs and packed batches:
- the weights (exact, from the parameter counts: model_size.weight_bytes);
- the training state: the LoRA weights in fp32, AdamW's two moments and each engine's own copies, 12-24 bytes
  per LoRA parameter (STATE_BYTES);
- the activations the largest pass saves for its backward. The fast engine's merged pass holds them for BOTH
  batches at once; the reference runs one batch per pass;
- what lives only within that pass: the LM head's logits and the cross entropy's fp32 copies (about 12 bytes
  per vocabulary entry and position), or, where more, a layer's MLP backward (the gradients of act(gate)·up,
  gate and up: 3 bytes·i per token in bf16), with gradient checkpointing on top of that layer's recompute;
- with CUDA graphs and packing (graphs.py): packed batches come in a few bucketed lengths, and a length met
  after the first capture warms up eagerly while the captured graphs' private pool, which holds a step's
  activations and transient memory, stays reserved: a second working set, once per new length. With
  graphs.POOL_WARMUP the warm-up's forward allocates in that pool, and only its backward (autograd's thread,
  which torch does not route) beside it: about one more transient part. Padded batches have one shape, graphs
  off none of it.

Per token and decoder layer of a Llama-style model (a = 2 bytes in bf16 or NF4, 4 in fp32; h the hidden size,
q = heads·head_dim, kv = kv_heads·head_dim, i the MLP width), the backward keeps:
- each RMSNorm's input: 4h for transformers' norm (an fp32 copy), a·h for the fused kernel;
- the attention block's normalised input, a·h, when a LoRA adapter reads it (q/k/v targeted), and LoRA's rank-r
  intermediate, a·r, per adapter (with LoRA dropout, or peft's own forward under bf16 autocast as the
  reference runs it, each adapter keeps its own copy of its input instead, plus a dropout's mask);
- attention's q, k, v and output, a·(2q + 2kv), and its log-sum-exp, 4 bytes per head;
- the MLP's gate and up projections, a·2i (transformers' eager SwiGLU also keeps silu(gate): a·3i);
- nothing for a frozen linear layer (its backward needs only the weight) and nothing for the residual adds.
A 7B layer in bf16 with the fused kernels keeps ~100 KB per token: the merged pass at 20 rows x 256 tokens keeps
~16 GB of activations, against ~1.3 GB with checkpointing (each layer's input only, a·h).

The estimate counts every position of every row (max_length per row): packed batches carry fewer, so it is an
upper bound there, and a LoRA target named by its full path (one layer's module) is counted in every layer.
tests/test_memory.py checks it against the bytes a CPU step allocates; the bench reports it beside the measured
peak. The GPU adds what the counts leave out (not yet measured against them):
- the allocator's rounding and cached blocks, cuBLAS workspaces, for NF4 one dequantised weight per backward;
- fp32 with grouped-query heads on CUDA: no fused attention kernel takes it, and the math kernel also keeps
  the [rows, heads, length, length] probabilities (fp32 is for exact comparisons; bf16 and NF4 are unaffected).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from .errors import reason

log = logging.getLogger("booster_fast")

# LoRA target names (peft's spellings of a Llama layer's linears) -> (input, output) width: "h", "q", "kv" or "i"
LINEARS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
           "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}
# training state per LoRA parameter at the step's peak (the start of the largest pass's backward), in fp32:
# fast: W, the backup B, G_h, G_f, AdamW's m and v, allocated once; reference: the weight, m, v and the cloned
# ∇h(w) and ∇h(w̃) (its fresh gradient is allocated as the backward frees activations); SFT: the weight, m, v
STATE_BYTES = {("fast", "booster"): 24, ("fast", "sft"): 24, ("reference", "booster"): 20, ("reference", "sft"): 12}
# at the start of the head's backward, per logit: the log-softmax the cross entropy keeps (fp32), its gradient
# and the logits' gradient (fp32), whatever the logits' own dtype (measured: 11.7-11.8 bytes in bf16 and fp32)
HEAD_BYTES_PER_LOGIT = 12


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: a Llama-style config's sizes."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    softcap: bool = False  # Gemma 2's final logit softcapping: one more copy of the logits (or of a chunk's)

    @classmethod
    def of(cls, config) -> "Shape | None":
        """The sizes of a transformers config (or a dict of its fields); None when it is not Llama-shaped. A
        composite config (Gemma 3's, with a vision tower) gives its text model's."""
        if isinstance(config, dict):
            config = config.get("text_config") or config
        else:
            config = getattr(config, "get_text_config", lambda: config)()
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        try:
            h, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            return cls(hidden=h, intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
                       heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                       head_dim=int(get("head_dim") or h // heads), vocab=int(get("vocab_size")),
                       softcap=bool(get("final_logit_softcapping")))
        except (TypeError, ValueError, ArithmeticError):  # a field missing, not a number, or zero heads
            return None

    def width(self, name: str) -> int:
        return {"h": self.hidden, "q": self.heads * self.head_dim, "kv": self.kv_heads * self.head_dim,
                "i": self.intermediate}[name]


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one step's peak, by part (the module docstring says what each holds)."""
    weights: int
    state: int
    activations: int
    transient: int
    warmup: int = 0  # CUDA graphs + packing: a new length's eager warm-up beside the graphs' reserved pool

    PARTS = ("weights", "state", "activations", "transient", "warmup", "total")

    @property
    def total(self) -> int:
        return self.weights + self.state + self.activations + self.transient + self.warmup

    def parts(self) -> tuple[int, ...]:
        return self.weights, self.state, self.activations, self.transient, self.warmup, self.total

    def describe(self) -> str:
        warmup = f", a new length's warm-up beside the CUDA graphs {size(self.warmup)}" if self.warmup else ""
        return (f"~{size(self.total)} (weights {size(self.weights)}, LoRA + AdamW {size(self.state)}, activations "
                f"{size(self.activations)}, logits and backward {size(self.transient)}{warmup})")


def size(n: int) -> str:
    """Bytes as GiB (MiB under one GiB), one decimal."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def lora_targets(targets) -> tuple[str, ...] | None:
    """The LoRA targets as LINEARS names ("all-linear" is all of them), or None if one is not a Llama linear."""
    from .lora import split_targets

    names = split_targets(targets)
    if names == ("all-linear",):
        return tuple(LINEARS)
    names = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))  # peft's may be full names, per layer
    return names if all(n in LINEARS for n in names) else None


def lora_parameters(shape: Shape, targets: tuple[str, ...], r: int) -> int:
    """LoRA's parameter count: r·(in + out) per adapted linear, in every layer."""
    return shape.layers * sum(r * (shape.width(i) + shape.width(o)) for i, o in (LINEARS[t] for t in targets))


def layer_bytes_per_token(shape: Shape, a: int, targets: tuple[str, ...], r: int, fused: bool,
                          lora_dropout: float = 0.0, grouped_kv: bool = True, input_copies: bool = False,
                          res: int | None = None) -> int:
    """Bytes one decoder layer saves for its backward per token (module docstring). `a`: the activations'
    element size; `res`: the residual stream's (default `a`; 4 where NF4 linears sit beside fp32 embeddings and
    norms: the norms and the quantised linears' outputs are then fp32, attention and LoRA bf16 under autocast);
    `grouped_kv`: attention keeps k/v at kv_heads (False: repeated to every head first, as
    transformers does for a masked batch); `input_copies`: each adapter keeps its own copy of its input (peft's
    forward casts the input to the fp32 LoRA weights and autocast back, as the reference runs it in bf16; the
    fast engine's routed LoRA reads the shared input)."""
    h, q, i = shape.hidden, shape.width("q"), shape.intermediate
    kv = shape.width("kv") if grouped_kv else q
    res = a if res is None else res
    norm = (res if fused else 4) * h + 4  # input (fp32 copy unfused) and the fp32 rstd
    total = 2 * norm
    if input_copies or lora_dropout > 0:  # per adapter: its input (copied or dropped); a dropout's 1-byte mask
        total += sum((a + (lora_dropout > 0)) * shape.width(LINEARS[t][0]) for t in targets)
    else:  # the inputs the adapters read, once each: the normalised ones (attention, MLP) and down's act(gate)·up
        total += a * h * (any(t in ("q_proj", "k_proj", "v_proj") for t in targets)
                          + any(t in ("gate_proj", "up_proj") for t in targets))
        total += a * i * ("down_proj" in targets)  # (o_proj's input is attention's output, kept anyway)
    total += a * r * len(targets)  # LoRA's x·A, kept for B's gradient
    total += a * (2 * q + 2 * kv) + 4 * shape.heads  # q, k, v, output; log-sum-exp in fp32
    total += res * (2 if fused else 3) * i  # gate and up (and eager silu(gate))
    return total


def layer_bytes_fixed(shape: Shape, a: int, targets: tuple[str, ...], r: int) -> int:
    """Bytes one layer saves whatever the batch: under bf16 autocast, each adapter's weights cast from fp32."""
    return 0 if a == 4 else lora_parameters(shape, targets, r) // shape.layers * a


def pass_bytes(shape: Shape, tokens: int, positions: int, a: int, targets: tuple[str, ...], r: int,
               fused: bool, checkpointing: bool, lora_dropout: float = 0.0, grouped_kv: bool = True,
               input_copies: bool = False, recorded_tokens: int = 0, res: int | None = None,
               chunked_head: bool = False, fused_head: bool | None = None) -> tuple[int, int]:
    """(saved, transient) bytes of one forward/backward over `tokens` tokens whose LM head sees `positions`
    positions. `recorded_tokens`: alignment tokens whose attention-output gradients perturb_aware keeps; `res`:
    the residual stream's element size (layer_bytes_per_token); `chunked_head`: the LM head and cross entropy
    in chunks (head_loss.py: a chunk's logits at a time, each position's fp32 input gradient kept), their cross
    entropy as one kernel where `fused_head` (default: `fused`)."""
    from .head_loss import chunk_bytes_per_logit, chunk_positions

    res = a if res is None else res
    per_layer = layer_bytes_per_token(shape, a, targets, r, fused, lora_dropout, grouped_kv, input_copies,
                                      res) * tokens
    fixed = layer_bytes_fixed(shape, a, targets, r) * shape.layers
    head_in = ((res if fused else 4) * shape.hidden + 4) * tokens  # the final norm's input
    if chunked_head:
        fused_head = fused if fused_head is None else fused_head
        logits = chunk_bytes_per_logit(a, shape.softcap, fused_head) * shape.vocab * min(positions,
                                                                                       chunk_positions(shape.vocab))
        head_in += 4 * shape.hidden * positions
    else:
        # a softcapping model's own code keeps the tanh of its logits for the backward too
        logits = (HEAD_BYTES_PER_LOGIT + (a if shape.softcap else 0)) * shape.vocab * positions
    recorded = a * shape.hidden * shape.layers * recorded_tokens
    working = 3 * res * shape.intermediate * tokens  # a layer's MLP backward: gradients of act(gate)·up, gate, up
    if checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        saved = res * shape.hidden * shape.layers * tokens + head_in + recorded
        return saved, max(logits, per_layer + fixed // shape.layers + working)
    return per_layer * shape.layers + fixed + head_in + recorded, max(logits, working)


def estimate(shape: Shape, *, weights: int, rows: int, harmful_rows: int, max_length: int,
             compute_bytes: int = 2, residual_bytes: int | None = None, targets=("q_proj", "k_proj", "v_proj"),
             r: int = 32,
             lora_dropout: float = 0.0, impl: str = "fast", method: str = "booster", merged: bool = True,
             fused: bool = True, checkpointing: bool = False, perturb_aware: bool = False,
             grouped_kv: bool | None = None, quant: str = "none", micro_batches: int = 1,
             cuda: bool = True, graph_warmup: bool = False, chunked_head: bool = True,
             fused_head: bool | None = None) -> StepMemory | None:
    """The peak of one step (StepMemory), or None when the targets are not all Llama linears.

    rows / harmful_rows: alignment / harmful rows per micro-batch, `micro_batches` of them per update (Vaccine
    keeps the attention-output gradients of all of them); compute_bytes: 2 for a bf16 or NF4 base, 4 for fp32;
    residual_bytes: the residual stream's (default compute_bytes; 4 for NF4 beside fp32 unquantised weights);
    merged: the fast engine runs both batches as one pass; grouped_kv (default: for the fast engine, which gives
    the attention no mask) see layer_bytes_per_token; quant "nf4" and cuda: peft's 4-bit LoRA layer casts no
    input under CUDA's autocast (it does under the CPU's); graph_warmup: CUDA graphs over packed batches (the
    fast engine), whose new lengths warm up beside the captured graphs' pool; chunked_head: the fast engine runs
    the LM head in chunks (head_loss.py; False where its probe found the model's head to be another), with the
    fused cross entropy where `fused_head` (default: `fused`; False where the engine's probe refused the kernel)."""
    names = lora_targets(targets)
    if names is None:
        return None
    a = compute_bytes
    fused = fused and impl == "fast"
    grouped_kv = impl == "fast" if grouped_kv is None else grouped_kv
    res = a if residual_bytes is None else residual_bytes
    # each adapter keeps its own input copy where the input is cast for it: peft's reference layer in bf16 (but
    # not its 4-bit layer under CUDA's autocast), and every adapter when the residual stream is wider than the
    # adapters' dtype (autocast casts an activation anew for each use)
    copies = res > a or (impl == "reference" and a == 2 and not (quant == "nf4" and cuda))
    one = dict(a=a, res=res, targets=names, r=r, fused=fused, checkpointing=checkpointing,
               lora_dropout=lora_dropout, grouped_kv=grouped_kv, input_copies=copies,
               chunked_head=chunked_head and impl == "fast", fused_head=fused_head)
    record = max_length * rows * micro_batches if perturb_aware and method == "booster" else 0
    if method == "sft":
        batches = [rows]
    elif impl == "fast" and merged:
        batches = [rows + harmful_rows, harmful_rows]
    else:
        batches = [rows, harmful_rows]
    passes = [pass_bytes(shape, n * max_length, n * (max_length - 1), recorded_tokens=record, **one)
              for n in batches]  # the last position of a row predicts nothing
    saved, transient = max(passes, key=sum)
    state = STATE_BYTES[impl, method] * lora_parameters(shape, names, r)
    warmup = 0
    if graph_warmup and impl == "fast":
        from . import graphs

        warmup = transient if graphs.POOL_WARMUP else saved + transient
    return StepMemory(weights=weights, state=state, activations=saved, transient=transient, warmup=warmup)


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (views and shared buffers)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def frozen_bytes(model) -> int:
    """Bytes of a loaded model's frozen tensors: parameters that do not train, buffers, bitsandbytes'
    statistics (storages counted once)."""
    from .nf4 import quant_state_tensors

    ts = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return storage_bytes(ts + [t for p in model.parameters() for t in quant_state_tensors(p)])


def of_booster(booster, batch_size: int, harmful_batch_size: int, max_length: int, method: str = "booster",
               **overrides) -> StepMemory | None:
    """The estimate for a built Booster, given the rows of an update (its micro-batches are the engine's
    grad_accum-th part): its model's shape, LoRA settings and compute dtype, and its engine's choices (merged
    pass, fused ops, packing, CUDA graphs). None for a model that is not Llama-shaped or has no LoRA adapter of
    plain target names. `overrides`: estimate's keywords to change (checkpointing=True: what checkpointing would
    take)."""
    from .attention import packed_kv_grouped
    from .compute import compute_dtype
    from .nf4 import is_quantized

    model, engine, cfg = booster.model, booster.engine, booster.cfg
    shape, lora = Shape.of(model.config), next(iter(getattr(model, "peft_config", {}).values()), None)
    targets, r = getattr(lora, "target_modules", None), getattr(lora, "r", None)
    if shape is None or r is None or not (targets == "all-linear" or isinstance(targets, (set, list, tuple))):
        return None  # (a regex string of targets, another kind of adapter)
    targets = "all-linear" if targets == "all-linear" else sorted(targets)
    pack, micro = getattr(engine, "pack", False), cfg.grad_accum
    settings = dict(rows=batch_size // micro, harmful_rows=harmful_batch_size // micro, max_length=max_length,
                    compute_bytes=torch.finfo(compute_dtype(model)).bits // 8,
                    residual_bytes=model.get_input_embeddings().weight.element_size(), targets=targets, r=r,
                    lora_dropout=lora.lora_dropout, impl=cfg.impl, method=method,
                    merged=getattr(engine, "merge", False), fused=getattr(engine, "fused", False),
                    checkpointing=any(getattr(m, "gradient_checkpointing", False) for m in model.modules()),
                    perturb_aware=cfg.perturb_aware, micro_batches=micro,
                    quant="nf4" if is_quantized(model) else "none", cuda=engine.device.type == "cuda",
                    grouped_kv=cfg.impl == "fast" and (not pack or packed_kv_grouped(engine.device)),
                    graph_warmup=pack and getattr(engine, "graphs", None) is not None,
                    chunked_head=getattr(engine, "chunked_head", False),
                    fused_head=getattr(engine, "fused_head", False))
    return estimate(shape, weights=frozen_bytes(model), **{**settings, **overrides})


def log_fit(booster, batch_size: int, harmful_batch_size: int, max_length: int, method: str, device
            ) -> StepMemory | None:
    """Before a run's first step on CUDA: one line with the step's estimated peak against what the device can
    hold (what this process has allocated plus what is free), and a warning naming a way to need less when
    the estimate exceeds it (a warning: it is an estimate, the run goes on; so is a model it cannot estimate)."""
    from .model_size import cuda_free_bytes
    from .nf4 import is_quantized

    sizes = (batch_size, harmful_batch_size, max_length, method)
    try:
        est = of_booster(booster, *sizes)
    except Exception as e:  # noqa: BLE001 - advice only: it must not end the run
        log.info("memory: no estimate for this model (%s)", e)
        return None
    if est is None:
        log.info("memory: no estimate for this model (not Llama-shaped, or LoRA targets other than its linears)")
        return None
    device = torch.device(device)
    holds = torch.cuda.memory_allocated(device) + cuda_free_bytes(device)
    log.info("memory: a step is estimated at %s; %s can hold %s", est.describe(), device, size(holds))
    if est.total > holds:
        checkpointed = of_booster(booster, *sizes, checkpointing=True)
        nf4 = "" if is_quantized(booster.model) else " (or --quant nf4)"
        ways = []
        if checkpointed.total < est.total and checkpointed.total <= holds:
            ways.append(f"--gradient-checkpointing brings it to ~{size(checkpointed.total)}")
        if est.warmup and est.total - est.warmup <= holds:
            ways.append(f"the eager warm-up of each new packed length beside the CUDA graphs takes "
                        f"{size(est.warmup)}: --packing off (one shape) or --graphs off avoids it")
        way = "; or ".join(ways) or f"a smaller --batch-size or --max-length{nf4} needs less"
        log.warning("memory: the estimate exceeds what %s can hold, expect it to run out of memory: %s", device, way)
    return est


def for_args(args) -> str:
    """`booster-fast memory`: the estimate for align's flags, beside what gradient checkpointing and NF4 weights
    would change, as a table (one line per setting, the given one marked), or with --json as one JSON document
    (bytes)."""
    from .attention import packed_kv_grouped
    from .fast import default_fused_ops, default_merge
    from .model_size import cuda_free_bytes, weight_bytes
    from .models import DTYPES

    shape, counts, dtype = _model_of(args)
    device = _device_of(args)
    cuda, impl = device.type == "cuda", args.impl
    auto = {"merge_passes": default_merge(device), "fused_ops": default_fused_ops(device)}
    merged, fused = ({"on": True, "off": False}.get(getattr(args, k), d) for k, d in auto.items())
    pack = args.packing != "off"
    rows, harmful_rows = args.batch_size // args.grad_accum, args.harmful_batch_size // args.grad_accum  # (checked)
    common = dict(rows=rows, harmful_rows=harmful_rows, max_length=args.max_length, targets=args.targets,
                  r=args.lora_r, impl=impl, method=args.method, merged=merged, fused=fused,
                  perturb_aware=args.perturb_aware and args.method == "booster", micro_batches=args.grad_accum,
                  cuda=cuda, grouped_kv=impl == "fast" and (not pack or packed_kv_grouped(device)),
                  graph_warmup=cuda and pack and args.graphs != "off")  # (estimate: the fast engine only)
    lines = []
    for quant in (args.quant,) if args.quant == "nf4" else ("none", "nf4"):
        a = 2 if quant == "nf4" or dtype == torch.bfloat16 else 4
        res = 2 if dtype == torch.bfloat16 else 4  # NF4 keeps the embeddings and norms in the given dtype
        kind = "NF4" if quant == "nf4" else next(k for k, v in DTYPES.items() if v == dtype)
        for ckpt in (False, True):
            est = estimate(shape, weights=weight_bytes(*counts, quant, dtype), compute_bytes=a, residual_bytes=res,
                           checkpointing=ckpt, quant=quant, **common)
            given = quant == args.quant and ckpt == args.gradient_checkpointing
            lines.append(("*" if given else " ", kind + (", --gradient-checkpointing" if ckpt else ""), est))
    what = "SFT step" if args.method == "sft" else "Booster step" + (" + Vaccine" if common["perturb_aware"] else "")
    traits = [k for k, v in (("merged pass", merged and args.method != "sft"), ("fused ops", fused)) if v]
    engine = f"{impl} engine" + (f" ({', '.join(traits)})" if impl == "fast" and traits else "")
    batch = f"{rows} rows" if args.method == "sft" else f"{rows} + {harmful_rows} rows"
    title = (f"{args.model} on {device}: one {what}, {engine}, {batch} x {args.max_length} tokens"
             f"{' per micro-batch' if args.grad_accum > 1 else ''}, LoRA r={args.lora_r} on {args.targets}")
    free = (cuda_free_bytes(device) if cuda and torch.cuda.is_available()
            and (device.index or 0) < torch.cuda.device_count() else None)
    if getattr(args, "json", False):
        return json.dumps({"model": args.model, "step": title.split(": ", 1)[1], "device": str(device),
                           "free_bytes": free,
                           "settings": [{"setting": label, "given": mark == "*",
                                         **dict(zip(StepMemory.PARTS, est.parts()))} for mark, label, est in lines]})
    columns = dict(zip(StepMemory.PARTS, ("weights", "LoRA+AdamW", "activations", "logits+bwd", "warm-up", "peak")))
    warmup = any(est.warmup for _, _, est in lines)
    if not warmup:
        del columns["warmup"]
    widths = [max(11, len(c) + 2) for c in columns.values()]
    out = [title, f"  {'':34}" + "".join(f"{c:>{w}}" for c, w in zip(columns.values(), widths))]
    out += [f"{mark} {label:34}" + "".join(f"{size(getattr(est, k)):>{w}}" for k, w in zip(columns, widths))
            for mark, label, est in lines]
    out.append("*: the settings given. An estimate from the model's shape, every row counted at --max-length (packed "
               "batches hold fewer tokens); the allocator's rounding and CUDA's workspaces come on top.")
    if warmup:
        out.append("warm-up: with CUDA graphs over packed batches, each new bucketed length warms up eagerly beside "
                   "the captured graphs' reserved pool (--packing off or --graphs off: none).")
    if free is not None:
        out.append(f"{device} has {size(free)} free.")
    return "\n".join(out)


def _model_of(args) -> tuple[Shape, tuple[int, int], torch.dtype]:
    """(shape, weight counts, dtype of the unquantised weights) of --model: a preset's from its fields, a
    pretrained model's built on the meta device from its config (which also checks --targets against its linear
    layers). ModelError, one line, for what has no estimate."""
    from .lora import check_lora_targets
    from .model_size import meta_model, preset_weight_counts, weight_counts
    from .models import DTYPES, PRESETS, ModelError, checked_path

    name, dtype = args.model, DTYPES[args.dtype] if args.dtype else None
    if name in PRESETS:
        dtype = dtype or (torch.float32 if name == "tiny" else torch.bfloat16)
        config = dict(PRESETS[name])
        if name == "tiny":
            from .tokenizer import build_tiny_tokenizer

            config["vocab_size"] = len(build_tiny_tokenizer())
        counts = preset_weight_counts(name, vocab_size=config.get("vocab_size", 32000))
    else:
        dtype = dtype or torch.bfloat16
        path = checked_path(name)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"cannot estimate the model in {name}: it has no config.json")
        try:
            model = meta_model(path, args.trust_remote_code, quiet=False)
        except Exception as e:  # noqa: BLE001 - not found, offline, not a causal LM, a broken config: one line
            raise ModelError(f"{name}: cannot build it from its config: "
                             f"{reason(e)}") from e
        if model is None:
            raise ModelError(f"{name}: a checkpoint quantised already; estimate its unquantised original")
        config, counts = model.config, weight_counts(model)
        check_lora_targets(model, args.targets)  # add_lora's own check, on the meta model
    shape = Shape.of(config)
    if shape is None:
        raise ModelError(f"{name}: no estimate for this architecture: its config lacks a Llama-style hidden_size, "
                         f"intermediate_size, num_hidden_layers, num_attention_heads or vocab_size")
    if lora_targets(args.targets) is None:
        raise ModelError(f"no estimate for LoRA targets {args.targets!r}: it knows a Llama layer's "
                         f"{', '.join(LINEARS)} (or all-linear)")
    return shape, counts, dtype


def _device_of(args) -> torch.device:
    """--device for the estimate: cuda unless told otherwise (no GPU needed to estimate for one)."""
    from .models import ModelError

    try:
        device = torch.device(args.device or "cuda")
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise ModelError(f"--device {args.device}: give cpu, cuda or cuda:N")
    return device
