"""`BoosterTrainer`: a drop-in `transformers.Trainer` that aligns with Booster, on the same engine as `Booster`.

    from booster_fast import BoosterTrainer, BoosterTrainingArguments
    args = BoosterTrainingArguments(output_dir="out", learning_rate=5e-4, lamb=5.0, alpha=0.1, ...)
    trainer = BoosterTrainer(model=peft_model, args=args, train_dataset=align, data_collator=collator,
                             harmful_dataset=harmful)        # or, as the original: trainer.init(harmful)
    trainer.train()

How it fits into the Trainer. The Trainer's loop does, per update: `training_step` once per micro-batch, then
(on the last one) clip `model.parameters()` grads to `max_grad_norm`, `optimizer.step()`, `lr_scheduler.step()`,
`model.zero_grad()`. The original Booster trainer builds the combined gradient ∇f + λ∇h(w) − λ∇h(w̃) into
`.grad` inside `training_step` and lets the Trainer clip and step. We keep exactly that division of labour:

- `create_optimizer` builds the engine (the fast or reference step of `Booster`) on the model; the Trainer's
  optimizer IS the engine's AdamW (for the fast engine: one fused AdamW over the flat LoRA buffer W, whose
  `.grad` is the flat buffer G_f that every LoRA parameter's `.grad` is a view of). The engine's own
  clip-and-update is switched off (`_gradient_only` below), so clipping happens once, in the Trainer, on the
  combined gradient (the same `max_grad_norm` semantics as the original; logged `grad_norm` is its norm), and
  the Trainer's `optimizer.step()`, scheduler and `zero_grad()` drive the engine's optimizer unchanged.
- Gradient accumulation: Booster's perturbation needs ∇h summed over ALL micro-batches of the update before
  it can perturb (w̃ = w − α∇h/‖∇h‖), so the engine cannot run micro-batch by micro-batch. `training_step`
  therefore stashes each alignment micro-batch (and one harmful micro-batch pulled from the harmful loader)
  and returns 0; on the micro-batch that ends the update (`accelerator.sync_gradients`, which the Trainer
  sets before calling `training_step`) it runs the engine once over the lists of micro-batches. The engine
  normalises every loss by the token count of the whole update (and of all processes), so k micro-batches of
  b rows give exactly the update of one batch of k·b rows. Activations are still those of one micro-batch at
  a time; the stash holds token ids only. The returned loss is the update's alignment loss (0 on the other
  micro-steps), so the Trainer's logged `loss` is the mean alignment loss per update, as usual.
- Several processes (`torchrun` / `accelerate launch`, DDP): the engine calls the PEFT model directly, not the
  DDP wrapper, so DDP's hooks stay idle; the engine all-reduces its flat gradient buffers itself, once per pass
  and before the norm (summed; losses are divided by the global token count), so n ranks equal one process on
  the union batch. The harmful loader is sharded across processes by `accelerator.prepare`, like the train
  loader. FSDP, DeepSpeed, fp16 loss scaling, DataParallel, `torch_compile` and label smoothing are rejected
  with one line.
- The harmful data: `harmful_batch_size` rows per device and micro-batch (default: per_device_train_batch_size).
  The original's loader hard-codes 10 rows, which equals per_device_train_batch_size in its Booster scripts
  (smooth_align*.sh), so the default reproduces them; set harmful_batch_size=10 to keep 10 whatever the
  alignment batch. With gradient accumulation one harmful micro-batch is pulled per alignment micro-batch, and
  the harmful loss is divided by the harmful tokens of the whole update, the alignment loss by its own, so the
  two sizes may differ.
  Shuffled on its own (seed `args.seed + 1`, a new order each pass), as the original's own
  RandomSampler does, so that an update's harmful rows are not the prompts of its alignment rows (accelerate
  would give a random sampler over a set of the same length the train loader's very order); sequential when
  training is (`train_sampling_strategy="sequential"`). `train(resume_from_checkpoint=...)` continues the
  harmful stream where the checkpoint left it.
- Booster + Vaccine (`perturb_aware`, with `rho`; the original's string "True" works too): the update's
  alignment gradient is taken under the attention-output perturbation (perturb_aware.py). The returned and
  logged `loss` is then that perturbed pass's, as the original's; `loss_unperturbed` logs the loss at w.
- Logging: `harmful_loss`, `harmful_loss_perturbed` and `harmful_grad_norm` are accumulated on the device
  and averaged into the Trainer's own log records (the engine reads nothing back; the Trainer syncs at log
  time). With the fast engine, an update's right-padded micro-batches are packed without pads, or lose their
  attention mask where packing would not shrink them, as `Booster.to_device` prepares them (one host read per
  update: the micro-batches are copied to the host, checked and packed there); left-padded ones, and any with
  a labelled pad, keep their mask. CUDA graphs are off: the Trainer steps the optimizer outside the engine.
- Swapping in for the original: `tokenizer=` is taken as the original passes it (handed on as
  `processing_class=` where transformers no longer knows the old name); `optim` must name torch's AdamW
  ("adamw_torch", or "adamw_torch_fused", the default), the update the engine takes, and anything else is
  refused rather than ignored.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from .atomic import write_text_atomic
from .config import BoosterConfig, is_integer, is_number
from .errors import reason
from .hf_batches import FixedLengthCollator  # noqa: F401 - importable from here, as it always was
from .hf_batches import EpochShuffle, labels_all_ignored, model_batch, packed_if_exact, without_masks_if_right_padded

logger = logging.getLogger("booster_fast")
HARMFUL_STATE = "booster_harmful_stream.json"
BOOSTER_METRICS = ("harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm")
# the `optim` values that name torch's AdamW, which is what the engine steps (fused on the fast engine's flat buffer)
ENGINE_OPTIMS = ("adamw_torch", "adamw_torch_fused")
# transformers 5 dropped Trainer(tokenizer=) for processing_class=; the original still passes tokenizer=
_TRAINER_TAKES_TOKENIZER = "tokenizer" in inspect.signature(Trainer.__init__).parameters


@dataclass
class BoosterTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus Booster's knobs. The optimizer is always the engine's AdamW (learning_rate,
    weight_decay — applied to every LoRA tensor —, adam_beta1/2, adam_epsilon are honoured); `optim` must say so
    ("adamw_torch" or "adamw_torch_fused", the default), any other value is refused."""

    lamb: float = field(default=5.0, metadata={"help": BoosterConfig.help()["lamb"]})
    alpha: float = field(default=0.1, metadata={"help": BoosterConfig.help()["alpha"]})
    harmful_batch_size: int | None = field(
        default=None,
        metadata={"help": "Harmful rows per device and per micro-batch (default: per_device_train_batch_size). The "
                          "original hard-codes 10, which is per_device_train_batch_size in its Booster scripts."},
    )
    booster_impl: str = field(default="fast", metadata={"help": BoosterConfig.help()["impl"]})
    merge_passes: bool | None = field(default=None, metadata={"help": BoosterConfig.help()["merge_passes"]})
    packing: bool | None = field(default=None, metadata={"help": BoosterConfig.help()["packing"]})
    fused_ops: bool | None = field(default=None, metadata={"help": BoosterConfig.help()["fused_ops"]})
    meta_term: bool = field(default=True, metadata={"help": BoosterConfig.help()["meta_term"]})
    perturb_aware: bool = field(default=False, metadata={"help": BoosterConfig.help()["perturb_aware"]})
    rho: float = field(default=BoosterConfig.rho, metadata={"help": BoosterConfig.help()["rho"]})

    def __post_init__(self):
        super().__post_init__()
        booster_config(self)  # λ, α, ρ, learning_rate, ... refused here, not at train()
        _check_optim(self)
        _check_liger(self)
        n = self.harmful_batch_size
        if n is not None and (not is_integer(n) or n < 1):
            raise ValueError(f"harmful_batch_size must be an integer >= 1, got {n!r}")
        _check_max_grad_norm(self)


def _check_max_grad_norm(args):
    """The Trainer clips the combined gradient only where max_grad_norm > 0: NaN or -1 would switch it off unsaid.
    None (no clipping, as transformers 4 took it, the original's) becomes 0, which transformers 5 compares."""
    m = args.max_grad_norm
    if m is None:
        args.max_grad_norm = 0.0
    elif not (is_number(m) and m >= 0 and math.isfinite(m)):
        raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 or None: no clipping), got {m!r}")


def booster_config(a) -> BoosterConfig:
    """The engine's config from Trainer arguments (fields the original's arguments lack take their defaults); a bad
    value is refused in the Trainer's names (learning_rate, not lr)."""
    try:
        return BoosterConfig(lamb=a.lamb, alpha=a.alpha, lr=a.learning_rate, weight_decay=a.weight_decay,
                             betas=(a.adam_beta1, a.adam_beta2), adam_eps=a.adam_epsilon,
                             max_grad_norm=0.0,        # the Trainer clips, once, on the combined gradient
                             impl=getattr(a, "booster_impl", "fast"), merge_passes=getattr(a, "merge_passes", None),
                             packing=getattr(a, "packing", None), fused_ops=getattr(a, "fused_ops", None),
                             meta_term=getattr(a, "meta_term", True), perturb_aware=_perturb_aware(a),
                             rho=getattr(a, "rho", BoosterConfig.rho),
                             grad_accum=1,             # micro-batches arrive as lists (see training_step)
                             skip_nonfinite=False, graphs="off")
    except ValueError as e:
        msg = str(e)
        for ours, theirs in (("lr ", "learning_rate "), ("adam_eps ", "adam_epsilon "), ("impl ", "booster_impl "),
                             ("betas ", "adam_beta1 and adam_beta2 ")):
            msg = theirs + msg[len(ours):] if msg.startswith(ours) else msg
        raise ValueError(msg) from None


def _perturb_aware(args) -> bool:
    """The original's `perturb_aware` is the string "True"/"False"; ours is a bool. Anything else is refused:
    the original reads any other string as off, which "true" or "yes" hardly mean."""
    value = getattr(args, "perturb_aware", False)
    if isinstance(value, bool) or value in ("True", "False"):
        return value in (True, "True")
    raise ValueError(f"perturb_aware must be True or False (or the original's strings \"True\"/\"False\"), got "
                     f"{value!r}")


def _check_optim(args):
    """Refuse an `optim` the engine would not honour: its update is always torch's AdamW."""
    optim = getattr(args.optim, "value", args.optim)  # TrainingArguments turns the string into an OptimizerNames
    if optim not in ENGINE_OPTIMS:
        raise ValueError(f"optim={optim!r} is not supported: BoosterTrainer's update is the engine's torch AdamW; "
                         f"pass optim=\"adamw_torch\" or \"adamw_torch_fused\" (the default) and set its "
                         f"adam_beta1/adam_beta2/adam_epsilon/weight_decay")


def _check_liger(args):
    """Refuse use_liger_kernel, before the Trainer's own __init__ applies Liger to the model (or, without the
    package, fails to import it) on some transformers versions."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("BoosterTrainer does not support use_liger_kernel (it swaps the model's modules and loss "
                         "for Liger's kernels: the engine computes its own loss, the reference runs the model's own "
                         "modules, and the fast engine fuses them itself)")


def _gradient_only(engine_cls):
    """The engine with its clip-and-update removed: a step leaves the combined gradient in `.grad` (for the fast
    engine: in the flat buffer G_f, which the parameters' and W's `.grad` are views of) for the Trainer to clip
    and apply with the engine's own optimizer. `_clip_and_update` is the one place where both engines update."""

    class GradientOnly(engine_cls):
        def __init__(self, model, cfg):
            super().__init__(model, cfg)
            self._not_skipped = torch.zeros((), device=self.device)

        def _clip_and_update(self):
            return self._not_skipped

    GradientOnly.__name__ = GradientOnly.__qualname__ = f"GradientOnly{engine_cls.__name__}"
    return GradientOnly


def build_engine(model, cfg: BoosterConfig):
    """The same engine `Booster` builds for `cfg.impl`, without its clip-and-update (see `_gradient_only`)."""
    from .booster import engine_class, warn_about_what_the_engines_leave_out

    engine = _gradient_only(engine_class(cfg))(model, cfg)
    warn_about_what_the_engines_leave_out(model)
    return engine


class BoosterTrainer(Trainer):
    """`transformers.Trainer` whose `training_step` is a Booster update (see the module docstring)."""

    def __init__(self, *args, harmful_dataset=None, tokenizer=None, **kwargs):
        if tokenizer is not None:  # the original's spelling
            if kwargs.get("processing_class") is not None:
                raise ValueError("pass the tokenizer once: tokenizer= or processing_class=, not both")
            kwargs["tokenizer" if _TRAINER_TAKES_TOKENIZER else "processing_class"] = tokenizer
        _check_liger(kwargs.get("args", args[1] if len(args) > 1 else None))  # (the original's plain arguments)
        super().__init__(*args, **kwargs)
        if not all(hasattr(self.args, k) for k in ("lamb", "alpha")):  # the original's own arguments class has both
            raise TypeError(f"BoosterTrainer needs BoosterTrainingArguments (or arguments with `lamb` and `alpha`, "
                            f"as the original's), got {type(self.args).__name__}")
        _check_optim(self.args)  # again here: the original's arguments class is a plain TrainingArguments
        _check_max_grad_norm(self.args)
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None \
                or self.lr_scheduler is not None:  # (a scheduler built on another optimizer would step nothing)
            raise ValueError("BoosterTrainer builds its own optimizer (the engine's AdamW over the flat LoRA "
                             "buffer) and its scheduler (lr_scheduler_type); do not pass `optimizers=` or "
                             "`optimizer_cls_and_kwargs=`")
        self._check_supported()
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise ValueError("BoosterTrainer: the train dataset has no rows")  # (torch's sampler said num_samples=0)
        self.engine = None
        self.harmful_dataloader = self.harmful_data_iter = None
        self._harmful_drawn = 0  # harmful micro-batches drawn: saved with each checkpoint, where a resume goes on
        self._align_micro: list[dict] = []
        self._harmful_micro: list[dict] = []
        self._metric_sum: torch.Tensor | None = None
        self._metric_count = 0
        self._unperturbed_sum: torch.Tensor | None = None
        self._zero = None
        if harmful_dataset is not None:
            self.init(harmful_dataset)

    def _check_supported(self):
        a = self.args
        reasons = [
            (getattr(self, "is_deepspeed_enabled", False), "DeepSpeed"),
            (getattr(self, "is_fsdp_enabled", False), "FSDP"),
            (a.fp16, "fp16 loss scaling (use bf16)"),
            (a.n_gpu > 1, "DataParallel over several GPUs in one process (use torchrun / accelerate launch)"),
            (a.torch_compile, "torch_compile"),
            (a.label_smoothing_factor > 0, "label_smoothing_factor (the engine's loss is plain cross-entropy)"),
            (getattr(self, "compute_loss_func", None) is not None,
             "compute_loss_func (the engine's loss is plain cross-entropy)"),
            (type(self).compute_loss is not Trainer.compute_loss,
             "a subclass's compute_loss (the engine's loss is plain cross-entropy)"),
            (a.bf16_full_eval or a.fp16_full_eval, "bf16_full_eval / fp16_full_eval (they cast the LoRA weights, "
             "which the engine keeps in fp32; bf16=True evaluates under autocast)"),
            (a.auto_find_batch_size, "auto_find_batch_size (the harmful batches would keep their size)"),
            (bool(getattr(a, "optim_args", None) or getattr(a, "optim_target_modules", None)),
             "optim_args / optim_target_modules (the engine's AdamW takes the learning rate, betas, epsilon and "
             "weight decay arguments)"),
            (a.world_size > 1 and getattr(a, "booster_impl", "fast") == "reference",
             "booster_impl='reference' with several processes (it reduces nothing across them)"),
        ]
        bad = [what for on, what in reasons if on]
        if bad:
            raise ValueError(f"BoosterTrainer does not support {', '.join(bad)}")

    # -- the harmful data (the original's API: trainer.init(harmful_dataset)) ----------------------------------
    def init(self, harmful_dataset):
        """Attach the harmful dataset (as the original BoosterAlignmentTrainer.init); same collator as training."""
        batch_size = self._harmful_batch_size()
        if isinstance(harmful_dataset, Mapping):  # columns (a tokenizer's output), or a DatasetDict of splits
            raise ValueError(f"BoosterTrainer: the harmful dataset is a mapping ({', '.join(map(str, harmful_dataset))}"
                             "); pass a list of rows or a datasets.Dataset (one split)")
        if labels_all_ignored(harmful_dataset):
            raise ValueError("BoosterTrainer: no harmful row has a label other than -100, so the harmful loss and "
                             "its gradient are 0 and Booster's term does nothing; label the harmful answers' tokens")
        rows = len(harmful_dataset) if hasattr(harmful_dataset, "__len__") else None
        if rows == 0 or (rows is not None and rows < batch_size and self.args.dataloader_drop_last):
            raise ValueError(f"BoosterTrainer: the harmful dataset has {rows} rows, too few for one batch of "
                             f"harmful_batch_size={batch_size}" + (" with dataloader_drop_last" if rows else ""))
        self.harmful_dataloader = self.get_harmful_dataloader(harmful_dataset)
        self.harmful_data_iter = None
        self._harmful_drawn = 0
        self.steps = 0  # the original trainer's step counter, kept for code that reads it

    def get_harmful_dataloader(self, harmful_dataset):
        """A training DataLoader over the harmful set: the train collator and sampling strategy, sharded across
        processes by accelerate, `harmful_batch_size` rows per device and micro-batch."""
        batch_size = self._harmful_batch_size()
        if hasattr(self, "_get_dataloader"):  # transformers >= 4.52: the train loader's own recipe
            return self._get_dataloader(dataset=harmful_dataset, description="Harmful", batch_size=batch_size,
                                        sampler_fn=self._harmful_sampler, is_training=True)
        from torch.utils.data import DataLoader

        loader = DataLoader(harmful_dataset, batch_size=batch_size, collate_fn=self.data_collator,
                            sampler=self._harmful_sampler(harmful_dataset), drop_last=self.args.dataloader_drop_last,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _harmful_batch_size(self) -> int:
        """Harmful rows per device and micro-batch: `harmful_batch_size`, else the alignment batch's."""
        return getattr(self.args, "harmful_batch_size", None) or self.args.per_device_train_batch_size

    def _harmful_sampler(self, dataset):
        try:
            train = self._get_train_sampler(dataset)
        except TypeError:  # older transformers: _get_train_sampler() takes no dataset
            train = None
        if isinstance(train, torch.utils.data.SequentialSampler):
            self._harmful_order = None
            return train
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed  # as the train sampler
        self._harmful_order = EpochShuffle(len(dataset), seed + 1)
        return self._harmful_order

    def sample_from_harmful(self) -> dict:
        """The next harmful micro-batch; a new pass over the harmful set when one ends (as the original). The
        harmful stream leaves torch's global CPU random state alone: a DataLoader draws a seed from it when a pass
        starts, and a resumed run, which starts its pass elsewhere, would then draw other dropout masks."""
        if self.harmful_dataloader is None:
            raise ValueError("BoosterTrainer has no harmful dataset: pass harmful_dataset= to the constructor or "
                             "call trainer.init(harmful_dataset) before train()")
        with torch.random.fork_rng(devices=[]):
            return self._next_harmful()

    def _next_harmful(self) -> dict:
        if self.harmful_data_iter is None:
            self.harmful_data_iter = self._harmful_iter_at(self._harmful_drawn)
        self._harmful_drawn += 1
        try:
            return next(self.harmful_data_iter)
        except StopIteration:
            self.harmful_data_iter = iter(self.harmful_dataloader)
            batch = next(self.harmful_data_iter, None)
            if batch is None:  # a loader that yields nothing (e.g. fewer rows per process than one batch)
                raise ValueError("BoosterTrainer: the harmful dataloader yields no batch (too few harmful rows for "
                                 "harmful_batch_size on each process, or dataloader_drop_last)") from None
            return batch

    def _harmful_iter_at(self, drawn: int):
        """An iterator over the harmful loader that continues after `drawn` micro-batches (a resumed run); skips
        whole batches of indices, collating nothing."""
        if drawn == 0:
            return iter(self.harmful_dataloader)
        try:
            passes, skip = divmod(drawn, max(1, len(self.harmful_dataloader)))
        except TypeError:  # an iterable data set: no length, no position to go back to
            logger.warning("resume: the harmful data set has no length; its stream starts over")
            return iter(self.harmful_dataloader)
        if getattr(self, "_harmful_order", None) is not None:
            self._harmful_order.passes = passes
        if not skip:
            return iter(self.harmful_dataloader)
        from accelerate import skip_first_batches

        return iter(skip_first_batches(self.harmful_dataloader, skip))

    # the harmful stream's position travels with the RNG states the Trainer saves and restores per checkpoint
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            write_text_atomic(os.path.join(output_dir, HARMFUL_STATE),
                              json.dumps({"harmful_batches_drawn": self._harmful_drawn}))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """The Trainer's load, with one line for an optimizer state this trainer did not write (a plain Trainer's,
        the original's: per-tensor AdamW groups, where the engine's AdamW holds one flat buffer)."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except torch.OutOfMemoryError:  # (a RuntimeError, but no verdict on the file)
            raise
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"resume: the optimizer state in {checkpoint} does not fit this trainer's optimizer "
                             f"(the fast engine's AdamW holds one flat LoRA buffer; {reason(e, 100)}); it was written "
                             f"by another trainer or engine: start a new run from its adapter instead") from None

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        try:
            with open(os.path.join(checkpoint, HARMFUL_STATE)) as f:
                self._harmful_drawn = int(json.load(f)["harmful_batches_drawn"])
        except (OSError, ValueError, KeyError):  # a checkpoint from elsewhere: one draw per micro-batch, roughly
            self._harmful_drawn = self.state.global_step * self.args.gradient_accumulation_steps
            logger.warning("resume: %s has no %s; the harmful stream goes on after an estimated %d batches",
                           checkpoint, HARMFUL_STATE, self._harmful_drawn)
        self.harmful_data_iter = None

    def train(self, *args, **kwargs):
        """`Trainer.train`, starting with no micro-batch stashed and no metric carried over from an earlier call
        (updates after its last log, or an update it left unfinished)."""
        self._align_micro, self._harmful_micro = [], []
        self._metric_sum, self._metric_count, self._unperturbed_sum = None, 0, None
        return super().train(*args, **kwargs)

    # -- the engine is the optimizer ---------------------------------------------------------------------------
    def booster_config(self) -> BoosterConfig:
        """The engine's config from the arguments (fields the original's arguments lack take their defaults)."""
        return booster_config(self.args)

    def create_optimizer(self, model=None):
        if self.engine is not None and self.optimizer is not None and self.engine.model is self.model:
            return self.optimizer
        # first call, or a new model (train() with model_init rebuilds it and drops the optimizer): a new engine
        if model is not None and model is not self.model:
            raise ValueError("BoosterTrainer cannot build its engine on a wrapped model (FSDP / SageMaker MP)")
        if self.engine is not None:  # a new model trains from the start: so does its harmful stream
            self.harmful_data_iter, self._harmful_drawn = None, 0
            if getattr(self, "_harmful_order", None) is not None:
                self._harmful_order.passes = 0
        self.engine = build_engine(self.model, self.booster_config())
        self.optimizer = self.engine.optimizer
        self._zero = None  # the first step re-binds the LoRA parameters to the new engine's flat buffers
        return self.optimizer

    # -- one Booster update per optimizer step -------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stash this micro-batch and a harmful one; on the last micro-batch of the update run the engine over all
        of them (building the combined gradient in .grad) and return the update's alignment loss (detached)."""
        if self.engine is None:
            self.create_optimizer()
        if self._zero is None:
            self._rebind_flat_storage()
            self._zero = torch.zeros((), device=self.args.device)
        self._align_micro.append(model_batch(self._prepare_inputs(inputs)))
        self._harmful_micro.append(model_batch(self._prepare_inputs(self.sample_from_harmful()), "harmful"))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of this update
            return self._zero
        align, harmful = self._align_micro, self._harmful_micro
        self._align_micro, self._harmful_micro = [], []
        if getattr(self.engine, "flat", None) is not None:  # the fast engine (as in _rebind_flat_storage)
            if self.engine.pack:
                align, harmful = packed_if_exact((align, harmful), self.args.device, self.engine.window)
            elif self.engine.drop_mask:
                align, harmful = without_masks_if_right_padded(align, harmful)
        with self.compute_loss_context_manager():
            out = self.engine.step(align, harmful)
        values = torch.stack([out[k].detach().float().reshape(()) for k in BOOSTER_METRICS])
        self._metric_sum = values if self._metric_sum is None else self._metric_sum + values
        self._metric_count += 1
        self.steps = getattr(self, "steps", 0) + 1  # (the original's counter: see init)
        if "loss_perturbed" in out:  # perturb_aware: the original returns the perturbed pass's loss
            at_w = out["loss"].detach()
            self._unperturbed_sum = at_w if self._unperturbed_sum is None else self._unperturbed_sum + at_w
            return out["loss_perturbed"].detach()
        return out["loss"].detach()

    def _rebind_flat_storage(self):
        """Once, at the first step: make the LoRA parameters (and their attached grads) views of the engine's flat
        buffers again if a wrapper copied them after `create_optimizer`. accelerate's `model.to("cpu:0")` under a
        multi-process CPU launch does: on the CPU `.to("cpu:0")` always copies, and `Module.to` re-points both
        `param.data` and the attached `param.grad.data` (FlatLoRA's views of G_f) at the copies. Values are copied
        back into W; a move to another device cannot be undone and raises."""
        flat = getattr(self.engine, "flat", None)
        if flat is None:  # the reference engine holds the Parameter objects themselves
            return
        sizes, n = flat.sizes, flat.numel
        with torch.no_grad():
            for p, w in zip(flat.params, flat.W[:n].split(sizes)):
                if p.data_ptr() == w.data_ptr():
                    continue
                if p.device != flat.W.device:
                    raise RuntimeError(f"the model moved to {p.device} after BoosterTrainer built its engine on "
                                       f"{flat.W.device}; place the model on its device before creating the trainer")
                w.copy_(p.detach().reshape(-1))
                p.data = w.view_as(p)
            for v, g in zip(getattr(flat, "_gf_views", ()), flat.G_f[:n].split(sizes)):
                if v.data_ptr() != g.data_ptr():
                    v.data = g.view_as(v)
        flat.attach_grads()
        lo, hi = flat.G_f.data_ptr(), flat.G_f.data_ptr() + flat.G_f.numel() * flat.G_f.element_size()
        if not all(lo <= p.grad.data_ptr() < hi for p in flat.params):
            raise RuntimeError("the LoRA gradients do not land in the engine's flat buffer after re-binding")

    def log(self, logs, *args, **kwargs):
        """Add the Booster metrics, averaged over the updates since the last log, to the Trainer's training logs."""
        if self._metric_count and "loss" in logs:
            means = (self._metric_sum / self._metric_count).tolist()  # host sync, at log time only
            for k, v in zip(BOOSTER_METRICS, means):
                if k != "harmful_loss_perturbed" or self.engine.cfg.meta_term:  # without the meta term: not run
                    logs[k] = v
            if self._unperturbed_sum is not None:  # perturb_aware: `loss` is the perturbed pass's, as the original's
                logs["loss_unperturbed"] = (self._unperturbed_sum / self._metric_count).item()  # at log time
            self._metric_sum, self._metric_count, self._unperturbed_sum = None, 0, None
        return super().log(logs, *args, **kwargs)


# the original's name (git-disl/Booster, trainer.py): its train.py swaps in by the import line alone
BoosterAlignmentTrainer = BoosterTrainer
