"""BoosterTrainer (the drop-in transformers.Trainer) computes Booster's update: 5 trainer steps equal 5 `Booster`
steps, the original's `trainer.init(harmful_dataset)` works, and gradient accumulation equals one big batch.

Data order is made identical by construction: the Trainer samples sequentially (train_sampling_strategy=
"sequential", which BoosterTrainer also uses for the harmful loader), so update i sees rows [i·b, (i+1)·b) of
both sets, and the `Booster` side is fed the same rows collated the same way.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transformers import TrainingArguments

import booster_fast as bf
from booster_fast.data import collate, encode_all, load_safety_data
from booster_fast.hf_trainer import FixedLengthCollator

from test_fast import lora_state, randomize_lora_b_, worst_relative_error  # the same helpers as the step tests

SEED = 7
MAX_LEN = 64
LR = 5e-4


@dataclasses.dataclass
class OriginalArguments(TrainingArguments):   # as in the original's train.py: a plain TrainingArguments and its knobs
    lamb: float = 5.0
    alpha: float = 0.1
    rho: float = 2.0
    perturb_aware: str = "False"


def make_model(dropout: float = 0.0):
    model, tok = bf.load_model("tiny", seed=SEED, device="cpu")
    torch.manual_seed(SEED)
    return randomize_lora_b_(bf.add_lora(model, r=8, alpha=16, dropout=dropout), SEED + 1), tok


@pytest.fixture(scope="module")
def data():
    _, tok = bf.load_model("tiny", device="cpu")
    align, harmful = load_safety_data("builtin", "train")
    rows_a, _ = encode_all(tok, align[:48], MAX_LEN)
    rows_h, _ = encode_all(tok, harmful[100:148], MAX_LEN)   # other prompts than the alignment rows
    return rows_a, rows_h, tok.pad_token_id


def trainer_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, harmful_batch_size=4,
                gradient_accumulation_steps=1, max_steps=5, learning_rate=LR, weight_decay=0.1,
                lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, train_sampling_strategy="sequential",
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
                dataloader_num_workers=0)
    base.update(kw)
    return bf.BoosterTrainingArguments(**base)


def make_trainer(tmp_path, data, harmful=True, callbacks=None, **kw):
    rows_a, rows_h, pad = data
    model, _ = make_model()
    trainer = bf.BoosterTrainer(model=model, args=trainer_args(tmp_path, **kw), train_dataset=rows_a,
                                data_collator=FixedLengthCollator(pad, MAX_LEN), callbacks=callbacks,
                                **({"harmful_dataset": rows_h} if harmful else {}))
    return trainer, model


def batch(rows, i, b, pad):
    return collate(rows[i * b:(i + 1) * b], MAX_LEN, pad)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_trainer_equals_booster_5_steps(tmp_path, data, impl):
    rows_a, rows_h, pad = data
    trainer, model = make_trainer(tmp_path, data, booster_impl=impl)
    w0 = lora_state(model)
    trainer.train()
    got = lora_state(model)

    ref_model, _ = make_model()
    booster = bf.Booster(ref_model, bf.BoosterConfig(impl=impl, lr=LR, weight_decay=0.1, max_grad_norm=1.0))
    outs = [booster.step(batch(rows_a, i, 4, pad), batch(rows_h, i, 4, pad)) for i in range(5)]
    want = lora_state(ref_model)

    moved = max(((want[n] - w0[n]).norm() / want[n].norm()).item() for n in want)
    assert moved > 1e-3, "the weights barely moved: the comparison would prove nothing"
    err, name = worst_relative_error(got, want)
    assert err <= 1e-5, f"{impl}: {name} differs from Booster by {err:.3g} (relative L2)"

    logs = [r for r in trainer.state.log_history if "loss" in r and "harmful_loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in logs]),
                                   torch.stack([o[key] for o in outs]).float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")
    assert all(r["grad_norm"] > 0 for r in logs)   # the Trainer clipped the combined gradient


@pytest.mark.parametrize("every", [1, 3])
def test_perturb_aware_as_the_original_spells_it(tmp_path, data, every):
    """The original's arguments say perturb_aware="True" (a string) and rho: the Trainer takes the Booster + Vaccine
    update, and logs as `loss` the perturbed pass's loss, as the original returns it; every logged value is the
    mean over the updates since the last log (`every` of them)."""
    from dataclasses import dataclass, field

    @dataclass
    class StringFlagArguments(bf.BoosterTrainingArguments):
        perturb_aware: str = field(default="False")

    rows_a, rows_h, pad = data
    base = {k: v for k, v in vars(trainer_args(tmp_path, max_steps=3, logging_steps=every)).items() if k in
            {f.name for f in dataclasses.fields(bf.BoosterTrainingArguments) if f.init}}
    model, _ = make_model()
    args = StringFlagArguments(**{**base, "perturb_aware": "True", "rho": 2.0})
    trainer = bf.BoosterTrainer(model=model, args=args, train_dataset=rows_a, harmful_dataset=rows_h,
                                data_collator=FixedLengthCollator(pad, MAX_LEN))
    trainer.train()

    ref_model, _ = make_model()
    booster = bf.Booster(ref_model, bf.BoosterConfig(lr=LR, weight_decay=0.1, perturb_aware=True, rho=2.0))
    outs = [booster.step(batch(rows_a, i, 4, pad), batch(rows_h, i, 4, pad)) for i in range(3)]
    err, name = worst_relative_error(lora_state(model), lora_state(ref_model))
    assert err <= 1e-5, f"{name} differs from Booster(perturb_aware) by {err:.3g}"
    logs = [r for r in trainer.state.log_history if "harmful_loss" in r]
    assert len(logs) == 3 // every
    for key, logged in (("loss_perturbed", "loss"), ("loss", "loss_unperturbed"), ("harmful_loss", "harmful_loss")):
        per_step = torch.stack([o[key] for o in outs]).float()
        torch.testing.assert_close(torch.tensor([r[logged] for r in logs]), per_step.view(-1, every).mean(1),
                                   rtol=1e-5, atol=1e-6)
    assert all(r["loss"] > r["loss_unperturbed"] for r in logs)


def test_a_seq2seq_collator_trains_as_the_fixed_length_one(tmp_path, data):
    """Rows as a tokenised HF dataset holds them (input_ids and labels of different lengths) with transformers'
    DataCollatorForSeq2Seq, which pads each batch to its longest row: the same updates as FixedLengthCollator's
    (the engine computes no pad position either way)."""
    from transformers import DataCollatorForSeq2Seq

    _, tok = make_model()
    align, harmful = load_safety_data("builtin", "train")
    rows = [[{k: r[k] for k in ("input_ids", "labels")} for r in encode_all(tok, part, 256)[0]]
            for part in (align[:12], harmful[100:112])]
    assert len({len(r["input_ids"]) for r in rows[0]}) > 1, "rows of one length would prove nothing"
    models = []
    for collator in (FixedLengthCollator(tok.pad_token_id, 256), DataCollatorForSeq2Seq(tok)):
        model, _ = make_model()
        bf.BoosterTrainer(model=model, args=trainer_args(tmp_path / type(collator).__name__, max_steps=3),
                          train_dataset=rows[0], harmful_dataset=rows[1], data_collator=collator).train()
        models.append(model)
    err, name = worst_relative_error(lora_state(models[1]), lora_state(models[0]))
    assert err <= 1e-5, f"{name} differs by {err:.3g}"


def test_init_path_and_missing_harmful(tmp_path, data):
    """The original's API: its own TrainingArguments subclass (with `lamb`, `alpha`, ...), no harmful data in the
    constructor, then `trainer.init(harmful_dataset)`: code written for the original swaps in by the import, of
    the original's class name too."""
    assert bf.BoosterAlignmentTrainer is bf.BoosterTrainer
    rows_a, rows_h, pad = data
    base = vars(trainer_args(tmp_path, max_steps=2))
    kw = {k: base[k] for k in ("output_dir", "per_device_train_batch_size", "max_steps", "learning_rate",
                               "weight_decay", "lr_scheduler_type", "train_sampling_strategy", "use_cpu",
                               "report_to", "save_strategy", "logging_steps", "disable_tqdm", "seed")}

    def trainer():
        model, _ = make_model()
        return bf.BoosterAlignmentTrainer(model=model, args=OriginalArguments(**kw), train_dataset=rows_a,
                                          data_collator=FixedLengthCollator(pad, MAX_LEN))

    t = trainer()
    with pytest.raises(ValueError, match="harmful"):
        t.train()
    t = trainer()
    t.init(rows_h)
    t.train()
    assert [r["step"] for r in t.state.log_history if "harmful_loss" in r] == [1, 2]


def test_bad_arguments(tmp_path, data):
    with pytest.raises(ValueError, match="booster_impl"):
        trainer_args(tmp_path, booster_impl="nope")
    with pytest.raises(ValueError, match="alpha"):
        trainer_args(tmp_path, alpha=0)
    with pytest.raises(ValueError, match="perturb_aware must be True or False"):
        trainer_args(tmp_path, perturb_aware="yes")  # the original would read it as off, silently
    with pytest.raises(ValueError, match="rho must be a finite number"):
        trainer_args(tmp_path, rho=float("inf"))
    with pytest.raises(ValueError, match="^learning_rate must be a finite number > 0, got 0"):
        trainer_args(tmp_path, learning_rate=0.0)  # in the Trainer's name, when the arguments are made
    with pytest.raises(ValueError, match=r"^adam_beta1 and adam_beta2 must lie in \[0, 1\), got \(1.5, 0.999\)"):
        trainer_args(tmp_path, adam_beta1=1.5)
    model, _ = make_model()
    with pytest.raises(TypeError, match="lamb"):
        bf.BoosterTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"))


def test_label_smoothing_is_refused(tmp_path, data):
    """The engine computes plain cross-entropy: label smoothing would be ignored, so it is refused."""
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make_trainer(tmp_path, data, label_smoothing_factor=0.1)


def test_a_loss_of_the_users_own_is_refused(tmp_path, data):
    """The original ran every pass through Trainer.compute_loss; the engine runs its own cross-entropy, so a
    compute_loss_func or a subclass's compute_loss (each would be ignored in training) is refused."""
    rows_a, rows_h, pad = data

    def own_loss(outputs, labels, num_items_in_batch=None):
        raise AssertionError("never called in training")

    class OwnLoss(bf.BoosterTrainer):
        def compute_loss(self, model, inputs, **kw):
            raise AssertionError("never called in training")

    for cls, extra, why in ((bf.BoosterTrainer, {"compute_loss_func": own_loss}, "compute_loss_func"),
                            (OwnLoss, {}, "a subclass's compute_loss")):
        with pytest.raises(ValueError, match=f"does not support {why}"):
            cls(model=make_model()[0], args=trainer_args(tmp_path), train_dataset=rows_a, harmful_dataset=rows_h,
                data_collator=FixedLengthCollator(pad, MAX_LEN), **extra)


def test_a_full_precision_cast_for_evaluation_is_refused(tmp_path, data):
    """bf16_full_eval casts the whole model, LoRA weights included, which then no longer share the engine's fp32
    flat buffer (a later train() would step a buffer the model does not read)."""
    with pytest.raises(ValueError, match="bf16_full_eval / fp16_full_eval"):
        make_trainer(tmp_path, data, bf16_full_eval=True)


@pytest.mark.parametrize("kw, why", [({"auto_find_batch_size": True}, "auto_find_batch_size"),
                                     ({"optim_args": "amsgrad=True"}, "optim_args / optim_target_modules"),
                                     ({"use_liger_kernel": True}, "use_liger_kernel")])
def test_arguments_the_engine_would_ignore_are_refused(tmp_path, data, kw, why):
    with pytest.raises(ValueError, match=f"does not support {why}"):
        make_trainer(tmp_path, data, **kw)


def test_liger_is_refused_before_the_trainers_own_init(tmp_path, data, monkeypatch):
    """use_liger_kernel on arguments that did not check it themselves (the original's plain TrainingArguments) is
    refused before transformers' Trainer.__init__ runs, which on some versions applies Liger to the model there (or,
    without the package, fails with an ImportError)."""
    from transformers import Trainer

    args = trainer_args(tmp_path)
    args.use_liger_kernel = True  # set after the arguments' own checks, as a plain TrainingArguments carries it
    ran = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: ran.append(True))
    with pytest.raises(ValueError, match="does not support use_liger_kernel"):
        bf.BoosterTrainer(model=make_model()[0], args=args, train_dataset=data[0])
    assert not ran


def test_the_reference_engine_refuses_several_processes(tmp_path, data, monkeypatch):
    """The reference engine all-reduces nothing (the original relies on DDP's wrapper, which the engine's passes
    bypass): with several processes each would train on its own shard. Refused, in the Trainer and in Booster."""
    import torch.distributed as dist

    rows_a, rows_h, pad = data
    args = trainer_args(tmp_path, booster_impl="reference")
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="booster_impl='reference' with several processes"):
        bf.BoosterTrainer(model=make_model()[0], args=args, train_dataset=rows_a, harmful_dataset=rows_h,
                          data_collator=FixedLengthCollator(pad, MAX_LEN))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="impl='reference' runs in one process"):
        bf.Booster(make_model()[0], bf.BoosterConfig(impl="reference"))


class _Recorder(FixedLengthCollator):
    """The train collator, recording each batch's set ("a" or "h") and rows (by their token ids)."""

    def __init__(self, pad, seen):
        super().__init__(pad, MAX_LEN)
        self.seen = seen

    def __call__(self, rows):
        self.seen.append((rows[0]["set"], tuple(tuple(r["input_ids"]) for r in rows)))
        return super().__call__([{k: v for k, v in r.items() if k != "set"} for r in rows])


def test_harmful_rows_are_shuffled_on_their_own(tmp_path, data):
    """With random sampling and sets of the same length (BeaverTails' refusal and harmful rows share prompts),
    the harmful loader must not draw the train loader's order: its own seed, a new order each pass."""
    rows_a, _, pad = data
    n = 12
    seen = []
    model, _ = make_model()
    args = trainer_args(tmp_path, train_sampling_strategy="random", max_steps=6, remove_unused_columns=False)
    trainer = bf.BoosterTrainer(model=model, args=args,
                                train_dataset=[{**r, "set": "a"} for r in rows_a[:n]],
                                harmful_dataset=[{**r, "set": "h"} for r in rows_a[:n]],  # the same rows
                                data_collator=_Recorder(pad, seen))
    trainer.train()
    align, harmful = ([rows for s, rows in seen if s == which] for which in "ah")
    assert len(harmful) == 6 and align[:6] != harmful, "the harmful batches repeat the alignment batches' rows"
    assert harmful[:3] != harmful[3:], "the second pass over the harmful rows repeats the first's order"
    assert sorted(sum(harmful[:3], ())) == sorted(sum(align[:3], ())), "a pass must cover every row once"


@pytest.mark.parametrize("sampling, accum, rows, dropout, lost", [
    ("random", 1, 24, 0.0, False), ("sequential", 1, 24, 0.0, False), ("random", 2, 20, 0.0, False),
    ("random", 1, 24, 0.1, False), ("random", 2, 24, 0.0, True)])
def test_resume_from_checkpoint_continues_the_harmful_stream(tmp_path, data, sampling, accum, rows, dropout, lost,
                                                             caplog):
    """train(resume_from_checkpoint=...) gives the uninterrupted run's updates: the harmful loader continues
    where the checkpoint left it (here inside its second pass: 3 batches a pass; with accumulation over 5
    micro-batches an epoch, the epoch's last update takes one micro-batch, not two). With LoRA dropout the
    masks must be the same too: the harmful passes, which start at other steps in the resumed run, must not
    draw from the random state the dropout draws from. A checkpoint without the stream's file (`lost`: one
    from elsewhere) is resumed after an estimate, one draw per micro-batch, exact where every update took all
    of its micro-batches, and says so."""
    from booster_fast.hf_trainer import HARMFUL_STATE

    rows_a, rows_h, pad = data
    runs = {}
    for name, resume in (("full", None), ("resumed", "checkpoint-4")):
        if resume and lost:
            (tmp_path / "run" / resume / HARMFUL_STATE).unlink()
        model, _ = make_model(dropout)
        args = trainer_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=4, gradient_accumulation_steps=accum,
                            train_sampling_strategy=sampling, output_dir=str(tmp_path / "run"))
        trainer = bf.BoosterTrainer(model=model, args=args, train_dataset=rows_a[:rows], harmful_dataset=rows_h[:12],
                                    data_collator=FixedLengthCollator(pad, MAX_LEN))
        with caplog.at_level(logging.WARNING, logger="booster_fast"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "run" / resume) if resume else None)
        runs[name] = lora_state(model), [r["harmful_loss"] for r in trainer.state.log_history if "harmful_loss" in r]
    warned = [r.getMessage() for r in caplog.records if HARMFUL_STATE in r.getMessage()]
    assert len(warned) == lost and (not lost or f"after an estimated {4 * accum} batches" in warned[0])
    # the resumed run's log history holds the checkpoint's first 4 steps, then its own 2
    assert runs["resumed"][1] == runs["full"][1], (runs["resumed"][1], runs["full"][1])
    err, name = worst_relative_error(runs["resumed"][0], runs["full"][0])
    assert err == 0.0, f"{name}: resumed weights differ by {err:.3g}"


def test_an_iterable_harmful_set_streams(tmp_path, data):
    """A harmful IterableDataset (no length) is drawn from as a stream."""
    rows_a, rows_h, pad = data

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows_h[:12])

    trainer, _ = make_trainer(tmp_path, data, harmful=False, max_steps=2)
    trainer.init(Stream())
    trainer.train()
    assert len([r for r in trainer.state.log_history if "harmful_loss" in r]) == 2


class GradCapture:
    """Trainer callback: the combined gradient after the Trainer's clipping, before each optimizer step."""

    def __init__(self):
        self.trainer, self.grads = None, []

    def __getattr__(self, name):          # every other TrainerCallback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append(self.trainer.engine.flat.G_f.clone())


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data):
    """2 micro-batches of 2 rows (harmful: 2 + 2) per update == one batch of 4 (harmful 4).

    Compared on the clipped combined gradient of the first update, not on the weights after it: Adam's first
    step is lr·g/(|g|+ε), so a coordinate whose gradient is at the fp32 noise level of the sum (~1e-7·‖g‖) can
    flip sign and move by 2·lr whatever the tolerance; the gradient itself carries only summation-order noise (the
    micro-batches are summed in a different order than the rows of one batch): ~1e-7 per pass, ~2e-6 measured on
    the combined gradient, whose λ(∇h(w) − ∇h(w̃)) is a difference of two close vectors; hence 1e-5.
    The weights after 2 updates are then compared with `Booster` fed the same micro-batches as lists (the
    engine's own accumulation: the same sums in the same order), at the fp32 tolerance of the 5-step test.
    """
    rows_a, rows_h, pad = data
    cap = GradCapture()
    trainer, model = make_trainer(tmp_path, data, callbacks=[cap], per_device_train_batch_size=2,
                                  harmful_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    cap.trainer = trainer
    trainer.train()
    assert len(cap.grads) == 2

    # one big batch: the same 4 + 4 rows, unclipped combined gradient from the engine, clipped as the Trainer does
    ref_model, _ = make_model()
    big = bf.Booster(ref_model, bf.BoosterConfig(lr=LR, weight_decay=0.1, max_grad_norm=0.0, skip_nonfinite=False))
    big.step(batch(rows_a, 0, 4, pad), batch(rows_h, 0, 4, pad))
    g = big.engine.flat.G_f.clone()
    g *= (1.0 / (g.norm() + 1e-6)).clamp(max=1.0)
    assert g.norm() > 0
    err = ((cap.grads[0] - g).norm() / g.norm()).item()
    assert err <= 1e-5, f"accumulated gradient differs from the big batch's by {err:.3g} (relative L2)"

    # two updates == Booster with the same micro-batches as lists
    lst_model, _ = make_model()
    lst = bf.Booster(lst_model, bf.BoosterConfig(lr=LR, weight_decay=0.1, max_grad_norm=1.0))
    for u in range(2):
        lst.step([batch(rows_a, 2 * u, 2, pad), batch(rows_a, 2 * u + 1, 2, pad)],
                 [batch(rows_h, 2 * u, 2, pad), batch(rows_h, 2 * u + 1, 2, pad)])
    err, name = worst_relative_error(lora_state(model), lora_state(lst_model))
    assert err <= 1e-5, f"{name} differs by {err:.3g} after 2 accumulated updates (relative L2)"
    logs = [r for r in trainer.state.log_history if "harmful_loss" in r]
    assert [r["step"] for r in logs] == [1, 2]


DDP_WORKER = r'''
import sys, torch, booster_fast as bf
from booster_fast.data import encode_all, load_safety_data
from booster_fast.hf_trainer import FixedLengthCollator
out, seed, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok = bf.load_model("tiny", seed=seed, device="cpu")
torch.manual_seed(seed)
model = bf.add_lora(model, r=8, alpha=16)
g = torch.Generator().manual_seed(seed + 1)  # make_model's random LoRA B (test_fast.randomize_lora_b_)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
align, harmful = load_safety_data("builtin", "train")
rows_a, _ = encode_all(tok, align[:48], max_len)
rows_h, _ = encode_all(tok, harmful[100:148], max_len)

class Recording(bf.BoosterTrainer):
    seen = []
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(("align", {k: v.clone() for k, v in inputs.items()}))
        return super().training_step(model, inputs, num_items_in_batch)
    def sample_from_harmful(self):
        b = super().sample_from_harmful()
        self.seen.append(("harmful", {k: v.clone() for k, v in b.items()}))
        return b

args = bf.BoosterTrainingArguments(output_dir=out + "/hf", per_device_train_batch_size=2, harmful_batch_size=2,
    max_steps=2, learning_rate=5e-4, weight_decay=0.1, lr_scheduler_type="constant", max_grad_norm=1.0,
    train_sampling_strategy="sequential", use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
    logging_steps=1, disable_tqdm=True, seed=seed, dataloader_num_workers=0)
trainer = Recording(model=model, args=args, train_dataset=rows_a,
                    data_collator=FixedLengthCollator(tok.pad_token_id, max_len), harmful_dataset=rows_h)
from transformers import TrainerCallback
class Grads(TrainerCallback):   # the clipped combined gradient, before each optimizer step
    def on_pre_optimizer_step(self, args, state, control, **kw):
        Recording.seen.append(("grad", {"G_f": trainer.engine.flat.G_f.clone()}))
trainer.add_callback(Grads())
trainer.train()
rank = torch.distributed.get_rank()
state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
torch.save({"seen": trainer.seen, "state": state, "world": torch.distributed.get_world_size(),
            "logs": trainer.state.log_history}, f"{out}/rank{rank}.pt")
# an explicit end: a gloo group left to the interpreter's exit can abort a worker ("terminate called without an
# active exception") while its threads are torn down; and no teardown at all once the results are written
torch.distributed.barrier()
torch.distributed.destroy_process_group()
import os, sys
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_on_the_union_batch(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU), 2 rows per rank and update == one process on the union batch
    (rank 0's rows then rank 1's, harmful likewise): the clipped combined gradient of the first update within
    1e-5 (summation-order noise: per-rank sums all-reduced vs one sum), identical weights on both ranks, and
    the weights after 2 updates within 1e-3. The looser weight tolerance is Adam's: its first step is
    lr·g/(|g|+ε), so the ~1e-6 relative gradient noise moves near-zero coordinates by up to 2·lr (measured:
    1.4e-4 after 2 updates); a missing or double all-reduce, or a lost clip, is off by O(1)."""
    import os
    import signal
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    root = str(Path(__file__).resolve().parents[1])        # this checkout, whatever the installed copy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path), str(SEED), str(MAX_LEN)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group: a hang kills the workers too
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2
    for n in r0["state"]:
        assert torch.equal(r0["state"][n], r1["state"][n]), f"ranks disagree on {n}"

    def seen(rank, kind):
        return [b for k, b in rank["seen"] if k == kind]

    def union(u, kind):
        b0, b1 = seen(r0, kind)[u], seen(r1, kind)[u]
        return {k: torch.cat([b0[k], b1[k]]) for k in b0}

    # first update's combined gradient: the engine unclipped on the union batch, clipped as the Trainer does
    one_model, _ = make_model()
    one = bf.Booster(one_model, bf.BoosterConfig(lr=LR, weight_decay=0.1, max_grad_norm=0.0, skip_nonfinite=False))
    one.step(union(0, "align"), union(0, "harmful"))
    g = one.engine.flat.G_f.clone()
    g *= (1.0 / (g.norm() + 1e-6)).clamp(max=1.0)
    err = ((seen(r0, "grad")[0]["G_f"] - g).norm() / g.norm()).item()
    assert err <= 1e-5, f"2 ranks vs 1 process: first combined gradient differs by {err:.3g} (relative L2)"

    ref_model, _ = make_model()
    booster = bf.Booster(ref_model, bf.BoosterConfig(lr=LR, weight_decay=0.1, max_grad_norm=1.0))
    for u in range(2):
        booster.step(union(u, "align"), union(u, "harmful"))
    err, name = worst_relative_error(r0["state"], lora_state(ref_model))
    assert err <= 1e-3, f"2 ranks vs 1 process on the union batch: {name} differs by {err:.3g} (relative L2)"


def test_trainer_packs_the_fast_engines_batches(tmp_path):
    """With the fast engine the Trainer packs each update's micro-batches (here ~60% real tokens, 2 micro-batches
    per update): the same losses and weights as without packing, and the engine really got packed batches."""
    _, tok = bf.load_model("tiny", device="cpu")
    align, harmful = load_safety_data("builtin", "train")
    long = 160
    data = (encode_all(tok, align[:32], long)[0], encode_all(tok, harmful[100:132], long)[0], tok.pad_token_id)
    runs = {}
    for packing in (True, False):
        model, _ = make_model()
        args = trainer_args(tmp_path / str(packing), max_steps=2, gradient_accumulation_steps=2, packing=packing)
        trainer = bf.BoosterTrainer(model=model, args=args, train_dataset=data[0], harmful_dataset=data[1],
                                    data_collator=FixedLengthCollator(data[2], long))
        trainer.create_optimizer()
        seen, step = [], trainer.engine.step
        trainer.engine.step = lambda a, h: (seen.extend(a + h), step(a, h))[1]
        trainer.train()
        logs = [r for r in trainer.state.log_history if "harmful_loss" in r]
        runs[packing] = lora_state(model), logs, seen
    assert all("cu_seqlens" in b for b in runs[True][2]), "the engine got padded micro-batches"
    assert not any("cu_seqlens" in b or "attention_mask" in b for b in runs[False][2])
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in runs[True][1]]),
                                   torch.tensor([r[key] for r in runs[False][1]]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")
    # the weights only loosely: Adam's first steps turn fp32 summation-order noise in near-zero gradient
    # coordinates into visible changes (see the note above test_grad_accumulation_is_exact in test_fast.py)
    err, name = worst_relative_error(runs[True][0], runs[False][0])
    assert err <= 1e-3, f"packing changed {name} by {err:.3g} after 2 updates"


def test_fast_engine_gets_right_padded_batches_without_masks():
    """BoosterTrainer drops the masks of an update's micro-batches only when every one is right-padded and no
    pad carries a label."""
    from booster_fast.hf_batches import without_masks_if_right_padded

    def batch(mask_rows):
        mask = torch.tensor(mask_rows)
        return {"input_ids": torch.ones_like(mask), "labels": torch.ones_like(mask).masked_fill(mask == 0, -100),
                "attention_mask": mask}

    right, left = batch([[1, 1, 0], [1, 1, 1]]), batch([[0, 1, 1], [1, 1, 1]])
    align, harmful = without_masks_if_right_padded([right, right], [right])
    assert not any("attention_mask" in b for b in align + harmful) and set(align[0]) == {"input_ids", "labels"}
    align, harmful = without_masks_if_right_padded([right], [left])
    assert all("attention_mask" in b for b in align + harmful)
    labelled = dict(right, labels=torch.ones_like(right["labels"]))  # the pad's label is 1: the mask must stay
    align, harmful = without_masks_if_right_padded([right], [labelled])
    assert all("attention_mask" in b for b in align + harmful)


def test_trainer_packs_only_what_packs_exactly():
    """packed_if_exact packs an update's micro-batches, unless one is left-padded or labels a pad: then all of
    them keep their masks."""
    from booster_fast.hf_batches import packed_if_exact

    def batch(lengths, width=64):
        real = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        ids = torch.randint(1, 50, real.shape).masked_fill(~real, 0)
        return {"input_ids": ids, "labels": ids.masked_fill(~real, -100), "attention_mask": real.long()}

    good = batch([30, 5, 64, 1])  # 100 real of 256 positions: packing shrinks it
    align, harmful = packed_if_exact(([good], [good]), "cpu", None)
    assert all("cu_seqlens" in b for b in align + harmful)
    left = {k: v.flip(1) for k, v in good.items()}
    labelled = dict(good, labels=good["labels"].masked_fill(good["attention_mask"] == 0, 7))
    for bad in (left, labelled):
        align, harmful = packed_if_exact(([good], [bad]), "cpu", None)
        assert align[0] is good and harmful[0] is bad, "a batch packing refuses must leave the update as it was"


def test_a_second_train_call_starts_with_fresh_metrics(tmp_path, data):
    """Updates after the last log of one `train()` must not leak into the next call's first log."""
    trainer, _ = make_trainer(tmp_path, data, max_steps=3, logging_steps=2)
    trainer.train()  # step 3 is not logged: its metrics stay accumulated
    seen, step = [], trainer.engine.step
    trainer.engine.step = lambda *a: seen.append(step(*a)) or seen[-1]
    trainer.args.max_steps = 2
    trainer.train()
    assert len(seen) == 2
    last = [r for r in trainer.state.log_history if "harmful_loss" in r][-1]
    want = float(torch.stack([o["harmful_loss"] for o in seen]).mean())
    assert last["harmful_loss"] == pytest.approx(want, rel=1e-6)


def test_tokenizer_keyword_as_the_original_passes_it(tmp_path, data):
    """The original builds its trainer with tokenizer=; transformers 5's Trainer only knows processing_class=. The
    tokenizer reaches the Trainer either way, and a run trains; giving both names is refused."""
    rows_a, rows_h, pad = data
    model, tok = make_model()
    trainer = bf.BoosterTrainer(model=model, tokenizer=tok, args=trainer_args(tmp_path, max_steps=1),
                                train_dataset=rows_a, harmful_dataset=rows_h,
                                data_collator=FixedLengthCollator(pad, MAX_LEN))
    assert trainer.processing_class is tok
    trainer.train()
    assert [r["step"] for r in trainer.state.log_history if "harmful_loss" in r] == [1]
    with pytest.raises(ValueError, match="tokenizer= or processing_class=, not both"):
        bf.BoosterTrainer(model=model, tokenizer=tok, processing_class=tok, args=trainer_args(tmp_path),
                          train_dataset=rows_a, data_collator=FixedLengthCollator(pad, MAX_LEN))


@pytest.mark.parametrize("optim", ["sgd", "adafactor", "adamw_bnb_8bit", "adamw_torch_4bit"])
def test_an_optimizer_other_than_adamw_is_refused(tmp_path, data, optim):
    """The engine always steps torch's AdamW: another `optim` would be ignored, so it is refused, by our arguments
    and, for the original's arguments class (a plain TrainingArguments), by the Trainer."""
    with pytest.raises(ValueError, match=f"optim='{optim}' is not supported: .*AdamW.*adamw_torch"):
        trainer_args(tmp_path, optim=optim)
    model, _ = make_model()
    args = OriginalArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optim=optim)
    with pytest.raises(ValueError, match=f"optim='{optim}' is not supported"):
        bf.BoosterTrainer(model=model, args=args, train_dataset=data[0])


def test_adamw_optims_and_hyperparameters_reach_the_engine(tmp_path, data):
    """optim "adamw_torch", "adamw_torch_fused" and the Trainer's default are taken; adam_beta1/2, adam_epsilon,
    learning_rate and weight_decay are those of the AdamW the Trainer steps, for both engines; optimizers= and
    optimizer_cls_and_kwargs= are refused (they would be ignored)."""
    default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    for optim in ("adamw_torch", "adamw_torch_fused", default):
        trainer_args(tmp_path, optim=optim)
    for impl in ("fast", "reference"):
        trainer, _ = make_trainer(tmp_path, data, booster_impl=impl, optim="adamw_torch", adam_beta1=0.8,
                                  adam_beta2=0.95, adam_epsilon=1e-6, learning_rate=3e-4, weight_decay=0.05)
        trainer.create_optimizer()
        assert trainer.optimizer is trainer.engine.optimizer
        (group,) = trainer.optimizer.param_groups
        assert isinstance(trainer.optimizer, torch.optim.AdamW)
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05), impl
        assert float(group["lr"]) == pytest.approx(3e-4), impl
    model, _ = make_model()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in ({"optimizers": (other, None)},
               {"optimizers": (None, torch.optim.lr_scheduler.LambdaLR(other, lambda step: 0.0))},  # (it stepped
               {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1})}):                   # nothing, unsaid)
        with pytest.raises(ValueError, match="builds its own optimizer"):
            bf.BoosterTrainer(model=model, args=trainer_args(tmp_path), train_dataset=data[0], **kw)


@pytest.mark.parametrize("value", [0, 2.5, 1.0, True, "2"])
def test_harmful_batch_size_must_be_a_positive_integer(tmp_path, value):
    """(2.5 or 1.0 failed inside torch's sampler when the Trainer was built; True meant 1.)"""
    with pytest.raises(ValueError, match="harmful_batch_size must be an integer >= 1, got"):
        trainer_args(tmp_path, harmful_batch_size=value)


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_max_grad_norm_that_would_switch_clipping_off_unsaid_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number >= 0"):
        trainer_args(tmp_path, max_grad_norm=value)


def test_max_grad_norm_none_means_no_clipping_as_in_transformers_4(tmp_path, data):
    """The original's transformers 4 took max_grad_norm=None as no clipping; transformers 5 compares it with 0 (a
    TypeError at the first update): None becomes 0, for our arguments and the original's class alike."""
    trainer, _ = make_trainer(tmp_path, data, max_grad_norm=None, max_steps=1)
    assert trainer.args.max_grad_norm == 0.0
    trainer.train()
    model, _ = make_model()
    args = OriginalArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=None)
    assert bf.BoosterTrainer(model=model, args=args, train_dataset=data[0]).args.max_grad_norm == 0.0


def test_a_checkpoint_of_a_plain_trainer_is_refused_in_one_line(tmp_path, data):
    """A checkpoint written by the Trainer itself (the original's) holds per-tensor AdamW groups, which the engine's
    one flat AdamW cannot take: one line saying so, not torch's "different number of parameter groups"."""
    from transformers import Trainer

    rows_a, _, pad = data
    model, _ = make_model()
    plain = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
                    train_dataset=rows_a, data_collator=FixedLengthCollator(pad, MAX_LEN))
    plain.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "optimizer.pt").is_file()
    trainer, _ = make_trainer(tmp_path, data, max_steps=2)
    with pytest.raises(ValueError, match=r"^resume: the optimizer state in .*checkpoint-1 does not fit this "
                                         r"trainer's optimizer \(the fast engine's AdamW holds one flat LoRA buffer; "
                                         r".*\); it was written by another trainer or engine: start a new run from its "
                                         r"adapter instead$"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_out_of_memory_while_resuming_is_raised_as_it_is(monkeypatch):
    """Out of memory while the optimizer state loads is the machine's limit, not another trainer's checkpoint: it
    is raised as it is (the CLI's exit 4), not turned into the "start a new run" refusal."""
    from transformers import Trainer

    def oom(self, checkpoint):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", oom)
    with pytest.raises(torch.OutOfMemoryError):
        bf.BoosterTrainer._load_optimizer_and_scheduler(object.__new__(bf.BoosterTrainer), "checkpoint-1")


class FlatGradCapture(GradCapture):
    """The combined gradient after the Trainer's clipping, as one vector over the LoRA parameters (either engine)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append(flat_grad(self.model))


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for _, p in sorted(model.named_parameters()) if p.requires_grad]).clone()


@pytest.mark.parametrize("impl, merge", [("fast", True), ("reference", None)])
def test_harmful_batch_size_other_than_the_alignment_batch(tmp_path, data, impl, merge):
    """harmful_batch_size=3 beside 2 alignment rows per micro-batch, 2 micro-batches per update: each micro-batch
    pulls one harmful micro-batch of 3 rows; the first update's combined gradient equals one big batch's (4 + 6
    rows: each loss divided by its own set's tokens over the whole update), and two updates equal `Booster` fed
    the same micro-batches as lists. The fast engine runs merged: [harmful ; alignment] in one pass, rows unequal."""
    rows_a, rows_h, pad = data
    model, _ = make_model()
    cap = FlatGradCapture(model)
    args = trainer_args(tmp_path, booster_impl=impl, merge_passes=merge, per_device_train_batch_size=2,
                        harmful_batch_size=3, gradient_accumulation_steps=2, max_steps=2)
    trainer = bf.BoosterTrainer(model=model, args=args, train_dataset=rows_a, harmful_dataset=rows_h,
                                data_collator=FixedLengthCollator(pad, MAX_LEN), callbacks=[cap])
    drawn, sample = [], trainer.sample_from_harmful

    def recording_sample():
        drawn.append(sample())
        return drawn[-1]

    trainer.sample_from_harmful = recording_sample
    trainer.train()
    assert [b["input_ids"].shape[0] for b in drawn] == [3, 3, 3, 3], "not one 3-row harmful batch per micro-batch"
    assert torch.equal(torch.cat([b["input_ids"] for b in drawn]), batch(rows_h, 0, 12, pad)["input_ids"])

    # one big batch: 4 alignment + 6 harmful rows; the engine's combined gradient unclipped, clipped as the Trainer
    big_model, _ = make_model()
    big = bf.Booster(big_model, bf.BoosterConfig(impl=impl, merge_passes=merge, lr=LR, weight_decay=0.1,
                                                 max_grad_norm=0.0, skip_nonfinite=False))
    big.engine._clip_and_update = lambda: torch.zeros(())   # leave the combined gradient in .grad
    big.step(batch(rows_a, 0, 4, pad), batch(rows_h, 0, 6, pad))
    g = flat_grad(big_model)
    g *= (1.0 / (g.norm() + 1e-6)).clamp(max=1.0)
    assert g.norm() > 0
    err = ((cap.grads[0] - g).norm() / g.norm()).item()
    assert err <= 1e-5, f"{impl}: accumulated gradient differs from the big batch's by {err:.3g} (relative L2)"

    lst_model, _ = make_model()
    lst = bf.Booster(lst_model, bf.BoosterConfig(impl=impl, merge_passes=merge, lr=LR, weight_decay=0.1,
                                                 max_grad_norm=1.0))
    for u in range(2):
        lst.step([batch(rows_a, 2 * u, 2, pad), batch(rows_a, 2 * u + 1, 2, pad)],
                 [batch(rows_h, 2 * u, 3, pad), batch(rows_h, 2 * u + 1, 3, pad)])
    err, name = worst_relative_error(lora_state(model), lora_state(lst_model))
    assert err <= 1e-5, f"{impl}: {name} differs by {err:.3g} after 2 updates with 3-row harmful batches"


def test_batches_the_step_would_train_wrongly_are_refused(tmp_path, data):
    """A collator that flattens rows (DataCollatorWithFlattening: position_ids restarting per example) or leaves
    out the labels: the step feeds the model input_ids, labels and the mask only, so such batches are refused in
    one clear error instead of being trained as something else."""
    rows_a, rows_h, pad = data
    plain = FixedLengthCollator(pad, MAX_LEN)

    def without_labels(rows):
        return {k: v for k, v in plain(rows).items() if k != "labels"}

    def labels_none(rows):  # what a seq2seq collator gives rows without labels
        return {**plain(rows), "labels": None}

    def with_plain_positions(rows):
        out = plain(rows)
        out["position_ids"] = torch.arange(MAX_LEN).expand_as(out["input_ids"])
        return out

    def with_restarting_positions(rows):  # flattened examples: positions restart within a row
        out = plain(rows)
        out["position_ids"] = (torch.arange(MAX_LEN) % 16).expand_as(out["input_ids"])
        return out

    model, _ = make_model()  # 0, 1, 2, ... in every row is what the engine assumes: accepted
    bf.BoosterTrainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=rows_a,
                      harmful_dataset=rows_h, data_collator=with_plain_positions).train()
    def response_labels(rows):  # a seq2seq collator's labels: the answer only, shorter than the row
        out = plain(rows)
        return {**out, "labels": out["labels"][:, -3:]}

    def float_labels(rows):
        out = plain(rows)
        return {**out, "labels": out["labels"].float()}

    def rows_of_one(rows):  # rows stored as [1, n] tensors, stacked by default_data_collator: [rows, 1, n]
        out = plain(rows)
        return {k: v[:, None] for k, v in out.items()}

    for collator, message in ((with_restarting_positions, "position_ids"),
                              (without_labels, "need input_ids and labels"),
                              (labels_none, "need input_ids and labels"),
                              (response_labels, r"labels of shape \(4, 3\), input_ids \(4, 64\): one per token expected"),
                              (float_labels, "labels are torch.float32, token ids are integers"),
                              (rows_of_one, r"input_ids of shape \(4, 1, 64\); \[rows >= 1, length >= 1\] expected")):
        model, _ = make_model()
        trainer = bf.BoosterTrainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=rows_a,
                                    harmful_dataset=rows_h, data_collator=collator)
        with pytest.raises(ValueError, match=message):
            trainer.train()


def test_an_empty_train_set_is_named(tmp_path, data):
    _, rows_h, pad = data
    model, _ = make_model()
    with pytest.raises(ValueError, match="BoosterTrainer: the train dataset has no rows"):
        bf.BoosterTrainer(model=model, args=trainer_args(tmp_path), train_dataset=[], harmful_dataset=rows_h,
                          data_collator=FixedLengthCollator(pad, MAX_LEN))


def test_a_harmful_set_too_small_for_one_batch_is_named(tmp_path, data):
    """Fewer harmful rows than one batch with drop_last (or none at all): an error that names the harmful set,
    at init, instead of a bare StopIteration in the first step."""
    rows_a, rows_h, pad = data
    for rows, kw in ((rows_h[:3], dict(dataloader_drop_last=True)), ([], {})):
        model, _ = make_model()
        trainer = bf.BoosterTrainer(model=model, args=trainer_args(tmp_path, max_steps=1, **kw), train_dataset=rows_a,
                                    data_collator=FixedLengthCollator(pad, MAX_LEN))
        with pytest.raises(ValueError, match=f"harmful dataset has {len(rows)} rows"):
            trainer.init(rows)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_harmful_sets_that_cannot_work_are_refused_at_init(tmp_path, data, impl):
    """A harmful set of columns (a tokenizer's dict output) was counted by its keys and failed in the DataLoader;
    one whose labels are all -100 (answers cut off by truncation) trained as plain SFT, harmful loss and gradient 0,
    without a word."""
    rows_a, rows_h, pad = data
    model, _ = make_model()
    trainer = bf.BoosterTrainer(model=model, args=trainer_args(tmp_path, max_steps=1, booster_impl=impl),
                                train_dataset=rows_a, data_collator=FixedLengthCollator(pad, MAX_LEN))
    columns = {"input_ids": [r["input_ids"] for r in rows_h], "labels": [r["labels"] for r in rows_h]}
    with pytest.raises(ValueError, match=r"the harmful dataset is a mapping \(input_ids, labels\); pass a list"):
        trainer.init(columns)
    unlabelled = [{**r, "labels": [-100] * len(r["labels"])} for r in rows_h]
    from datasets import Dataset

    for dataset in (unlabelled, Dataset.from_list(unlabelled)):
        with pytest.raises(ValueError, match="no harmful row has a label other than -100"):
            trainer.init(dataset)
    trainer.init(Dataset.from_list(rows_h))  # labelled: taken


def test_the_harmful_order_follows_data_seed(tmp_path, data):
    """data_seed orders the training rows in the Trainer; the harmful rows' own order follows it too (it
    followed seed only)."""
    rows_a, _, pad = data
    orders = []
    for data_seed in (1, 2, 1):
        seen = []
        model, _ = make_model()
        args = trainer_args(tmp_path, train_sampling_strategy="random", max_steps=3, remove_unused_columns=False,
                            data_seed=data_seed)
        bf.BoosterTrainer(model=model, args=args, train_dataset=[{**r, "set": "a"} for r in rows_a[:12]],
                          harmful_dataset=[{**r, "set": "h"} for r in rows_a[:12]],
                          data_collator=_Recorder(pad, seen)).train()
        orders.append([rows for s, rows in seen if s == "h"])
    assert orders[0] == orders[2] != orders[1]


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [5, 6, 7]}, "row 0 has no labels"),
    ({"input_ids": [5, 6, 7], "labels": "abc"}, "row 0's labels must be a flat list of integer token ids"),
    ({"input_ids": torch.tensor([[5, 6, 7]]), "labels": [5, 6, 7]}, "row 0's input_ids must be a flat list"),
    ({"input_ids": [5, 6, 7], "labels": [-99.3, 6.0, 7.0]}, "row 0's labels must be a flat list"),
])
def test_the_fixed_length_collator_names_a_row_it_cannot_use(row, message):
    """(A bare KeyError, int() errors, or a -99.3 label cut to -99 and an IndexError in the loss.)"""
    with pytest.raises(ValueError, match=f"FixedLengthCollator: {message}"):
        FixedLengthCollator(0, 8)([row])
    out = FixedLengthCollator(0, 8)([{"input_ids": torch.tensor([5, 6, 7]), "labels": [-100, 6, 7]}])
    assert out["input_ids"].shape == (1, 8) and out["labels"][0, :3].tolist() == [-100, 6, 7]


def test_frozen_lora_weights_are_named_as_such(tmp_path):
    """An adapter loaded without is_trainable=True has LoRA weights, frozen: the engines say that, not "call
    add_lora first"."""
    from peft import PeftModel

    model, _ = make_model()
    model.save_pretrained(str(tmp_path / "adapter"))
    base, _ = bf.load_model("tiny", seed=SEED, device="cpu")
    frozen = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    for impl in ("fast", "reference"):
        with pytest.raises(ValueError, match="LoRA weights are frozen .*is_trainable=True"):
            bf.Booster(frozen, bf.BoosterConfig(impl=impl))


def test_train_twice_with_model_init_builds_a_new_engine(tmp_path, data):
    """train() with model_init rebuilds the model and drops the optimizer (hyperparameter_search does this): the
    second call gets an engine of its own on the new model and trains it as the first call trained the first."""
    rows_a, rows_h, pad = data
    args = trainer_args(tmp_path, max_steps=2, train_sampling_strategy="random")  # the harmful order reshuffles
    trainer = bf.BoosterTrainer(model_init=lambda: make_model()[0], args=args, train_dataset=rows_a,
                                harmful_dataset=rows_h, data_collator=FixedLengthCollator(pad, MAX_LEN))
    trainer.train()
    first_engine, first = trainer.engine, lora_state(trainer.model)
    trainer.train()
    assert trainer.engine is not first_engine and trainer.engine.model is trainer.model
    err, name = worst_relative_error(lora_state(trainer.model), first)
    assert err == 0, f"{name}: the second run from a fresh model differs from the first by {err:.3g}"


def test_a_non_finite_metric_is_logged_not_dropped(tmp_path, data):
    """A diverged run logs its NaN/inf harmful metrics (it used to drop every NaN, meant only for the perturbed
    loss without the meta term, which stays out)."""
    trainer, _ = make_trainer(tmp_path, data, max_steps=1)
    trainer.train()
    nan = torch.tensor(float("nan"))
    trainer._metric_sum, trainer._metric_count = torch.stack([nan, torch.tensor(1.0), nan]), 1
    trainer.state.log_history.clear()
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert math.isnan(logged["harmful_loss"]) and math.isnan(logged["harmful_grad_norm"])
    trainer, _ = make_trainer(tmp_path, data, max_steps=1, meta_term=False)
    trainer.train()
    assert all("harmful_loss_perturbed" not in r for r in trainer.state.log_history)


def test_the_trainers_batches_follow_the_models_sliding_window(data):
    """A batch with a row longer than the model's sliding window goes padded (the model's own windowed mask) and
    without its mask where it is right-padded; one within the window packs."""
    from booster_fast.hf_batches import packed_if_exact

    rows_a, _, pad = data
    batch = FixedLengthCollator(pad, 2 * MAX_LEN)(rows_a[:2])  # half pads: packing shrinks it
    longest = int(batch["attention_mask"].sum(1).max())
    assert 24 < longest <= MAX_LEN
    (wide,), = packed_if_exact(([batch],), "cpu", window=longest)
    (narrow,), = packed_if_exact(([batch],), "cpu", window=24)
    assert "cu_seqlens" in wide and wide["max_seqlen"] <= longest
    assert "cu_seqlens" not in narrow and torch.equal(narrow["input_ids"], batch["input_ids"])


def test_the_trainer_snippet_in_the_docs_runs(tmp_path, monkeypatch):
    """docs/usage.md's drop-in Trainer example is run as written, for 2 of its 20 steps, so that it stays true."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    start = text.index("```python", text.index("## The drop-in Trainer")) + len("```python")
    code = text[start:text.index("```", start)]
    assert "max_steps=20" in code
    monkeypatch.chdir(tmp_path)  # its output_dir is relative
    scope: dict = {}
    exec(compile(code.replace("max_steps=20", "max_steps=2"), "docs/usage.md (Trainer)", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the update reached the weights


def test_a_batch_without_input_ids_is_refused_by_name():
    """model_batch: input_ids and labels are both needed (a batch of inputs_embeds-only rows, say), in one line."""
    from booster_fast.hf_batches import model_batch

    ids = torch.ones(2, 4, dtype=torch.long)
    assert set(model_batch({"input_ids": ids, "labels": ids, "attention_mask": ids, "extra": ids})) == {
        "input_ids", "labels", "attention_mask"}
    for batch in ({"labels": ids, "attention_mask": ids}, {"input_ids": ids}):
        with pytest.raises(ValueError, match="the harmful batches need input_ids and labels"):
            model_batch(batch, "harmful")


def test_perturb_aware_strings_read_as_the_original_meant():
    from booster_fast.hf_trainer import _perturb_aware

    assert _perturb_aware(SimpleNamespace(perturb_aware="True")) is True
    assert _perturb_aware(SimpleNamespace(perturb_aware="False")) is False     # the string "False" is off
    assert _perturb_aware(SimpleNamespace(perturb_aware=False)) is False
    assert _perturb_aware(SimpleNamespace()) is False
