"""CUDA-graph capture of the fast step: a clean eager fallback on the CPU, and (on a GPU) replays that compute
exactly what the eager step computes."""
import logging

import pytest
import torch

import booster_fast as bf
from booster_fast.batches import check_right_padded
from booster_fast.graphs import WARMUP, StepGraphs

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


class _ReplayByRecompute:
    """Stands in for a CUDA graph on the CPU: `replay` recomputes fn on the static inputs into the static output,
    which is what a replay does to the captured tensors."""

    def __init__(self, fn, static_in, static_out, keys):
        self.fn, self.static_in, self.static_out, self.keys = fn, static_in, static_out, keys

    def replay(self):
        out = self.fn(*self.static_in)
        self.static_out.copy_(torch.stack([out[k].float().reshape(()) for k in self.keys]))


def test_step_graphs_warm_up_capture_replay_and_keys(monkeypatch):
    """The CPU-checkable half of StepGraphs: WARMUP eager steps per key, one capture, replays that see each new
    batch (copied into the static inputs, attention mask dropped), and a new key (shape, or a constant the
    capture bakes in, such as the learning rate) warming up and capturing again."""
    events = []
    monkeypatch.setattr(StepGraphs, "_side_stream", staticmethod(lambda fn, b: (events.append("eager"), fn(*b))[1]))

    def fake_capture(fn, batches):
        events.append("capture")
        static_in = tuple({k: v.clone() for k, v in b.items()} for b in batches)
        out = fn(*static_in)
        keys = list(out)
        static_out = torch.stack([out[k].float().reshape(()) for k in keys])
        return static_in, static_out, keys, _ReplayByRecompute(fn, static_in, static_out, keys)

    monkeypatch.setattr(StepGraphs, "_capture", staticmethod(fake_capture))
    seen_masks = []

    def step(batch):
        seen_masks.append("attention_mask" in batch)
        return {"total": batch["input_ids"].sum(), "rows": torch.tensor(batch["input_ids"].shape[0])}

    g = StepGraphs("on")
    gen = torch.Generator().manual_seed(SEED)

    def batch(rows, length):
        ids = torch.randint(0, 1000, (rows, length), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    for i in range(WARMUP + 3):
        b = batch(3, 7)
        out = g.run(("step", 1e-3), step, (b,))
        assert out["total"].item() == b["input_ids"].sum().item(), f"call {i} did not see its own batch"
    assert events == ["eager"] * WARMUP + ["capture"]
    assert not any(seen_masks), "the attention mask reached the step"
    for kind, shape in ((("step", 1e-3), (2, 7)), (("step", 5e-4), (3, 7))):
        events.clear()
        for _ in range(WARMUP + 2):
            b = batch(*shape)
            assert g.run(kind, step, (b,))["total"].item() == b["input_ids"].sum().item()
        assert events == ["eager"] * WARMUP + ["capture"], f"{kind} {shape} did not get a graph of its own"
    assert len(g._graphs) == 3
    g.reset()
    assert not g._graphs


def test_fast_step_keys_its_graph_on_the_learning_rate():
    _, _, booster = tiny_booster("cpu", graphs="off")
    engine = booster.engine
    before = engine._baked()
    for group in engine.optimizer.param_groups:
        group["lr"] *= 0.5
    assert engine._baked() != before and hash(engine._baked()) is not None


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
