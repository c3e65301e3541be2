"""CUDA-graph capture of the fast step: a clean eager fallback on the CPU, and (on a GPU) replays that compute
exactly what the eager step computes."""
import contextlib
import logging
import types
import warnings

import pytest
import torch

import booster_fast as bf
from booster_fast.batches import check_right_padded, to_device
from booster_fast.graphs import MAX_GRAPHS, WARMUP, CaptureInvalidated, StepGraphs
from booster_fast.packing import pack

from test_fast import SEED, assert_tracks_the_exact_run, builtin_batches, lora_state, make_model, \
    randomize_lora_b_, worst_relative_error


def tiny_booster(device, quant="none", **cfg):
    model, tok = bf.load_model("tiny", quant=quant, seed=SEED, device=device)
    torch.manual_seed(SEED)
    model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1)  # make_model's LoRA
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


@pytest.mark.parametrize("how", ["ours, with LoRA dropout", "transformers' default"])
def test_checkpointing_that_saves_the_rng_state_is_not_captured(how, caplog):
    """Checkpointing that saves the RNG state for its recompute reads the CUDA generator on the host, which capture
    refuses: graphs are declined when the engine is built ("auto": one log line; "on": an error), not at a failed
    capture after two steps. Checkpointing without dropout saves no RNG state and is captured."""
    from booster_fast.compute import checkpoint_reads_rng, enable_gradient_checkpointing

    def engine(dropout, ours=True):
        model, _ = bf.load_model("tiny", seed=SEED, device="cpu")
        if ours:
            enable_gradient_checkpointing(model)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = bf.add_lora(model, r=4, alpha=4, dropout=dropout)
        e = bf.Booster(model, bf.BoosterConfig(impl="fast")).engine
        e.device = torch.device("cuda")  # what _graphs_for decides on a GPU (nothing here touches CUDA)
        return e

    e = engine(0.1) if how.startswith("ours") else engine(0.0, ours=False)
    assert checkpoint_reads_rng(e.model)
    with pytest.raises(ValueError, match="graphs='on': gradient checkpointing saves the CUDA RNG state"):
        e._graphs_for("on")
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert e._graphs_for("auto") is None
    assert "CUDA graphs off: gradient checkpointing saves the CUDA RNG state" in caplog.text
    plain = engine(0.0)
    assert not checkpoint_reads_rng(plain.model) and isinstance(plain._graphs_for("auto"), StepGraphs)


def test_a_model_with_8bit_layers_is_not_captured(caplog):
    """bitsandbytes' LLM.int8 layers read their outlier columns back to the host in every forward: graphs are
    declined when the engine is built ("auto": one log line; "on": an error), as for checkpointing's RNG read."""
    model, _ = bf.load_model("tiny", seed=SEED, device="cpu")
    e = bf.Booster(bf.add_lora(model, r=4, alpha=4), bf.BoosterConfig(impl="fast")).engine
    e.device = torch.device("cuda")  # what _graphs_for decides on a GPU (nothing here touches CUDA)
    assert isinstance(e._graphs_for("auto"), StepGraphs)
    e.model.int8 = type("Linear8bitLt", (torch.nn.Module,), {})()  # stands for bitsandbytes' class, by its name
    with pytest.raises(ValueError, match="graphs='on': bitsandbytes' 8-bit layers"):
        e._graphs_for("on")
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert e._graphs_for("auto") is None
    assert "CUDA graphs off: bitsandbytes' 8-bit layers" in caplog.text


def test_several_processes_are_not_captured(caplog):
    """Under torchrun the step all-reduces its gradients, which it does not capture: eager steps, said in one
    log line ("auto"), an error for "on"."""
    model, _ = bf.load_model("tiny", seed=SEED, device="cpu")
    e = bf.Booster(bf.add_lora(model, r=4, alpha=4), bf.BoosterConfig(impl="fast")).engine
    e.device, e.distributed = torch.device("cuda"), True  # what _graphs_for decides on (nothing touches CUDA)
    with pytest.raises(ValueError, match="graphs='on': several processes"):
        e._graphs_for("on")
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert e._graphs_for("auto") is None
    assert "CUDA graphs off: several processes" in caplog.text


def test_left_padding_is_refused_for_graphs():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        check_right_padded({"attention_mask": mask})
    check_right_padded({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})


def test_a_labelled_pad_is_refused_where_the_mask_is_left_out():
    """Leaving the mask out is exact only when no loss is taken on a pad (the pads then attend to everything
    before them): a labelled pad is refused as packing refuses it, by to_device and by the check itself."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ids = torch.tensor([[5, 6, 2], [7, 8, 9]])
    labelled = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}  # pad (EOS 2) labelled
    with pytest.raises(ValueError, match="pad position carries a label"):
        check_right_padded(labelled)
    with pytest.raises(ValueError, match="pad position carries a label"):
        to_device(labelled, "cpu", drop_mask=True)
    fine = dict(labelled, labels=ids.masked_fill(mask == 0, -100))
    assert set(to_device(fine, "cpu", drop_mask=True)) == {"input_ids", "labels"}


def test_a_batch_already_on_the_gpu_is_checked_before_its_mask_is_dropped(monkeypatch):
    """to_device checks a device batch too (one host read there, outside the step): a CUDA mask used to pass
    unchecked, so a left-padded device batch lost its mask silently. Stood in on the CPU by a mask that says
    it is on CUDA."""
    class CudaMask(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    left = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    left["attention_mask"] = left["attention_mask"].as_subclass(CudaMask)
    check_right_padded(left)  # the hot path's call: no host read for a CUDA mask
    with pytest.raises(ValueError, match="right-padded"):
        to_device(left, "cpu", drop_mask=True)


class _ReplayByRecompute:
    """Stands in for a CUDA graph on the CPU: `replay` recomputes fn on the static inputs into the static output,
    which is what a replay does to the captured tensors."""

    def __init__(self, fn, static_in, static_out, keys):
        self.fn, self.static_in, self.static_out, self.keys = fn, static_in, static_out, keys

    def replay(self):
        out = self.fn(*self.static_in)
        self.static_out.copy_(torch.stack([out[k].float().reshape(()) for k in self.keys]))


def _fake_cuda(monkeypatch, sync_on_watch=None, capture_error=None):
    """StepGraphs' two CUDA-only methods replaced by CPU stand-ins; returns the list of events they record.
    sync_on_watch: the host-sync text the watched warm-up reports (or a function of the batches giving it);
    capture_error: what the capture raises."""
    events = []

    def eager(self, fn, b, watch):
        events.append("watched" if watch else "eager")
        sync = sync_on_watch(b) if callable(sync_on_watch) else sync_on_watch
        return fn(*b), (sync if watch else None)

    def capture(self, fn, batches):
        events.append("capture")
        if capture_error is not None:
            raise capture_error
        static_in = tuple({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches)
        out = fn(*static_in)
        keys = list(out)
        static_out = torch.stack([out[k].float().reshape(()) for k in keys])
        return static_in, static_out, keys, _ReplayByRecompute(fn, static_in, static_out, keys)

    monkeypatch.setattr(StepGraphs, "_eager", eager)
    monkeypatch.setattr(StepGraphs, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    return events


def _sum_step(seen_masks):
    def step(batch):
        seen_masks.append("attention_mask" in batch)
        return {"total": batch["input_ids"].sum(), "rows": torch.tensor(batch["input_ids"].shape[0])}
    return step


def _batch_maker():
    gen = torch.Generator().manual_seed(SEED)

    def batch(rows, length):
        ids = torch.randint(0, 1000, (rows, length), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return batch


def test_step_graphs_warm_up_capture_replay_and_keys(monkeypatch):
    """The CPU-checkable half of StepGraphs: WARMUP eager steps per key (the last one watched for host syncs),
    one capture, replays that see each new batch (copied into the static inputs, attention mask dropped), a new
    key (shape, or a constant the capture bakes in, such as the learning rate) warming up and capturing again,
    and no more than MAX_GRAPHS graphs kept."""
    events = _fake_cuda(monkeypatch)
    seen_masks = []
    step, batch = _sum_step(seen_masks), _batch_maker()
    g = StepGraphs("on")
    warm = ["eager"] * (WARMUP - 1) + ["watched"]
    for i in range(WARMUP + 3):
        b = batch(3, 7)
        out = g.run(("step", 1e-3), step, (b,))
        assert out["total"].item() == b["input_ids"].sum().item(), f"call {i} did not see its own batch"
    assert events == warm + ["capture"]
    assert not any(seen_masks), "the attention mask reached the step"
    for kind, shape in ((("step", 1e-3), (2, 7)), (("step", 5e-4), (3, 7))):
        events.clear()
        for _ in range(WARMUP + 2):
            b = batch(*shape)
            assert g.run(kind, step, (b,))["total"].item() == b["input_ids"].sum().item()
        assert events == warm + ["capture"], f"{kind} {shape} did not get a graph of its own"
    assert len(g._graphs) == 3
    for rows in range(4, 4 + MAX_GRAPHS):
        for _ in range(WARMUP + 1):
            g.run(("step", 1e-3), step, (batch(rows, 7),))
    rows_kept = [k[2][0][1][0] for k in g._graphs]  # key: (kind, groups, (("input_ids", shape, dtype),))
    assert rows_kept == list(range(4, 4 + MAX_GRAPHS)), f"not the oldest graphs were evicted: {rows_kept}"
    g.reset()
    assert not g._graphs


def _fake_streams(monkeypatch, events):
    """The CUDA stream and sync-debug calls of StepGraphs' eager step, as CPU stand-ins (the debug mode logged)."""
    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: events.append(f"debug {mode}"))


def test_warm_ups_after_a_capture_allocate_in_the_graphs_pool(monkeypatch, caplog):
    """With POOL_WARMUP, a shape met after the first capture warms up with its allocations routed to the graphs'
    pool: after a sync, the routing wraps the whole step and the sync watch inside it, and the outputs come back
    as clones (a later replay writes over the pool's free blocks). Before any capture there is no pool to route
    to; where routing fails, one warning, and warm-ups run beside the pool from then on; without POOL_WARMUP
    (the default) they always do."""
    from booster_fast import graphs

    events, returned = [], []
    _fake_streams(monkeypatch, events)

    def capture(self, fn, batches):
        events.append("capture")
        self._pool = "pool"
        static_in = tuple({k: v.clone() for k, v in b.items()} for b in batches)
        out = fn(*static_in)
        static_out = torch.stack([out[k].float().reshape(()) for k in out])
        return static_in, static_out, list(out), _ReplayByRecompute(fn, static_in, static_out, list(out))

    @contextlib.contextmanager
    def routing(pool):
        events.append(f"into {pool}")
        yield
        events.append(f"out of {pool}")

    def step(batch):
        events.append("step")
        returned.append({"total": batch["input_ids"].sum()})
        return returned[-1]

    monkeypatch.setattr(StepGraphs, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(graphs, "_allocating_in", routing)
    batch = _batch_maker()
    off = StepGraphs("on")  # built before the switch: warm-ups beside the pool
    monkeypatch.setattr(graphs, "POOL_WARMUP", True)
    g = StepGraphs("on")
    watched = ["debug warn", "step", "debug 0"]
    for _ in range(WARMUP + 1):
        g.run("step", step, (batch(3, 7),))
    # (the stand-in capture runs the step, its replay once more); no pool to route to before a capture
    assert events == ["step"] * (WARMUP - 1) + watched + ["capture", "step", "step"], events
    events.clear()
    for _ in range(WARMUP):
        b = batch(2, 7)
        out = g.run("step", step, (b,))
        assert out["total"].item() == b["input_ids"].sum().item()
        assert out["total"] is not returned[-1]["total"], "a warm-up's output came back from inside the pool"
    routed = ["sync", "into pool", "step", "out of pool"]
    assert events == routed * (WARMUP - 1) + ["sync", "into pool", *watched, "out of pool"], events
    assert g.pool_warmups == WARMUP

    events.clear()
    for rows in (3, 3, 3, 3, 2, 2):
        off.run("step", step, (batch(rows, 7),))
    assert "capture" in events and "into pool" not in events and not off.pool_warmups, events

    def broken(pool):
        raise RuntimeError("no such allocator call")

    monkeypatch.setattr(graphs, "_allocating_in", broken)
    events.clear()
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        for rows in (4, 4, 5):
            g.run("step", step, (batch(rows, 7),))
    assert events == ["sync", "step"] + watched + ["step"], events  # the routing failed once: never tried again
    assert caplog.text.count("cannot warm up in the graphs' memory pool (no such allocator call)") == 1
    assert g.pool_warmups == WARMUP and not g._pool_warmup


def test_pool_routing_calls_torchs_allocator_in_pairs(monkeypatch):
    """_allocating_in begins routing the current thread's allocations to the pool, and ends and releases it
    (begin counts a user of the pool) also when the body raises."""
    from booster_fast import graphs

    calls = []
    for name in graphs._POOL_ROUTING:
        monkeypatch.setattr(torch._C, name, lambda *a, name=name: calls.append((name, *a)), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with pytest.raises(ValueError):
        with graphs._allocating_in((7, 8)):
            calls.append("body")
            raise ValueError("the step failed")
    assert calls == [(graphs._POOL_ROUTING[0], 1, (7, 8)), "body", (graphs._POOL_ROUTING[1], 1, (7, 8)),
                     (graphs._POOL_ROUTING[2], 1, (7, 8))]


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_step_graphs_give_up_on_a_syncing_step(monkeypatch, caplog, mode):
    """A host sync seen in the watched warm-up: 'auto' logs one line naming it and runs that shape eagerly from
    then on (no capture is tried for it), while a shape whose step does not sync is still captured and
    replayed; 'on' raises."""
    events = _fake_cuda(monkeypatch, sync_on_watch=lambda b: "called a synchronizing CUDA operation"
                        if b[0]["input_ids"].shape[1] == 5 else None)  # long rows: a windowed mask built on the host
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs(mode)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        if mode == "on":
            with pytest.raises(RuntimeError, match="syncs with the host"):
                for _ in range(WARMUP):
                    g.run("step", step, (batch(2, 5),))
            return
        for _ in range(WARMUP + 3):
            for length in (5, 4, 5):
                b = batch(2, length)
                assert g.run("step", step, (b,))["total"].item() == b["input_ids"].sum().item()
    assert events.count("capture") == 1 and g.disabled is None and len(g._graphs) == 1
    assert [k[2][0][1] for k in g._graphs] == [(2, 4)] and [k[2][0][1] for k in g.eager_keys] == [(2, 5)]
    assert g.replays == 3 and "synchronizing" in g.fallback
    lines = [r for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "synchronizing" in lines[0].getMessage()
    events.clear()
    for _ in range(WARMUP):  # another shape with the same reason: eager too, logged below warning level
        g.run("step", step, (batch(3, 5),))
    assert "capture" not in events and len(g.eager_keys) == 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records if "runs eagerly" in r.getMessage()) == 1
    # reset (new state loaded): everything a key learnt is forgotten; the shape that synced is tried afresh
    g.reset()
    assert not g.eager_keys and not g._seen and not g._graphs and g._pool is None
    events.clear()
    for _ in range(WARMUP):
        g.run("step", step, (batch(2, 5),))
    assert events == ["eager", "watched"] and len(g.eager_keys) == 1  # warmed up and watched again, found again


def test_step_graphs_evict_the_least_recently_replayed(monkeypatch, caplog):
    """Past MAX_GRAPHS graphs, the one replayed longest ago goes, not the first captured: a shape that keeps
    coming back keeps its graph. The first eviction is said in one warning (later ones are counted)."""
    events = _fake_cuda(monkeypatch)
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    for rows in range(1, MAX_GRAPHS + 1):
        for _ in range(WARMUP + 1):
            g.run("step", step, (batch(rows, 3),))
    g.run("step", step, (batch(1, 3),))  # the first shape replayed again: now the most recent
    assert g.dropped == 0
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        for rows in (MAX_GRAPHS + 1, MAX_GRAPHS + 2):
            for _ in range(WARMUP + 1):
                g.run("step", step, (batch(rows, 3),))
            if rows == MAX_GRAPHS + 1:  # the warning comes with the first eviction
                assert g.dropped == 1 and sum("batch shapes met" in r.getMessage() for r in caplog.records) == 1
    rows_kept = {k[2][0][1][0] for k in g._graphs}
    assert len(rows_kept) == MAX_GRAPHS and 1 in rows_kept and {2, 3}.isdisjoint(rows_kept), sorted(rows_kept)
    assert events.count("capture") == MAX_GRAPHS + 2 and g.dropped == 2
    lines = [r.getMessage() for r in caplog.records if "batch shapes met" in r.getMessage()]
    assert len(lines) == 1 and f"more than {MAX_GRAPHS} batch shapes" in lines[0], lines


def test_step_graphs_forget_the_oldest_keys_first(monkeypatch):
    """The warm-up counts and the eager keys are bounded (4 x MAX_GRAPHS): past that, the key seen longest ago
    goes, not the newest."""
    from booster_fast.graphs import _drop_oldest

    d = {k: k for k in range(10)}
    _drop_oldest(d, 7)
    assert list(d) == [3, 4, 5, 6, 7, 8, 9]
    _fake_cuda(monkeypatch)
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    for rows in range(1, 4 * MAX_GRAPHS + 2):  # each shape once: warm-up counts only
        g.run("step", step, (batch(rows, 3),))
    kept = [k[2][0][1][0] for k in g._seen]
    assert len(kept) == 4 * MAX_GRAPHS and kept[0] == 2 and kept[-1] == 4 * MAX_GRAPHS + 1


def test_step_graphs_hand_the_mask_to_a_model_that_needs_it(monkeypatch):
    """keep_masks (a model whose attention the mask-free path does not reproduce): the step gets each batch's mask
    in warm-up, capture and replays, and left padding is not refused, since the mask is used."""
    _fake_cuda(monkeypatch)
    seen_masks, batch = [], _batch_maker()
    step = _sum_step(seen_masks)
    g = StepGraphs("on", keep_masks=True)
    for _ in range(WARMUP + 2):
        b = batch(2, 5)
        b["attention_mask"][0, :2] = 0  # left padding
        assert g.run("step", step, (b,))["total"].item() == b["input_ids"].sum().item()
    assert all(seen_masks) and len(seen_masks) == WARMUP + 1 + 2  # warm-ups, the capture, and each replay
    assert g.replays == 2


def test_a_model_that_needs_its_masks_keeps_them_under_graphs(monkeypatch, caplog):
    """The engine tells StepGraphs to keep the masks when probe_attention found the mask-free path inexact for
    the model (Falcon's own attention before transformers 5.25: test_packing): stripping them would crash it or
    train it without the mask. Here the probe is made to say so of the tiny Llama, whose real probe passes."""
    import booster_fast.fast as fast_module

    why = "the mask-free logits differ from the padded ones by 0.3 relative"
    llama = tiny_booster("cpu")[2].engine
    monkeypatch.setattr(fast_module, "probe_attention", lambda model, autocast: ("not packed", why))
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        needs_masks = tiny_booster("cpu")[2].engine
    assert f"attention masks kept: the mask-free attention does not run this model exactly ({why})" in caplog.text
    for engine, keeps in ((needs_masks, True), (llama, False)):
        assert engine.drop_mask is not keeps and engine.pack is not keeps  # (the probe refused packing too)
        engine.device = types.SimpleNamespace(type="cuda")  # what _graphs_for looks at
        assert engine._graphs_for("auto").keep_masks is keeps


def test_step_graphs_fall_back_when_the_capture_fails(monkeypatch, caplog):
    """A step that fails inside the capture ('auto'): one log line with its error, then this step and every
    later one run eagerly and see their own batches, without the mask as before the failure."""
    _fake_cuda(monkeypatch, capture_error=ValueError("the real reason"))
    seen_masks = []
    step, batch = _sum_step(seen_masks), _batch_maker()
    g = StepGraphs("auto")
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        for _ in range(WARMUP + 3):
            b = batch(2, 5)
            assert g.run("step", step, (b,))["total"].item() == b["input_ids"].sum().item()
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert len(lines) == 1 and "the real reason" in lines[0], lines
    assert g.disabled and not g._graphs
    assert len(seen_masks) == WARMUP + 3 and not any(seen_masks), seen_masks  # (the failed capture's call raised)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_step_graphs_stop_on_an_invalidated_capture(monkeypatch, mode):
    """A capture CUDA invalidated leaves the allocator unreliable: fatal in both modes, saying what to do."""
    _fake_cuda(monkeypatch, capture_error=CaptureInvalidated("operation not permitted when stream is capturing"))
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs(mode)
    with pytest.raises(RuntimeError, match="invalidated .*--graphs off"):
        for _ in range(WARMUP + 1):
            g.run("step", step, (batch(2, 5),))


def test_an_invalidated_capture_ends_align_with_one_line(monkeypatch, tmp_path, capsys):
    """Under align (graphs auto), an invalidated capture is one line naming the way out and exit code 5, not a
    traceback; the run, stopped before its first checkpoint, leaves no directory behind."""
    from booster_fast.cli import CAPTURE_INVALIDATED, main

    def invalidated(self, *batches):
        raise CaptureInvalidated("CUDA graph capture was invalidated (operation not permitted when stream is "
                                 "capturing); CUDA memory cannot be trusted after that in this process: rerun with "
                                 "graphs='off' (--graphs off)")

    monkeypatch.setattr(bf.Booster, "step", invalidated)
    out = tmp_path / "run"
    assert main(["align", "--output", str(out), "--steps", "2", "--max-length", "32", "--batch-size", "2"]) \
        == CAPTURE_INVALIDATED == 5
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == ["booster-fast: error: CUDA graph capture was invalidated (operation not permitted when stream "
                   "is capturing); CUDA memory cannot be trusted after that in this process: rerun with "
                   "graphs='off' (--graphs off)"], err
    assert not out.exists()


class _FakeGraph:
    def __init__(self, end_error):
        self.end_error, self.pool_used = end_error, None

    def capture_begin(self, pool=None):
        self.pool_used = pool

    def capture_end(self):
        if self.end_error is not None:
            raise self.end_error


@pytest.mark.parametrize("step_error, end_error, expected", [
    (None, None, None),
    (ValueError("step broke"), None, ValueError),                  # CUDA saw nothing wrong: the step's error
    (RuntimeError("op not permitted"), RuntimeError("end failed"), CaptureInvalidated),
    (None, RuntimeError("end failed"), CaptureInvalidated),
])
def test_capture_keeps_the_steps_error_apart_from_capture_end(monkeypatch, step_error, end_error, expected):
    """StepGraphs._capture's control flow with CUDA's calls stubbed: the step's own error is re-raised when the
    capture ends cleanly; a failing capture_end becomes CaptureInvalidated naming the step's error (or its own);
    every graph gets the one shared pool."""
    graphs = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(_FakeGraph(end_error)) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(StepGraphs, "_side", lambda self: None)

    def step(batch):
        if step_error is not None:
            raise step_error
        return {"total": batch["input_ids"].sum()}

    g = StepGraphs("auto")
    batches = ({"input_ids": torch.arange(6).view(2, 3)},)
    if expected is None:
        for _ in range(2):
            static_in, static_out, keys, graph = g._capture(step, batches)
            assert keys == ["total"] and static_out.tolist() == [15.0] and graph.pool_used == ("pool", 1)
        return
    with pytest.raises(expected) as info:
        g._capture(step, batches)
    if expected is CaptureInvalidated:
        assert str(step_error or end_error) in str(info.value)


def test_a_changed_learning_rate_reaches_the_same_graph(monkeypatch):
    """With graphs, the learning rate is a device tensor that the step reads (a replay too), not a constant baked
    into the graph: a scheduler's in-place change and a float set by hand keep the graph key, and the updates
    follow the new rate exactly as the reference's float rate does. Weight decay is still baked in: a new value,
    a new key. Without graphs the rate stays a float (checkpoints then hold no device tensor)."""
    from booster_fast.fast import FastBooster

    assert not torch.is_tensor(tiny_booster("cpu", graphs="off")[2].optimizer.param_groups[0]["lr"])
    kinds = []

    def run(kind, fn, batches):
        kinds.append(kind)
        return fn(*batches)

    # what a CUDA engine has, recording instead of capturing
    monkeypatch.setattr(FastBooster, "_graphs_for", lambda self, mode: types.SimpleNamespace(run=run))
    _, tok, booster = tiny_booster("cpu", graphs="off")
    ref, exact = (bf.Booster(make_model()[0].to(dtype), bf.BoosterConfig(impl="reference"))
                  for dtype in (torch.float32, torch.float64))
    engine = booster.engine
    assert engine._lr.dtype == torch.float64  # the CPU's fused AdamW reads a tensor lr as fp64: a float lr's value
    scheds = [torch.optim.lr_scheduler.LambdaLR(b.optimizer, lambda i: 0.5 ** i) for b in (booster, ref, exact)]
    lr = engine.optimizer.param_groups[0]["lr"]
    for i, (a, h) in enumerate(builtin_batches(tok, 4)):
        if i == 3:
            for b in (booster, ref, exact):
                b.optimizer.param_groups[0]["lr"] = 1e-2  # by hand, a float
        for b in (booster, ref, exact):
            b.step(a, h)
        for sched in scheds:
            sched.step()
    assert engine.optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4 * 0.5 ** 4)
    assert len(set(kinds)) == 1 and kinds[0][0] == "booster"
    assert_tracks_the_exact_run(*(lora_state(b.model) for b in (booster, ref, exact)), "lr changed")
    for key, value in (("weight_decay", 0.05), ("eps", 1e-6), ("betas", (0.8, 0.99))):  # each a new key
        engine.optimizer.param_groups[0][key] = value
        booster.step(a, h)
        assert kinds[-1] != kinds[-2], key


@pytest.mark.parametrize("knob, value", [("lamb", 2.0), ("alpha", 0.3), ("max_grad_norm", 0.25), ("grad_accum", 2),
                                         ("meta_term", False), ("max_grad_norm", 0.0), ("skip_nonfinite", False),
                                         ("rho", 0.5), ("perturb_eps", 1.0)])  # (‖∇h‖ ~ 1 here)
def test_a_changed_step_knob_gets_a_graph_of_its_own(monkeypatch, knob, value):
    """The step reads λ, α, the clip norm, the micro-batch count, ρ... from the config at every call, and a
    capture bakes them in: a changed one changes the graph key (a replay would ignore it), and the step follows
    it as the reference does. The clip's constant, a tensor, is refilled; clipping or the guard switched off
    leaves no scale or skip flag of an earlier step behind."""
    from booster_fast.fast import FastBooster

    kinds = []

    def run(kind, fn, batches):
        kinds.append(kind)
        return fn(*batches)

    monkeypatch.setattr(FastBooster, "_graphs_for", lambda self, mode: types.SimpleNamespace(run=run))
    extra = dict(perturb_aware=True, rho=2.0) if knob == "rho" else {}
    _, tok, booster = tiny_booster("cpu", graphs="off", **extra)
    ref, exact = (bf.Booster(make_model()[0].to(dtype), bf.BoosterConfig(impl="reference", **extra))
                  for dtype in (torch.float32, torch.float64))
    for i, (a, h) in enumerate(builtin_batches(tok, 3, batch_size=2, max_length=64)):
        if i == 2:
            for b in (booster, ref, exact):
                setattr(b.cfg, knob, value)
        for b in (booster, ref, exact):
            b.step(a, h)
    assert kinds[0] == kinds[1] != kinds[2]
    if knob == "max_grad_norm" and value > 0:
        assert booster.engine._clip_offset.item() == pytest.approx(1e-6 / value)
    assert_tracks_the_exact_run(*(lora_state(b.model) for b in (booster, ref, exact)), f"{knob}={value}")


def test_packed_batches_get_a_graph_per_length_and_replay_the_eager_step(monkeypatch):
    """Packed batches come in a few bucketed lengths: each (harmful, alignment) length pair gets its own warm-up
    and capture, keyed on the shapes and on max_seqlen, and the replays give the eager step's weights."""
    events = _fake_cuda(monkeypatch)
    _, tok = bf.load_model("tiny", device="cpu")
    (a, h), = builtin_batches(tok, 1, batch_size=4, max_length=96)
    first = pack(a), pack(h)
    second = pack({k: v[:2] for k, v in a.items()}), pack(h)  # half the alignment rows: another packed length
    assert first[0]["input_ids"].shape != second[0]["input_ids"].shape
    schedule = [first, second] * (WARMUP + 2)
    graphed, _, gb = tiny_booster("cpu", graphs="off", merge_passes=True)
    gb.engine.graphs = StepGraphs("on")
    eager, _, eb = tiny_booster("cpu", graphs="off", merge_passes=True)
    for a, h in schedule:
        captures = events.count("capture")
        og, oe = gb.step(a, h), eb.step(a, h)
        if events.count("capture") > captures:  # the CPU stand-in's capture ran the step once more
            eb.step(a, h)
    assert events.count("capture") == 2 and len(gb.engine.graphs._graphs) == 2
    assert all(("max_seqlen", 96) in sig for key in gb.engine.graphs._graphs for sig in key[2:])
    err, name = worst_relative_error(lora_state(graphed), lora_state(eager))
    assert err <= 1e-6, f"replays of packed steps differ from eager steps at {name} by {err:.3g}"
    torch.testing.assert_close(og["loss"], oe["loss"], rtol=1e-6, atol=1e-7)


def test_packed_micro_batches_are_captured_too(monkeypatch):
    """Gradient accumulation with packing hands the step lists of packed micro-batches: they get a graph of their
    own (static inputs per micro-batch, keyed on how many), and the replays give the eager step's weights."""
    events = _fake_cuda(monkeypatch)
    _, tok = bf.load_model("tiny", device="cpu")
    graphed, _, gb = tiny_booster("cpu", graphs="off", merge_passes=True, grad_accum=2, packing=True)
    gb.engine.graphs = StepGraphs("on")
    eager, _, eb = tiny_booster("cpu", graphs="off", merge_passes=True, grad_accum=2, packing=True)
    (a, h), = builtin_batches(tok, 1, batch_size=4, max_length=160)
    lists = gb.to_device(a, "cpu"), gb.to_device(h, "cpu")
    assert all(isinstance(x, list) and len(x) == 2 and all("cu_seqlens" in m for m in x) for x in lists)
    for _ in range(WARMUP + 2):
        captures = events.count("capture")
        og, oe = gb.step(*lists), eb.step(*lists)
        if events.count("capture") > captures:  # the CPU stand-in's capture ran the step once more
            eb.step(*lists)
    assert events.count("capture") == 1 and gb.engine.graphs.replays == 2
    (key,) = gb.engine.graphs._graphs
    assert key[1] == (2, 2), "the key does not say how many micro-batches each argument holds"
    err, name = worst_relative_error(lora_state(graphed), lora_state(eager))
    assert err <= 1e-6, f"replays of packed micro-batch lists differ from eager steps at {name} by {err:.3g}"
    torch.testing.assert_close(og["loss"], oe["loss"], rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_equal_eager_steps_on_packed_batches(dtype):
    """Packed batches on CUDA (bf16: flash's variable-length kernel; fp32: the segment grid), captured."""
    _, tok = bf.load_model("tiny", device="cpu")
    pairs = [tuple(to_device(pack(b), "cuda") for b in p) for p in builtin_batches(tok, 8, max_length=160)]
    boosters = {}
    for graphs in ("on", "off"):
        model, _ = bf.load_model("tiny", dtype=dtype, seed=SEED, device="cuda")
        torch.manual_seed(SEED)
        model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1)
        boosters[graphs] = model, bf.Booster(model, bf.BoosterConfig(graphs=graphs, merge_passes=True))
    for a, h in pairs[:2] * 5:  # two packed lengths at most: each warms up, is captured and replays
        og, oe = boosters["on"][1].step(a, h), boosters["off"][1].step(a, h)
    assert boosters["on"][1].engine.graphs.replays, "no step was replayed"
    # bf16: flash's backward accumulates with atomics, so even two eager runs differ in the last bits
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err, name = worst_relative_error(lora_state(boosters["on"][0]), lora_state(boosters["off"][0]))
    assert err <= tol, f"{dtype}: packed graph replays differ from eager steps at {name} by {err:.3g}"
    torch.testing.assert_close(og["loss"], oe["loss"], rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("in_pool", [False, pytest.param(True, marks=pytest.mark.pool_warmup)])
def test_a_length_met_after_the_first_capture_warms_up_and_replays_exactly(monkeypatch, in_pool):
    """fp32, packed: one length warms up, is captured and replays; a second length then warms up (with
    POOL_WARMUP, in the graphs' pool) and is captured; the two alternate. Every step's outputs, read only at
    the end, and the final LoRA weights equal the eager engine's."""
    from booster_fast import graphs

    monkeypatch.setattr(graphs, "POOL_WARMUP", in_pool)
    _, tok = bf.load_model("tiny", device="cpu")
    pairs = [tuple(to_device(pack(b), "cuda") for b in p) for p in builtin_batches(tok, 8, max_length=160)]
    first, second = pairs[0], next(p for p in pairs[1:] if p[0]["input_ids"].shape != pairs[0][0]["input_ids"].shape)
    boosters = {}
    for mode in ("on", "off"):
        model, _ = bf.load_model("tiny", seed=SEED, device="cuda")
        torch.manual_seed(SEED)
        model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1)
        boosters[mode] = model, bf.Booster(model, bf.BoosterConfig(graphs=mode, merge_passes=True))
    order = [first] * 4 + [second] * 4 + [first, second]
    outs = [(boosters["on"][1].step(*p), boosters["off"][1].step(*p)) for p in order]
    engine = boosters["on"][1].engine.graphs
    assert engine.replays >= 4 and engine.pool_warmups == (2 if in_pool else 0), (engine.replays, engine.pool_warmups)
    for i, (og, oe) in enumerate(outs):
        for k in ("loss", "harmful_loss", "harmful_grad_norm"):
            torch.testing.assert_close(og[k], oe[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i} {k}: {m}")
    err, name = worst_relative_error(lora_state(boosters["on"][0]), lora_state(boosters["off"][0]))
    assert err <= 1e-5, f"in_pool={in_pool}: the weights differ from eager steps at {name} by {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_graph_replays_equal_eager_steps(quant):
    """Also: AdamW says capturable only where the step is captured, without torch's warning about the warm-up's
    uncaptured steps."""
    _, tok = bf.load_model("tiny", device="cpu")
    batches = [tuple({k: v.cuda() for k, v in b.items()} for b in pair) for pair in builtin_batches(tok, 6)]
    no_mask = [tuple({k: v for k, v in b.items() if k != "attention_mask"} for b in pair) for pair in batches]
    graphed, _, gb = tiny_booster("cuda", quant, graphs="on", merge_passes=True)
    eager, _, eb = tiny_booster("cuda", quant, graphs="off", merge_passes=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for (a, h), (a0, h0) in zip(batches, no_mask):
            og, oe = gb.step(a, h), eb.step(a0, h0)
    assert not [w for w in seen if "capturable=True" in str(w.message)], "torch's advice for uncaptured steps"
    assert gb.engine.graphs._graphs, "no graph was captured"
    assert [b.optimizer.param_groups[0]["capturable"] for b in (gb, eb)] == [True, False]
    # nf4 computes in bf16, where SDPA's flash backward may accumulate with atomics: two eager runs can differ
    tol = 1e-5 if quant == "none" else 3e-2
    err, name = worst_relative_error(lora_state(graphed), lora_state(eager))
    assert err <= tol, f"{quant}: graph replays differ from eager steps at {name} by {err:.3g}"
    torch.testing.assert_close(og["loss"], oe["loss"], rtol=tol, atol=tol / 10)


@pytest.mark.gpu
def test_the_bench_rewinds_fast_graphs_and_checks_its_first_replay(tmp_path):
    """On CUDA the bench's fast-graphs entry captures its step in untimed steps, is rewound in place (the captured
    graphs read the restored weights and the zeroed AdamW state) and its first replay must match the reference's
    first step."""
    import json

    from booster_fast.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--device", "cuda", "--steps", "2", "--warmup", "1", "--batch-size", "4",
               "--harmful-batch-size", "3", "--impls", "reference,fast-graphs", "--output", str(out)])
    res = json.loads(out.read_text())["results"]["fast-graphs"]
    assert rc == 0 and res["cuda_graphs"] and res["first_step_agrees"], res


@pytest.mark.gpu
def test_graph_replays_follow_a_learning_rate_schedule():
    """A scheduler changes the device-tensor learning rate between replays: one graph is captured and replayed,
    and the weights follow the eager steps of the same schedule."""
    _, tok = bf.load_model("tiny", device="cpu")
    batches = [tuple({k: v.cuda() for k, v in b.items() if k != "attention_mask"} for b in pair)
               for pair in builtin_batches(tok, 8)]
    graphed, _, gb = tiny_booster("cuda", graphs="on", merge_passes=True)
    eager, _, eb = tiny_booster("cuda", graphs="off", merge_passes=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(b.optimizer, lambda i: 0.8 ** i) for b in (gb, eb)]
    for a, h in batches:
        gb.step(a, h), eb.step(a, h)
        for sched in scheds:
            sched.step()
    assert len(gb.engine.graphs._graphs) == 1 and gb.engine.graphs.replays == len(batches) - WARMUP
    err, name = worst_relative_error(lora_state(graphed), lora_state(eager))
    assert err <= 1e-5, f"replays under a schedule differ from eager steps at {name} by {err:.3g}"


def _dropout_booster(graphs: str, lr: float = 5e-4):
    """tiny with LoRA dropout 0.1 on CUDA (make_model's LoRA otherwise), its engine merged."""
    model, _ = bf.load_model("tiny", seed=SEED, device="cuda")
    torch.manual_seed(SEED)
    model = randomize_lora_b_(bf.add_lora(model, r=8, alpha=16, dropout=0.1), SEED + 1)
    return model, bf.Booster(model, bf.BoosterConfig(graphs=graphs, merge_passes=True, lr=lr))


@pytest.mark.gpu
def test_graph_replays_draw_fresh_dropout_masks_as_eager_steps_do():
    """LoRA dropout inside a captured step: each replay draws new masks (the same batch at a zero learning rate
    gives another loss each replay), from the generator state an eager step would use, so graphed and eager runs
    from one seed agree. The runs go one after the other: both draw from the one CUDA generator."""
    _, tok = bf.load_model("tiny", device="cpu")
    batches = [tuple({k: v.cuda() for k, v in b.items() if k != "attention_mask"} for b in pair)
               for pair in builtin_batches(tok, 6)]
    _, frozen = _dropout_booster("on", lr=0.0)
    losses = [frozen.step(*batches[0])["loss"] for _ in range(WARMUP + 4)]
    assert frozen.engine.graphs.replays == 4
    replayed = torch.stack(losses[WARMUP:]).tolist()  # the capturing step's replay and three more
    assert len(set(replayed)) == len(replayed), f"replays drew the same dropout masks: {replayed}"
    runs = {}
    for graphs in ("on", "off"):
        model, booster = _dropout_booster(graphs)
        torch.manual_seed(SEED + 2)
        outs = [booster.step(a, h) for a, h in batches]
        runs[graphs] = model, booster, torch.stack([o["loss"] for o in outs])
    assert runs["on"][1].engine.graphs.replays == len(batches) - WARMUP  # (the capturing step replays too)
    torch.testing.assert_close(runs["on"][2], runs["off"][2], rtol=1e-5, atol=1e-6)
    err, name = worst_relative_error(lora_state(runs["on"][0]), lora_state(runs["off"][0]))
    assert err <= 1e-5, f"dropout: graph replays differ from eager steps at {name} by {err:.3g}"


@pytest.mark.gpu
def test_syncing_step_is_found_in_warm_up_and_falls_back(caplog):
    """A step that syncs with the host is caught by the watched warm-up (torch's sync debug mode), before any
    capture is tried: one log line, then eager steps."""
    _, tok, booster = tiny_booster("cuda", graphs="auto")
    batches = [tuple({k: v.cuda() for k, v in b.items()} for b in pair) for pair in builtin_batches(tok, 4)]
    engine = booster.engine
    step = engine._step

    def syncing_step(a, h):
        out = step(a, h)
        out["loss"].item()  # a host sync
        return out

    engine._step = syncing_step
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        for a, h in batches:
            booster.step(a, h)
    assert engine.graphs.eager_keys and "syncs with the host" in engine.graphs.fallback
    assert not engine.graphs._graphs
    assert sum("runs eagerly" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.gpu
def test_failed_capture_restores_the_stream_and_falls_back(caplog):
    """A step that fails inside the capture: the reason is logged once, the current stream is the default one
    again, and the step (and the next ones) run eagerly."""
    _, tok, booster = tiny_booster("cuda", graphs="auto")
    batches = [tuple({k: v.cuda() for k, v in b.items()} for b in pair) for pair in builtin_batches(tok, 4)]
    engine = booster.engine
    step = engine._step

    def failing_in_capture(a, h):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("refused inside the capture")
        return step(a, h)

    engine._step = failing_in_capture
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        outs = [booster.step(a, h) for a, h in batches]
    assert engine.graphs.disabled and "refused inside the capture" in engine.graphs.disabled
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert all(torch.isfinite(o["loss"]) for o in outs)
    assert sum("CUDA graphs off" in r.getMessage() for r in caplog.records) == 1


def test_a_dynamic_rope_models_step_reads_the_device():
    """transformers' dynamic RoPE rebuilds its frequencies lazily on a longer input, which a warm-up routed into
    the graphs' pool must not do (POOL_WARMUP); its length check reads the device every step, so its steps are
    found syncing in the watched warm-up and never captured (graphs.py relies on this)."""
    from booster_fast.opcount import count_ops

    model, tok = bf.load_model("tiny", device="cpu", num_hidden_layers=1,
                               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert model.model.rotary_emb.rope_type == "dynamic"
    booster = bf.Booster(bf.add_lora(model), bf.BoosterConfig(packing=True, graphs="off"))
    (batch,) = builtin_batches(tok, 1, batch_size=4, max_length=64)
    a, h = (booster.to_device(b, "cpu") for b in batch)
    assert sum(count_ops(booster.step, a, h)["host_syncs"].values()) > 0


def test_replay_outputs_are_the_callers_own(monkeypatch):
    """[G1] graphs.py run: each replay's outputs are cloned out of the static output tensor, so a later replay
    does not change what an earlier step returned."""
    _fake_cuda(monkeypatch)
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    outs = []
    for _ in range(WARMUP + 3):
        b = batch(3, 7)
        outs.append((g.run("step", step, (b,)), b["input_ids"].sum().item()))
    assert g.replays == 3  # the capture's step, then two more
    for i, (out, want) in enumerate(outs):
        assert out["total"].item() == want, f"step {i}'s output was overwritten by a later replay"


def test_replays_read_the_mask_check_without_a_host_sync(monkeypatch):
    """[G2] graphs.py run: right padding is checked with a host read (sync_ok) during warm-up and capture only;
    replays must not sync (a CUDA mask is then left unchecked)."""
    from booster_fast import graphs

    _fake_cuda(monkeypatch)
    seen = []
    real_check = graphs.check_right_padded
    monkeypatch.setattr(graphs, "check_right_padded", lambda b, sync_ok=False: seen.append(sync_ok)
                        or real_check(b, sync_ok=sync_ok))
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    for _ in range(WARMUP + 3):
        g.run("step", step, (batch(2, 5),))
    assert seen == [True] * (WARMUP + 1) + [False] * 2, seen


def _stub_capture(monkeypatch):
    """torch.cuda's capture calls as CPU stand-ins; the graph's replay does nothing."""
    class Graph:
        def capture_begin(self, pool=None):
            pass

        def capture_end(self):
            pass

        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(StepGraphs, "_side", lambda self: None)
    monkeypatch.setattr(StepGraphs, "_eager", lambda self, fn, b, watch: (fn(*b), None))


def test_capture_gives_the_graph_static_inputs_of_its_own(monkeypatch):
    """[G8] graphs.py _capture: the static inputs are clones; a replay copies each new batch into them, which
    must not write into the batch the capture ran on (the caller's tensors)."""
    _stub_capture(monkeypatch)
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    batches = [batch(2, 5) for _ in range(WARMUP + 3)]
    before = [b["input_ids"].clone() for b in batches]
    for b in batches:
        g.run("step", step, (b,))
    assert g.replays == WARMUP + 3 - WARMUP
    for i, (b, ids) in enumerate(zip(batches, before)):
        assert torch.equal(b["input_ids"], ids), f"batch {i} was overwritten by a later replay's inputs"


def test_the_eager_step_hands_the_side_streams_work_back(monkeypatch):
    """[G10] graphs.py _eager_step: the caller's stream waits for the side stream after the step, also when the
    step raised (its queued work may still use the caller's tensors)."""
    waits = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            waits.append((self.name, other.name))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream("current"))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    g = StepGraphs("auto")
    g._eager_step(lambda: {"x": torch.zeros(())}, (), watch=False)
    assert waits == [("side", "current"), ("current", "side")]

    def broken():
        raise RuntimeError("step broke")
    waits.clear()
    with pytest.raises(RuntimeError, match="step broke"):
        g._eager_step(broken, (), watch=False)
    assert waits == [("side", "current"), ("current", "side")]


def test_a_key_seen_again_is_not_the_first_forgotten(monkeypatch):
    """[G4] graphs.py run: the warm-up counts are ordered by last sighting (`pop` then re-insert), so a key that
    keeps coming back is not dropped as the oldest."""
    _fake_cuda(monkeypatch)
    step, batch = _sum_step([]), _batch_maker()
    g = StepGraphs("on")
    g.run("step", step, (batch(1, 3),))  # the key of interest, seen once
    for rows in range(2, 4 * MAX_GRAPHS + 1):  # fill the bound
        g.run("step", step, (batch(rows, 3),))
    g.run("step", step, (batch(1, 3),))  # seen again: now the most recent
    g.run("step", step, (batch(4 * MAX_GRAPHS + 1, 3),))  # one key too many: the oldest goes
    kept = [k[2][0][1][0] for k in g._seen]
    assert 1 in kept and 2 not in kept, kept[:3]
