"""The fast Booster step: flat buffers, fused kernels, the merged pass, no host syncs.

Same update as `reference.ReferenceBooster` (the original trainer's), computed with far less work:

    pass 1   one forward/backward of [harmful ; alignment] at w   ->  G_h = ∇h(w), G_f = ∇f(w)
             (merged by default on CUDA; on the CPU, or merge_passes=False, one pass per batch)
    kernels  ss = ‖G_h‖²;  B = W;  W -= α G_h/(√ss+ε);  G_f += λ G_h;  G_h = 0
    pass 2   forward/backward of the harmful batch at w̃          ->  G_h = ∇h(w̃)
    kernels  W = B (bit-exact);  G_f -= λ G_h
    update   clip G_f to max_grad_norm (a device-side scale), one fused AdamW over the flat W

Every bookkeeping op is one op on one flat tensor, so their number does not grow with the number of LoRA
tensors. Losses are normalised by device-side token counts that span all micro-batches and all processes, so
gradient accumulation and several processes give exactly the update of one big batch. Under
torch.distributed each flat gradient buffer is all-reduced (summed; the losses were already divided by the
global token count) once per pass, before the norm.

Booster + Vaccine (`perturb_aware`, perturb_aware.py) records the alignment rows' attention-output gradients in
pass 1, drops G_f, and runs the alignment batch once more with those outputs perturbed (into G_f) before the
perturbation of W: three passes where the original runs four.

The passes take padded batches (without their masks) or packed ones (packing.py: no pad positions, the LM head
on the labelled positions only), whichever `Booster.to_device` hands over; the step is the same code for both.
The LM head and the cross entropy run in chunks (head_loss.py: the logits of a whole pass never exist) unless the
probe run at build time finds the model's head to be another function.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from . import fused_ops
from .attention import probe_attention, probe_flash, sliding_window
from .batches import can_concat, concat, micro_batches, tokens
from .config import BoosterConfig
from .flat import ALL_TOKENS, FlatLoRA, MixedPositions
from .kernels import normalize_perturb_, restore_combine_, sumsq, triton_unusable
from .kernels.model_kernels import available
from .head_loss import head_losses, probe_head
from .losses import attention_for, label_count, logits_of, targets_of, token_losses
from .compute import Autocast, checkpoint_reads_rng
from .lora import trainable_parameters
from .models import check_rope_length, length_dependent_rope
from .nf4 import keep_nf4_trainable_
from .reference import exempt_from_decay

log = logging.getLogger("booster_fast")
# the BoosterConfig fields the step reads at every call; the others are read once, when the engine is built
# (merge_passes is read in a step too, but only to word the error when a merged pass cannot tell its batches apart)
STEP_KNOBS = ("lamb", "alpha", "perturb_eps", "meta_term", "grad_accum", "max_grad_norm", "skip_nonfinite", "rho")
_pass_marker = None  # set by ops-counting tools to tell model passes from bookkeeping


@contextlib.contextmanager
def model_pass():
    """Marks a forward/backward region (a no-op unless an op counter is listening)."""
    if _pass_marker is None:
        yield
    else:
        with _pass_marker():
            yield


def default_merge(device: torch.device) -> bool:
    """Default per device. CPU, measured (benchmarks/results/cpu_tiny.json): a 2B-row pass costs as much as two
    B-row passes (merged and unmerged both 1.11x the reference there; level with each other over runs), while it
    holds both batches' activations at once (peak 73 MB against 44): off. CUDA: merging halves pass 1's launches and
    weight reads (dequantisation under NF4); on by design until the GPU suite measures it."""
    return torch.device(device).type == "cuda"


def default_fused_ops(device: torch.device) -> bool:
    """Default per device: on for CUDA, where Triton compiles the kernels (unless it cannot launch there:
    kernels.triton_unusable); off for the CPU (only Triton's interpreter runs them there, far slower than torch).
    On by design until the GPU suite has measured it."""
    return torch.device(device).type == "cuda"


def default_packing(device: torch.device) -> bool:
    """Default per device: on for both (to_device packs only the batches it shrinks). Packing removes the pad
    positions from every matmul. CPU, measured (benchmarks/results/cpu_tiny_len256.json: the built-in data at
    max_length 256, the reference padded to each batch's longest row as the original is): 1.19x the reference,
    against 1.15x for the same engine padded in the same run. CUDA: the attention runs flash's variable-length
    kernel, which computes nothing twice; on by design until the GPU suite has measured it."""
    return True


def _check_all_decay(exempt: list[str], weight_decay: float) -> None:
    """The flat buffer is one AdamW parameter, so the fast engine decays every LoRA weight; the HF Trainer (the
    original's optimizer, and the reference's) exempts names that look like a bias or a norm (`exempt`), which a
    plain LoRA weight has only by its adapter's or module's name (an adapter named "bias_free"). Checked when the
    engine is built and before each step (a decay set in the optimizer's param_groups then)."""
    if weight_decay and exempt:
        raise ValueError(f"impl='fast' applies weight decay to every LoRA weight, but the HF Trainer's rule, which "
                         f"the original and impl='reference' follow, leaves {len(exempt)} of them without it by "
                         f"name ({exempt[0]}, ...): rename the adapter or module, or use impl='reference' or "
                         f"weight_decay=0")


class FastBooster:
    def __init__(self, model, cfg: BoosterConfig):
        self.model, self.cfg = model, cfg
        self._cfg_built = self._cfg_seen = cfg.snapshot()  # a config changed between steps is checked again
        keep_nf4_trainable_(model)  # before the probes below run the model in eval mode
        self.flat = FlatLoRA(model)  # first: a model without LoRA is told so, not that its norms lack decay
        self._exempt = sorted(exempt_from_decay(model, trainable_parameters(model)))
        _check_all_decay(self._exempt, cfg.weight_decay)
        self.device = self.flat.W.device
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            log.info("%s made the current CUDA device: Triton launches its kernels on the current one", self.device)
            torch.cuda.set_device(self.device)
        triton_unusable(self.device)  # the kernels' launch check (a host sync, once) here rather than in a step
        self.autocast = Autocast(model, self.device)
        self.merge = default_merge(self.device) if cfg.merge_passes is None else cfg.merge_passes
        why_pack, why_mask = probe_attention(model, self.autocast)
        self.drop_mask = why_mask is None  # Booster.to_device leaves right-padded batches' masks out
        if why_mask is not None:
            log.info("attention masks kept: the mask-free attention does not run this model exactly (%s)", why_mask)
        self.pack = self._packing_for(cfg.packing, why_pack)
        self.window = sliding_window(model)  # batches with longer sequences go padded (Booster.to_device)
        self.rope = length_dependent_rope(model)  # batches longer than its L are refused (check_length)
        self.fused = self._fused_ops_for(cfg.fused_ops)
        self.chunked_head, self.fused_head = self._head_for(model)
        self.distributed = dist.is_available() and dist.is_initialized()
        cuda = self.device.type == "cuda"
        # one parameter for the optimizer: the flat buffer W (a leaf sharing W's storage), grad = G_f
        self.W = torch.nn.Parameter(self.flat.W, requires_grad=True)
        self.W.grad = self.flat.G_f
        self.graphs = self._graphs_for(cfg.graphs)
        # AdamW says capturable where the step will be captured (fused AdamW runs the same kernel either way, its
        # step count on the device; the flag is for torch's capture check).
        # Where the step is captured, the learning rate is a device tensor that every replay reads, so a scheduler
        # (which fills a tensor lr in place) or a user's new value needs no new graph (_prepare keeps it this
        # tensor). CUDA's fused AdamW reads a tensor lr as fp32, as it rounds a float one (the CPU's takes fp64,
        # bit for bit a float lr). Elsewhere it stays a float: checkpoints then hold no device tensor
        captured = cuda and self.graphs is not None
        self._lr = None
        if self.graphs is not None:
            lr_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
            self._lr = torch.full((), cfg.lr, dtype=lr_dtype, device=self.device)
        self.optimizer = torch.optim.AdamW([self.W], lr=cfg.lr if self._lr is None else self._lr, betas=cfg.betas,
                                           eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, fused=True,
                                           **({"capturable": True} if captured else {}))
        # its warm-up steps run uncaptured by design: torch's advice against capturable then (once per optimizer,
        # as a UserWarning) does not apply
        self.optimizer._warned_capturable_if_run_uncaptured = captured
        self._skipped = torch.zeros((), device=self.device)
        # the constant of the clip's one add (_clip_and_update), filled by _prepare for the clip norm in force
        self._clip_offset, self._clip_offset_for = torch.zeros((), device=self.device), None
        self.hidden = None
        if cfg.perturb_aware:
            from .perturb_aware import AttentionPerturbation

            self.hidden = AttentionPerturbation(model)

    def _packing_for(self, wanted: bool | None, why: str | None) -> bool:
        """Whether `Booster.to_device` packs this engine's batches (packing.py): the device's measured default
        unless pinned; never for a model whose attention it cannot reproduce exactly (`why`: probe_attention)."""
        if wanted is False:
            return False
        if why is not None:
            if wanted:
                raise ValueError(f"packing=True: {why}")
            log.info("packing off: %s", why)
            return False
        pack = default_packing(self.device) if wanted is None else True
        cfg = self.model.config
        heads = getattr(cfg, "num_attention_heads", None)
        if pack and self.device.type == "cuda" and self.autocast.enabled and heads:  # bf16: flash's kernel
            why = probe_flash(self.device, torch.bfloat16, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                              getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            log.info("packing: %s", "flash variable-length attention checked against the exact path" if why is None
                     else f"packed attention runs the exact segment grid: {why}")
        return pack

    def _fused_ops_for(self, wanted: bool | None) -> bool:
        """Installs the fused RMSNorm/SwiGLU/RoPE forwards (fused_ops.py) when wanted (the device's default unless
        pinned); one log line says what runs fused."""
        if not (default_fused_ops(self.device) if wanted is None else wanted):
            return False
        if wanted is None and not available(self.device):  # CUDA where Triton cannot launch (logged once)
            return False
        counts = fused_ops.install(self.model, self.autocast)  # raises for a device that cannot run them
        if not counts:
            if wanted:
                raise ValueError("fused_ops=True: the model has no RMSNorm, gated MLP or rotary attention the "
                                 "kernels cover (Llama, Mistral, Qwen2/3, Gemma 1-3)")
            log.info("fused ops off: the model has no RMSNorm, gated MLP or rotary attention the kernels cover")
            return False
        log.info("fused ops: %s", ", ".join(f"{n} {name}" for name, n in counts.items()))
        return True

    def _head_for(self, model) -> tuple[bool, bool]:
        """(chunked, fused): the LM head in chunks (head_loss.py) where its probe finds the chunked losses the
        model's own, their cross entropy as one kernel where the fused ops run and the kernel agrees too; one log
        line for what is left out."""
        why = probe_head(model, self.autocast, self.fused)
        if why is None:
            return True, self.fused
        if self.fused and probe_head(model, self.autocast) is None:  # the kernel is what disagrees
            log.warning("LM head: chunked, its cross entropy in torch ops (with the fused kernel %s)",
                        why.removeprefix("its "))
            return True, False
        log.info("LM head: the model's own, over all positions at once (%s)", why)
        return False, False

    def _graphs_for(self, mode: str):
        """A StepGraphs when the step should be captured, else None (with one log line saying why not)."""
        if mode == "off":
            return None
        reason = None
        if self.device.type != "cuda":
            reason = "CUDA graphs need a CUDA device"
        elif self.distributed:
            reason = "several processes: the engine does not capture their gradients' all-reduce"
        elif any(type(m).__name__ == "Linear8bitLt" for m in self.model.modules()):
            reason = ("bitsandbytes' 8-bit layers (LLM.int8) look for outlier columns on the host in each forward, "
                      "a read that capture refuses (4-bit NF4 layers are captured)")
        elif checkpoint_reads_rng(self.model):
            reason = ("gradient checkpointing saves the CUDA RNG state for its recompute (preserve_rng_state on; "
                      "enable_gradient_checkpointing turns it off where there is no dropout), a host read that "
                      "capture refuses")
        if reason is None:
            from .graphs import StepGraphs

            return StepGraphs(mode, keep_masks=not self.drop_mask)
        if mode == "on":
            raise ValueError(f"graphs='on': {reason}")
        if self.device.type == "cuda":
            log.info("CUDA graphs off: %s", reason)
        return None

    # -- helpers ---------------------------------------------------------------------------------------------
    def _global_counts(self, *groups) -> torch.Tensor:
        """Label counts of each group of micro-batches, summed over processes, clamped to >= 1 (device)."""
        counts = torch.stack([sum(label_count(b) for b in g) for g in groups])
        if self.distributed:
            dist.all_reduce(counts)
        return counts.clamp(min=1)

    def _all_reduce(self, t: torch.Tensor):
        if self.distributed:
            dist.all_reduce(t)

    def _backward(self, batch, denom, harmful_tokens, around=None) -> torch.Tensor:
        """Forward/backward of one micro-batch, its loss divided by `denom`; returns the detached loss. `around`: a
        context held over both (perturb_aware's hooks)."""
        with self.flat.route(harmful_tokens), model_pass(), attention_for(self.model, batch), \
                around or contextlib.nullcontext():
            with self.autocast():
                loss = self._token_losses(batch).sum() / denom
            loss.backward()
            return loss.detach()

    def _token_losses(self, batch) -> torch.Tensor:
        """Per-position cross entropy of one batch (losses.token_losses), the LM head in chunks where it can be."""
        if self.chunked_head:
            return head_losses(self.model, batch, self.fused_head)
        return token_losses(logits_of(self.model, batch), batch)

    def _merged_backward(self, h, f, n_h, n_f, record: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ONE forward/backward of [h ; f]: the LoRA grads of h's positions land in G_h, of f's in G_f. `record`:
        keep f's attention-output gradients as perturb_aware's micro-batch `record`. None, with the merged pass
        off from then on (one warning), when a LoRA layer cannot tell the batches apart and merging was not
        pinned: that forward raised before any gradient was written."""
        try:
            return self._merged_pass(h, f, n_h, n_f, record)
        except MixedPositions as e:
            if self.cfg.merge_passes:
                raise ValueError(f"merge_passes=True: {e}; use merge_passes=False (--merge-passes off)") from None
            log.warning("merged pass off: %s; each pass runs one batch", e)
            self.merge = False
            return None

    def _merged_pass(self, h, f, n_h, n_f, record):
        head_positions = h["keep"].numel() if "keep" in h else tokens(h)  # what the LM head sees of h
        around = contextlib.nullcontext()
        if record is not None:  # f's rows follow h's (padded) or its positions follow h's (packed, one row)
            packed = "cu_seqlens" in h
            n = h["input_ids"].shape[1 if packed else 0]  # h's positions (packed) or rows (padded)
            around = self.hidden.recording(record, (lambda g: g[:, n:]) if packed else (lambda g: g[n:]))
        merged = tokens(h) + tokens(f), head_positions + (f["keep"].numel() if "keep" in f else tokens(f))
        with self.flat.route(tokens(h), head_positions, merged), model_pass(), around:
            both = concat(h, f)
            with attention_for(self.model, both):
                with self.autocast():
                    per_position = self._token_losses(both).flatten()
                    k = targets_of(h).numel()  # h's positions come first
                    loss_h, loss_f = per_position[:k].sum() / n_h, per_position[k:].sum() / n_f
                (loss_h + loss_f).backward()
            return loss_h.detach(), loss_f.detach()

    def _clip_and_update(self) -> torch.Tensor:
        """Clip G_f to max_grad_norm with a device-side scale and take one fused AdamW step on W, skipped on the
        device when the gradient is not finite. Returns the skip flag (0-dim float, 1.0 = skipped). Fused AdamW
        unscales in place: after the step G_f, and the LoRA parameters' .grad (its views), hold the clipped
        gradient until the next step zeroes them (the reference sets .grad to None after its update)."""
        cfg = self.cfg
        if cfg.max_grad_norm > 0 or cfg.skip_nonfinite:
            norm = torch.linalg.vector_norm(self.flat.G_f)
        if cfg.max_grad_norm > 0:
            # fused AdamW divides the grad by grad_scale = max((‖g‖ + 1e-6)/max_norm, 1), the inverse of HF's clip
            # coefficient, written as one add (the same number as HF's denominator for the default max_norm 1.0;
            # HF multiplies by the reciprocal, so a clipped element may differ from it in the last bit)
            m = cfg.max_grad_norm
            self.optimizer.grad_scale = torch.add(self._clip_offset, norm, alpha=1 / m).clamp_min_(1.0)
        else:  # also when clipping was switched off between steps: no scale of an earlier step left behind
            self.optimizer.grad_scale = None
        skipped = self._skipped  # constant 0 when not guarded (the engine's own tensor: step() says so)
        if cfg.skip_nonfinite:
            # ‖g‖ − ‖g‖ is NaN exactly when ‖g‖ is inf or NaN; fused AdamW leaves W, m, v and step alone then.
            # A new tensor each step (ne_ in place on the difference keeps it float): a caller may keep the
            # returned dicts and read them later
            skipped = (norm - norm).ne_(0)
            self.optimizer.found_inf = skipped
        else:
            self.optimizer.found_inf = None
        self.optimizer.step()
        return skipped

    def _prepare(self):
        self._cfg_seen = self.cfg.recheck(self._cfg_built, self._cfg_seen)
        if self.distributed != (dist.is_available() and dist.is_initialized()):
            raise ValueError("the process group was started or ended after this Booster was built: build the "
                             "Booster after init_process_group, so that it all-reduces its gradients")
        if not self.flat.views_intact():
            raise ValueError("the model's LoRA weights are no longer views of the fast engine's flat buffer (the "
                             "model was cast, moved or loaded with assign=True after the Booster was built): build "
                             "the Booster once the model is cast, moved and loaded")
        if not self.flat.grads_attached():  # someone called zero_grad(set_to_none=True)
            self.flat.attach_grads()
        if self.W.grad is not self.flat.G_f:
            self.W.grad = self.flat.G_f
        self.model.train()  # every module, as the reference: a wrapper made in training mode around a base that
        # from_pretrained left in eval mode says training=True while the base's dropout is off
        # the step reads its knobs from cfg (STEP_KNOBS; a change gets a graph of its own): the clip's constant
        # lives in a tensor, refilled between steps when the clip norm changes
        if self._clip_offset_for != self.cfg.max_grad_norm:
            m = self.cfg.max_grad_norm
            self._clip_offset.fill_(1e-6 / m if m > 0 else 0.0)
            self._clip_offset_for = m
        group = self.optimizer.param_groups[0]
        _check_all_decay(self._exempt, group["weight_decay"])
        if self._lr is not None and group["lr"] is not self._lr:  # a float set by hand, or a loaded state's
            self._lr.fill_(group["lr"])  # between steps, outside any graph; fill_ takes a float or a 0-dim tensor
            group["lr"] = self._lr

    def check_length(self, length: int, what: str) -> None:
        """ModelError (a ValueError) where `length` positions pass the L of a RoPE whose frequencies follow each
        forward's longest position beyond L (models.length_dependent_rope): the fast engine's forwards span other
        rows than the reference's (the merged [h ; f], packed micro-batches, batches kept at max_length for CUDA
        graphs) and, for the "dynamic" types, whose rescaling carries over, run f before the perturbed pass where
        the reference runs it last. Measured with rows twice L: the first gradient 6e-4 to 2e-2 off the reference's.
        Host-side numbers only."""
        check_rope_length(self.rope, length, what)

    def _check_lengths(self, *batches) -> None:
        """check_length for each batch (or list of packed micro-batches), from the shapes the host holds."""
        if self.rope is None:
            return
        for batch in batches:
            for b in batch if isinstance(batch, list) else (batch,):
                length = b["max_seqlen"] if "cu_seqlens" in b else b["input_ids"].shape[-1]
                self.check_length(length, f"a batch {length} positions long")

    # -- the Booster step ------------------------------------------------------------------------------------
    def step(self, align_batch, harmful_batch) -> dict[str, torch.Tensor]:
        """One Booster update (one CUDA-graph replay once captured). Returns the step's 0-dim device tensors
        (losses, harmful_grad_norm, skipped), read but not written by the caller: uncaptured without
        skip_nonfinite, `skipped` is the engine's own constant zero."""
        self._check_lengths(align_batch, harmful_batch)
        self._prepare()
        with fused_ops.active(self.fused):  # held across every backward, and a checkpointed layer's recompute
            if self.graphs is not None:
                return self.graphs.run(("booster", *self._baked()), self._step, (align_batch, harmful_batch))
            return self._step(align_batch, harmful_batch)

    def sft_step(self, align_batch) -> dict[str, torch.Tensor]:
        """One SFT update on the same flat buffers, optimizer and clipping."""
        self._check_lengths(align_batch)
        self._prepare()
        with fused_ops.active(self.fused):
            if self.graphs is not None:
                return self.graphs.run(("sft", *self._baked()), self._sft_step, (align_batch,))
            return self._sft_step(align_batch)

    def _baked(self) -> tuple:
        """The Python numbers a captured graph holds as constants — the optimizer's hyperparameters and the step's
        knobs (STEP_KNOBS) — as part of the graph key, so that a changed value gets a graph of its own instead of
        being silently ignored by the replays. The learning rate is not one of them: with graphs it is the device
        tensor `_lr`, read at every replay."""
        g = self.optimizer.param_groups[0]
        return (g["betas"], g["weight_decay"], g["eps"]) + tuple(getattr(self.cfg, k) for k in STEP_KNOBS)

    def _step(self, align_batch, harmful_batch) -> dict[str, torch.Tensor]:
        cfg, fl = self.cfg, self.flat
        hs = micro_batches(harmful_batch, cfg.grad_accum)
        fs = micro_batches(align_batch, cfg.grad_accum)
        if len(hs) != len(fs):
            raise ValueError(f"{len(hs)} harmful micro-batches but {len(fs)} alignment micro-batches")
        fl.G.zero_()
        if self.hidden is not None:
            self.hidden.reset()  # nothing left over from a step that raised
        with model_pass():
            n_h, n_f = self._global_counts(hs, fs)

        # ---- pass 1 at w: ∇h(w) -> G_h, ∇f(w) -> G_f -----------------------------------------------------------
        hidden, out = self.hidden, {}
        harmful_loss = loss = None
        for i, (h, f) in enumerate(zip(hs, fs)):
            record = None if hidden is None else i
            merged = self._merged_backward(h, f, n_h, n_f, record) if self.merge and can_concat(h, f) else None
            if merged is not None:
                lh, lf = merged
            else:
                lh = self._backward(h, n_h, ALL_TOKENS)
                lf = self._backward(f, n_f, 0, None if hidden is None else hidden.recording(i))
            harmful_loss = lh if harmful_loss is None else harmful_loss + lh
            loss = lf if loss is None else loss + lf

        # ---- perturb_aware, at w: G_f = ∇f(w; e), e = ρ·∂f/∂o / ‖∂f/∂o‖ on the attention outputs o ----------
        if hidden is not None:
            fl.G_f.zero_()
            hidden.scale_(hidden.norm(self.distributed), cfg.rho)
            perturbed_align = None
            for i, f in enumerate(fs):
                lp = self._backward(f, n_f, 0, hidden.applied(i))
                perturbed_align = lp if perturbed_align is None else perturbed_align + lp
            hidden.reset()
            out["loss_perturbed"] = perturbed_align
        self._all_reduce(fl.G)

        # ---- perturb: B = W, W = w~, G_f += λ G_h, G_h = 0 ---------------------------------------------------
        ss = sumsq(fl.G_h)
        perturbed_loss = None
        # (on the torch path the perturb is several ops: an interrupt between them and the try below leaves W
        # part-way to w~, as the reference's loop of per-tensor ops may; B cannot restore it there, since it may
        # still hold the last step's weights)
        if cfg.meta_term:
            grad_norm = normalize_perturb_(fl.W, fl.B, fl.G_h, fl.G_f, ss, cfg.alpha, cfg.lamb, cfg.perturb_eps)

            # ---- pass 2 at w~: ∇h(w~) -> G_h ------------------------------------------------------------------
            try:
                for h in hs:
                    lp = self._backward(h, n_h, ALL_TOKENS)
                    perturbed_loss = lp if perturbed_loss is None else perturbed_loss + lp
                self._all_reduce(fl.G_h)
            except BaseException:  # out of memory, an interrupt: the model must not stay at w~ (under capture
                if not (fl.W.is_cuda and torch.cuda.is_current_stream_capturing()):  # nothing ran: W holds w)
                    fl.W.copy_(fl.B)
                raise

            # ---- restore W from B (bit-exact), G_f -= λ ∇h(w~) ------------------------------------------------
            restore_combine_(fl.W, fl.B, fl.G_h, fl.G_f, cfg.lamb)
        else:
            grad_norm = ss.sqrt()
            fl.G_f.add_(fl.G_h, alpha=cfg.lamb)
            perturbed_loss = torch.full((), float("nan"), device=self.device)

        # ---- clip + AdamW on the flat buffer ----------------------------------------------------------------------
        skipped = self._clip_and_update()
        out = {"loss": loss, "harmful_loss": harmful_loss, "harmful_loss_perturbed": perturbed_loss,
               "harmful_grad_norm": grad_norm, "skipped": skipped, **out}
        if self.distributed:  # each rank holds its share of the token means: sum them for the log
            keys = [k for k in out if "loss" in k]
            losses = torch.stack([out[k] for k in keys])
            dist.all_reduce(losses)
            out.update(zip(keys, losses.unbind()))
        return out

    def _sft_step(self, align_batch) -> dict[str, torch.Tensor]:
        fs = micro_batches(align_batch, self.cfg.grad_accum)
        self.flat.G_f.zero_()
        with model_pass():
            (n_f,) = self._global_counts(fs)
        loss = None
        for f in fs:
            lf = self._backward(f, n_f, 0)
            loss = lf if loss is None else loss + lf
        self._all_reduce(self.flat.G_f)
        skipped = self._clip_and_update()
        if self.distributed:
            dist.all_reduce(loss)
        return {"loss": loss, "skipped": skipped}
