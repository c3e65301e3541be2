"""CUDA-graph capture of the fast step: a clean eager fallback on the CPU, and (on a GPU) replays that compute
exactly what the eager step computes."""
import logging

import pytest
import torch

import booster_fast as bf
from booster_fast.graphs import check_right_padded

from test_fast import builtin_batches, lora_state, worst_relative_error, SEED


def tiny_booster(device, quant="none", **cfg):
    model, tok = bf.load_model("tiny", quant=quant, seed=SEED, device=device)
    torch.manual_seed(SEED)
    model = bf.add_lora(model, r=8, alpha=16)
    return model, tok, bf.Booster(model, bf.BoosterConfig(impl="fast", **cfg))


def test_auto_is_eager_on_cpu():
    model, tok, booster = tiny_booster("cpu", graphs="auto")
    assert booster.engine.graphs is None
    out = booster.step(*builtin_batches(tok, 1)[0])
    assert torch.isfinite(out["loss"])


def test_on_refuses_the_cpu():
    model, _ = bf.load_model("tiny", seed=SEED, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        bf.Booster(bf.add_lora(model), bf.BoosterConfig(impl="fast", graphs="on"))


def test_left_padding_is_refused_for_graphs():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        check_right_padded({"attention_mask": mask})
    check_right_padded({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_graph_replays_equal_eager_steps(quant):
    _, tok = bf.load_model("tiny", device="cpu")
    batches = [tuple({k: v.cuda() for k, v in b.items()} for b in pair) for pair in builtin_batches(tok, 6)]
    no_mask = [tuple({k: v for k, v in b.items() if k != "attention_mask"} for b in pair) for pair in batches]
    graphed, _, gb = tiny_booster("cuda", quant, graphs="on", merge_passes=True)
    eager, _, eb = tiny_booster("cuda", quant, graphs="off", merge_passes=True)
    for (a, h), (a0, h0) in zip(batches, no_mask):
        og, oe = gb.step(a, h), eb.step(a0, h0)
    assert gb.engine.graphs._graphs, "no graph was captured"
    err, name = worst_relative_error(lora_state(graphed), lora_state(eager))
    assert err <= 1e-5, f"graph replays differ from eager steps at {name} by {err:.3g}"
    torch.testing.assert_close(og["loss"], oe["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_capture_failure_falls_back_with_one_log_line(caplog):
    _, tok, booster = tiny_booster("cuda", graphs="auto")
    batches = [tuple({k: v.cuda() for k, v in b.items()} for b in pair) for pair in builtin_batches(tok, 4)]
    engine = booster.engine
    step = engine._step

    def syncing_step(a, h):
        out = step(a, h)
        out["loss"].item()  # a host sync: capture must fail
        return out

    engine._step = syncing_step
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        for a, h in batches:
            booster.step(a, h)
    assert engine.graphs.disabled is not None
    assert sum("CUDA graphs off" in r.getMessage() for r in caplog.records) == 1
