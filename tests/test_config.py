"""BoosterConfig's defaults and checks, and the checks of the batches a step is given: a value or a batch that
cannot work is a one-line ValueError, not a silent no-op or a traceback from deep inside the model."""
from __future__ import annotations

import pytest
import torch

import booster_fast as bf
from booster_fast.run_args import _cli_defaults

# the paper's hyperparameters (Huang et al., 2409.01586, and the original scripts): λ 5, α 0.1, lr 5e-4, AdamW
# weight decay 0.1, clipping at 1.0 (the HF Trainer's), ε 1e-7 on ‖∇h‖; Booster + Vaccine's ρ 5
PAPER = {"lamb": 5.0, "alpha": 0.1, "lr": 5e-4, "weight_decay": 0.1, "max_grad_norm": 1.0, "perturb_eps": 1e-7,
         "rho": 5.0}


def test_defaults_are_the_papers_in_the_config_and_on_the_command_line():
    cfg, cli = bf.BoosterConfig(), _cli_defaults("tiny")
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    assert {k: cli[k] for k in PAPER if k in cli} == {k: v for k, v in PAPER.items() if k in cli}
    assert {"lamb", "alpha", "lr", "weight_decay", "max_grad_norm", "rho"} <= set(cli)


@pytest.mark.parametrize("kwargs, message", [
    ({"packing": "False"}, "packing must be True, False or None"),
    ({"merge_passes": "False"}, "merge_passes must be True, False or None"),
    ({"fused_ops": 1}, "fused_ops must be True, False or None"),
    ({"perturb_eps": float("nan")}, "perturb_eps must be a finite number > 0"),
    ({"perturb_eps": 0.0}, "perturb_eps must be a finite number > 0"),
    ({"adam_eps": -1e-8}, "adam_eps must be a finite number >= 0"),
    ({"adam_eps": float("inf")}, "adam_eps must be a finite number >= 0"),
])
def test_values_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bf.BoosterConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny():
    model, tok = bf.load_model("tiny", dtype=torch.float32, seed=0, device="cpu")
    torch.manual_seed(0)
    return bf.add_lora(model, r=4, alpha=8), tok


def _batch(rows=2, length=12, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _without(batch, key):
    return {k: v for k, v in batch.items() if k != key}


BAD_BATCHES = {
    "no labels": (lambda b: _without(b, "labels"), "align_batch has no labels tensor"),
    "no input_ids": (lambda b: _without(b, "input_ids"), "align_batch has no input_ids tensor"),
    "narrow labels": (lambda b: {**b, "labels": b["labels"][:, :5]}, r"labels of shape \(2, 5\), input_ids \(2, 12\)"),
    "mask of another shape": (lambda b: {**b, "attention_mask": b["attention_mask"][:1]}, "attention_mask of shape"),
    "no rows": (lambda b: {k: v[:0] for k, v in b.items()}, r"input_ids of shape \(0, 12\)"),
    "int32 labels": (lambda b: {**b, "labels": b["labels"].int()}, "labels are torch.int32"),
    "float ids": (lambda b: {**b, "input_ids": b["input_ids"].float()}, "input_ids are torch.float32"),
    "meta device": (lambda b: {k: v.to("meta") for k, v in b.items()}, "align_batch is on meta, the model on cpu"),
    "not a dict": (lambda b: list(b.values()), "a dict of tensors"),
}


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_batch_a_step_cannot_run_is_one_value_error(tiny, impl, case):
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    make, message = BAD_BATCHES[case]
    with pytest.raises(ValueError, match=message):
        booster.step(make(_batch()), _batch(seed=1))
    with pytest.raises(ValueError, match=message.replace("align_batch", "harmful_batch")):
        booster.step(_batch(), make(_batch(seed=1)))
    with pytest.raises(ValueError, match=message):
        booster.sft_step(make(_batch()))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad), "a step ran"


TO_DEVICE_CASES = {k: (make, message.replace("align_batch", "batch")) for k, (make, message) in BAD_BATCHES.items()
                   if k != "meta device"}  # (to_device moves a batch from any device)
TO_DEVICE_CASES.update({
    "ids past the vocabulary": (lambda b: {**b, "input_ids": b["input_ids"].clone().index_fill_(1, torch.tensor([3]),
                                                                                             2485)},
                                "input_ids hold 2485, outside the model's 2485 token embeddings"),
    "a negative label": (lambda b: {**b, "labels": b["labels"].clone().fill_(-1)},
                         "labels hold -1; a label is a token id below 2485 .*or -100 where no token is learnt"),
    "a label past the head": (lambda b: {**b, "labels": b["labels"].clone().fill_(3000)}, "labels hold 3000"),
})


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", sorted(TO_DEVICE_CASES))
def test_to_device_checks_the_batch_it_prepares(tiny, impl, case):
    """Booster.to_device checks a collated batch as a step does, and the token ids too, on the CPU where reading
    them is free (ids past the embeddings failed with an IndexError deep inside the model; a packed batch skipped
    the step's own checks, so float labels failed in cross_entropy and a missing one with a KeyError)."""
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl))
    make, message = TO_DEVICE_CASES[case]
    with pytest.raises(ValueError, match=message):
        booster.to_device(make(_batch()), "cpu")


def test_to_device_output_is_not_prepared_again(tiny):
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl="fast", grad_accum=2))
    padded = _batch(rows=4)
    padded["attention_mask"][:, 8:], padded["labels"][:, 8:] = 0, -100  # rows of 8 and 4 tokens: the engine
    padded["attention_mask"][1::2, 4:], padded["labels"][1::2, 4:] = 0, -100  # packs them
    for prepared in (booster.to_device(padded, "cpu"), booster.to_device(padded, "cpu")[0]):
        with pytest.raises(ValueError, match="to_device's output already: pass it to step as it is"):
            booster.to_device(prepared, "cpu")
    for cfg in ({"lamb": 5.0}, {}):  # (an empty dict built with the defaults)
        with pytest.raises(ValueError, match="cfg must be a BoosterConfig, got dict"):
            bf.Booster(model, cfg)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_check_length_and_load_state_dict_refuse_what_they_cannot_use(tiny, impl):
    """(check_length("x") returned without a word where the model's RoPE does not depend on the length;
    load_state_dict(None) was an AttributeError.)"""
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl))
    for value in ("256", 2.5, 0, True):
        with pytest.raises(ValueError, match=f"max_length must be an integer >= 1, got {value!r}"):
            booster.check_length(value)
    booster.check_length(256)
    with pytest.raises(ValueError, match="a state_dict.. of a Booster expected .*, got NoneType"):
        booster.load_state_dict(None)
    with pytest.raises(ValueError, match=r"got dict with keys \['impl'\]"):
        booster.load_state_dict({"impl": impl})
    booster.load_state_dict(booster.state_dict())


@pytest.mark.parametrize("impl, grad_accum", [("reference", 1), ("fast", 1), ("fast", 2)])
def test_to_device_takes_a_collators_batch_encoding_and_lists_of_micro_batches(tiny, impl, grad_accum):
    """A transformers collator hands over a BatchEncoding (a Mapping, not a dict): to_device takes it as it took it
    before its checks, and a list of collated micro-batches comes back as a list, each prepared as one."""
    from transformers import DataCollatorForSeq2Seq

    model, tok = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl, grad_accum=grad_accum))
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (6, 9, 7, 8)]
    encoded = DataCollatorForSeq2Seq(tok, padding="longest")(rows)
    assert not isinstance(encoded, dict)
    a, h = booster.to_device(encoded, "cpu"), booster.to_device(encoded, "cpu")
    assert torch.isfinite(booster.step(a, h)["loss"])
    parts = [_batch(), _batch(seed=1)]
    prepared = booster.to_device(parts, "cpu")
    assert isinstance(prepared, list) and len(prepared) == 2
    assert torch.isfinite(booster.step(prepared, booster.to_device(parts, "cpu"))["loss"])


def test_a_model_of_ones_own_without_transformers_embeddings_still_builds():
    """(Booster read the vocabulary size from get_input_embeddings, which a plain nn.Module under peft lacks.)"""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.q_proj, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 50)

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
            return SimpleNamespace(logits=self.head(self.q_proj(self.emb(input_ids))))

    torch.manual_seed(0)
    booster = bf.Booster(get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q_proj"])),
                         bf.BoosterConfig(impl="reference"))
    ids = torch.randint(0, 50, (2, 8))
    batch = booster.to_device({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, "cpu")
    assert booster.vocab is None and torch.isfinite(booster.step(batch, batch)["loss"])


def test_batches_of_different_shapes_and_prepared_ones_still_run(tiny):
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl="fast", grad_accum=2))
    out = booster.step(_batch(rows=4, length=12), _batch(rows=2, length=9, seed=1))
    prepared = [booster.to_device(b, "cpu") for b in (_batch(rows=4), _batch(rows=4, seed=1))]
    assert isinstance(prepared[0], list)  # packed micro-batches
    out2 = booster.step(*prepared)
    assert all(torch.isfinite(o["loss"]) for o in (out, out2))


def test_numpy_and_0_dim_torch_numbers_are_taken_as_floats():
    """(numpy's float32 betas passed the check and then failed in torch's AdamW: "betas must be either both floats
    or both Tensors")"""
    import numpy as np

    cfg = bf.BoosterConfig(lr=np.float32(1e-3), max_grad_norm=torch.tensor(0.5), betas=[np.float32(0.5), 0.99])
    assert type(cfg.lr) is float and cfg.max_grad_norm == 0.5 and type(cfg.max_grad_norm) is float
    assert cfg.betas == (0.5, 0.99) and all(type(b) is float for b in cfg.betas)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("knob, value, message", [
    ("lamb", "3", "lamb must be a number, got '3'"),
    ("grad_accum", 2.0, "grad_accum must be a positive integer, got 2.0"),     # (failed in torch's chunk())
    ("meta_term", "False", "meta_term must be True or False"),                 # (ran the meta term)
    ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),                      # (switched clipping off)
    ("lr", 10.0, r"BoosterConfig.lr changed from 0.0005 to 10.0 after the engine was built.*param_groups\['lr'\]"),
    ("perturb_aware", True, "BoosterConfig.perturb_aware changed from False to True .*build a new Booster"),
])
def test_a_config_changed_between_steps_is_checked_again(tiny, impl, knob, value, message):
    """The step reads most knobs at every call (a change is followed: test_graphs), so a change between steps is
    checked as the constructor checks it; a field the engine reads only when it is built is refused, not ignored
    (cfg.lr = 10 trained on at 5e-4; perturb_aware = True crashed the reference engine). The config can be put
    back and the steps go on."""
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl))
    booster.step(_batch(), _batch(seed=1))
    before = getattr(booster.cfg, knob)
    setattr(booster.cfg, knob, value)
    for step in (lambda: booster.step(_batch(), _batch(seed=1)), lambda: booster.sft_step(_batch())):
        with pytest.raises(ValueError, match=message):
            step()
    setattr(booster.cfg, knob, before)
    booster.cfg.lamb = 2.0  # a knob the step reads: taken
    assert torch.isfinite(booster.step(_batch(), _batch(seed=1))["loss"])


def test_the_reference_engine_on_a_model_without_lora_says_so():
    """(It trained every weight of the model, where the fast engine refused.)"""
    model, _ = bf.load_model("tiny", dtype=torch.float32, seed=0, device="cpu")
    with pytest.raises(ValueError, match="the model has no LoRA weights, only 39 trainable tensors of its own"):
        bf.Booster(model, bf.BoosterConfig(impl="reference"))


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_the_fast_engine_on_a_model_without_lora_says_so(weight_decay):
    model, _ = bf.load_model("tiny", dtype=torch.float32, seed=0, device="cpu")
    with pytest.raises(ValueError, match="the model has no LoRA layers; call add_lora first"):
        bf.Booster(model, bf.BoosterConfig(impl="fast", weight_decay=weight_decay))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_a_batch_that_does_not_split_into_its_micro_batches_is_refused(tiny, impl):
    model, _ = tiny
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl, grad_accum=3))
    with pytest.raises(ValueError, match="a batch of 4 rows cannot be split into 3 equal micro-batches"):
        booster.step(_batch(rows=4), _batch(rows=3, seed=1))


def test_concat_gives_a_batch_without_a_mask_an_all_ones_one():
    """The merged pass stacks [harmful ; alignment]; a batch handed over without its mask (right-padded, so the
    mask-free attention is exact) gets ones, not zeros that would mask every token."""
    from booster_fast.batches import concat

    a, b = _batch(rows=2, seed=1), _batch(rows=3, seed=2)
    a["attention_mask"][0, -4:] = 0
    b = {k: v for k, v in b.items() if k != "attention_mask"}
    out = concat(a, b)
    assert torch.equal(out["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    assert torch.equal(out["labels"], torch.cat([a["labels"], b["labels"]]))
    assert torch.equal(out["attention_mask"], torch.cat([a["attention_mask"], torch.ones_like(b["input_ids"])]))


@pytest.mark.parametrize("flag", ["merge_passes", "packing", "fused_ops", "graphs"])
def test_the_fast_engines_switches_pinned_on_are_refused_with_the_reference(flag):
    """--impl reference runs the original trainer's step as it is: a fast-engine feature pinned on would be
    silently ignored (on the CPU --fused-ops on and --graphs on are refused earlier, by the device check)."""
    from booster_fast.cli import UsageError, build_parser
    from booster_fast.run_args import check_run_args

    args = build_parser().parse_args(["align", "--impl", "reference", f"--{flag.replace('_', '-')}", "on"])
    with pytest.raises(UsageError, match=f"--{flag.replace('_', '-')} on: the fast engine's"):
        check_run_args(args, bf.BoosterConfig(impl="reference"))


@pytest.mark.parametrize("kwargs, message", [
    ({"grad_accum": 1.5}, "grad_accum must be a positive integer, got 1.5"),
    ({"grad_accum": 0}, "grad_accum must be a positive integer, got 0"),
    ({"grad_accum": 2.0}, "grad_accum must be a positive integer, got 2.0"),
    ({"grad_accum": True}, "grad_accum must be a positive integer, got True"),
    ({"grad_accum": "2"}, "grad_accum must be a positive integer, got '2'"),
    ({"betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\)"),
    ({"betas": (1.0, 0.999)}, r"betas must lie in \[0, 1\)"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"graphs": "yes"}, "graphs must be one of"),
    ({"impl": "turbo"}, "impl must be one of"),
    ({"alpha": 0.0}, r"alpha must be > 0: at alpha 0 .* plain fine-tuning \(method sft\)"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"lr": True}, "lr must be a number, got True"),                 # (trained at lr 1.0)
    ({"lamb": "5"}, "lamb must be a number, got '5'"),               # (a TypeError that named no field)
    ({"rho": None}, "rho must be a number, got None"),
    ({"betas": 0.9}, r"betas must be a pair of numbers \(beta1, beta2\), got 0.9"),
    ({"betas": (0.9,)}, r"betas must be a pair of numbers"),
    ({"betas": (0.9, "0.999")}, r"betas must be a pair of numbers"),
])
def test_more_values_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bf.BoosterConfig(**kwargs)


def test_boundary_values_that_work_are_taken():
    """The edges of each range: no clipping (0), no weight decay, β 0, one micro-batch."""
    cfg = bf.BoosterConfig(max_grad_norm=0.0, weight_decay=0.0, lamb=0.0, betas=(0.0, 0.0), grad_accum=1)
    assert cfg.max_grad_norm == 0.0 and cfg.betas == (0.0, 0.0)
