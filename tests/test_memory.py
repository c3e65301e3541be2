"""memory.py's estimate of a step's peak, against the bytes a step really allocates on the CPU (the models are
built there on a CUDA machine too).

`LiveBytes` follows every storage that an aten op creates (in-place results and views of existing tensors are
not new memory) until it is freed, and keeps the high-water mark. Around one step (after a first one has made
AdamW's state), added to what the engine holds between steps, it sees what the GPU's allocator would hold
beyond the weights: the engine's buffers, the optimizer's state and each pass's activations and logits. The
per-layer part of the estimate is checked to within 2 % (the difference between a 1- and a 2-layer model, or a 2-
and a 4-layer one; most settings match to the byte), the whole step beyond the weights to within 8 %.
"""
import gc
import json
import logging
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from booster_fast import Booster, BoosterConfig, memory
from booster_fast.cli import main
from booster_fast.kernels import launches
from booster_fast.kernels.model_kernels import available as kernels_available
from booster_fast.compute import enable_gradient_checkpointing
from booster_fast.lora import add_lora
from booster_fast.model_size import preset_weight_counts, weight_bytes
from booster_fast.models import PRESETS, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


class LiveBytes(TorchDispatchMode):
    """High-water mark of the bytes of the storages created inside (and still alive)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        self._refs = set()

    def _freed(self, n, ref):
        self.live -= n
        self._refs.discard(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t.untyped_storage()) in inputs:
                continue
            st = t.untyped_storage()
            if st in self._seen:
                continue
            self._seen[st] = n = st.nbytes()
            self._refs.add(weakref.ref(st, lambda r, n=n: self._freed(n, r)))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


ROWS, HARMFUL_ROWS, LENGTH = 4, 3, 40


def measure(layers, impl="fast", dtype=torch.bfloat16, targets="q_proj,k_proj,v_proj", kv_heads=4,
            checkpointing=False, method="booster", rows=ROWS, harmful_rows=HARMFUL_ROWS, length=LENGTH, pads=False,
            quant="none", config=None, **cfg):
    """(bytes a step needs beyond the weights, the estimate of the same): what the engine holds between steps
    (its buffers, the LoRA weights, AdamW's state; bench_measure.held_bytes) plus the high-water mark of what
    one step allocates (LiveBytes)."""
    from booster_fast.bench_measure import held_bytes

    torch.manual_seed(0)
    if cfg.get("fused_ops") and not kernels_available("cpu"):
        pytest.skip("the fused kernels run on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
    model, _ = load_model("tiny", dtype=dtype, quant=quant, device="cpu", num_hidden_layers=layers,
                          num_key_value_heads=kv_heads,
                          **(config or {}))
    model = add_lora(model, targets=targets)
    if checkpointing:
        enable_gradient_checkpointing(model)

    def batch(n):  # the first row is full, so every position is computed; pads give the reference a mask
        ids = torch.randint(3, model.config.vocab_size, (n, length))
        mask = torch.ones_like(ids)
        if pads:
            mask[1:, length // 2:] = 0
        return {"input_ids": ids * mask, "labels": torch.where(mask.bool(), ids, -100), "attention_mask": mask}

    if impl == "fast":
        cfg = {"merge_passes": True, "fused_ops": False, "graphs": "off", **cfg}
    booster = Booster(model, BoosterConfig(impl=impl, **cfg))
    a, h = booster.to_device(batch(rows), "cpu"), booster.to_device(batch(harmful_rows), "cpu")
    step = (lambda: booster.step(a, h)) if method == "booster" else (lambda: booster.sft_step(a))
    step()  # AdamW's state exists from here on
    held = held_bytes(booster) - memory.frozen_bytes(model)
    # Triton's interpreter (the fused kernels on the CPU) holds each launch's tensors in reference cycles (its
    # host-copy closures) until the garbage collector runs, how long depending on the release; a compiled kernel
    # holds nothing. Collected at every launch, they are gone by the next one, as on a GPU. (gc.freeze: each of
    # those collections looks at the objects made since, not at every object of torch and transformers)
    gc.collect()
    gc.freeze()
    try:
        with LiveBytes() as live, launches.observed(lambda kernel: gc.collect()):
            step()
    finally:
        gc.unfreeze()
    est = memory.of_booster(booster, rows, harmful_rows, length, method)
    return held + live.peak, est.total - est.weights


CASES = {  # (layers of the two models, settings)
    "fast, grouped kv": ((1, 2), dict(kv_heads=2)),
    # the fused kernels run under Triton's interpreter here, program by program (one per row of a norm, and bf16
    # casts emulated in Python): few rows and tokens
    "fast, fused kernels, all-linear": ((1, 2), dict(fused_ops=True, targets="all-linear", rows=2, harmful_rows=2,
                                                     length=8)),
    "fast, fp32, checkpointing": ((1, 2), dict(dtype=torch.float32, checkpointing=True)),
    "fast, perturb_aware, 2 micro-batches": ((1, 2), dict(perturb_aware=True, grad_accum=2, harmful_rows=2)),
    # a layer's recompute needs more than the logits (3.6x their bytes): the MLP 20x wider than the model
    "fast, checkpointing, wide MLP": ((1, 2), dict(checkpointing=True, config={"intermediate_size": 4096})),
    "fast, sft": ((1, 2), dict(method="sft")),
    "reference, masked, repeated kv": ((1, 2), dict(impl="reference", kv_heads=2, pads=True)),
    "reference, fp32, checkpointing": ((1, 2), dict(impl="reference", dtype=torch.float32, checkpointing=True)),
    "reference, sft": ((1, 2), dict(impl="reference", method="sft")),
    "reference, NF4": ((1, 2), dict(impl="reference", quant="nf4")),
    "fast, NF4": ((1, 2), dict(quant="nf4")),
    # NF4 beside fp32 unquantised weights (the tiny model's default dtype): the residual stream, the norms and the
    # quantised linears' outputs stay fp32, attention and LoRA run in bf16 under autocast. On 2 and 4 layers: the
    # estimate falls ~6 % short of the whole here, and on 1 and 2 layers that shortfall is 9.5 % of a smaller whole
    "fast, NF4, fp32 residual": ((2, 4), dict(quant="nf4", dtype=torch.float32)),
    "reference, NF4, fp32 residual": ((2, 4), dict(impl="reference", quant="nf4", dtype=torch.float32)),
}


@pytest.mark.parametrize("case", CASES)
def test_estimate_matches_the_bytes_a_step_allocates(case):
    (few, more), settings = CASES[case]
    (held_few, est_few), (held, est) = measure(few, **settings), measure(more, **settings)
    # the layers added: the estimate's per-layer bytes (activations and LoRA state) to within 2 %
    assert est - est_few == pytest.approx(held - held_few, rel=0.02)
    # the whole: the head's logits and cross entropy, the final norm, the engine's buffers
    assert 0.92 < est / held < 1.08, (est, held)


def test_estimate_is_an_upper_bound_for_packed_batches():
    """Packed batches carry only their real tokens; the estimate counts every row at max_length."""
    torch.manual_seed(0)
    model, _ = load_model("tiny", dtype=torch.bfloat16, device="cpu", num_hidden_layers=2)
    model = add_lora(model)
    lengths = torch.tensor([40, 23, 31, 12])
    ids = torch.randint(3, model.config.vocab_size, (ROWS, LENGTH))
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "labels": torch.where(mask.bool(), ids, -100), "attention_mask": mask}
    booster = Booster(model, BoosterConfig(merge_passes=True, packing=True, graphs="off"))
    a, h = booster.to_device(batch, "cpu"), booster.to_device(batch, "cpu")
    assert "cu_seqlens" in a  # packed: 106 tokens, not 160
    booster.step(a, h)
    with LiveBytes() as live:
        booster.step(a, h)
    est = memory.of_booster(booster, ROWS, ROWS, LENGTH)
    assert live.peak < est.activations + est.transient < 2 * live.peak


def test_seven_b_layer_by_hand():
    """A Llama-2-7B layer in bf16, per token, counted by hand from the module docstring's list."""
    shape = memory.Shape.of(PRESETS["llama-7b-shape"] | {"vocab_size": 32000})
    h, i, heads, r = 4096, 11008, 32, 32
    norms_fused, norms_eager = 2 * (2 * h + 4), 2 * (4 * h + 4)
    common = 2 * h + 3 * 2 * r + 2 * (4 * h) + 4 * heads  # adapters' input and x·A; q, k, v, out; lse
    targets = ("q_proj", "k_proj", "v_proj")
    assert memory.layer_bytes_per_token(shape, 2, targets, r, fused=True) == norms_fused + common + 2 * 2 * i
    assert memory.layer_bytes_per_token(shape, 2, targets, r, fused=False) == norms_eager + common + 3 * 2 * i
    lora = 32 * r * (3 * h + 3 * h)
    assert memory.lora_parameters(shape, targets, r) == lora
    # the merged pass of 10 + 10 rows x 256 tokens: ~16 GB of activations, ~1.3 GB checkpointed
    full = memory.estimate(shape, weights=0, rows=10, harmful_rows=10, max_length=256)
    ckpt = memory.estimate(shape, weights=0, rows=10, harmful_rows=10, max_length=256, checkpointing=True)
    assert 15 < full.activations / 2**30 < 17 and 1.2 < ckpt.activations / 2**30 < 1.4
    assert full.state == ckpt.state == 24 * lora
    # unmerged, one batch per pass: half the activations (but for the adapters' bf16 weights, kept per pass)
    unmerged = memory.estimate(shape, weights=0, rows=10, harmful_rows=10, max_length=256, merged=False)
    assert unmerged.activations == pytest.approx(full.activations / 2, rel=5e-3)
    # the fast engine's LM head runs in chunks of 2^25 logits (1,048 positions here) at 6 bytes a bf16 logit, so the
    # transient peak is a layer's MLP backward (3 bf16 tensors of the MLP's width per token) ...
    from booster_fast.head_loss import CHUNK_LOGITS
    assert CHUNK_LOGITS // 32000 == 1048 and 6 * 32000 * 1048 < 3 * 2 * i * 20 * 256 == full.transient
    # ... where the model's own head would hold 12 bytes per logit (bf16 logits, their fp32 copy and its gradient)
    # on every position that predicts a token: 255 of a row's 256
    own = memory.estimate(shape, weights=0, rows=10, harmful_rows=10, max_length=256, chunked_head=False)
    assert own.transient == memory.HEAD_BYTES_PER_LOGIT * 32000 * 20 * 255 and memory.HEAD_BYTES_PER_LOGIT == 12
    # the chunked head keeps each position's fp32 input gradient instead: 4 h bytes a position
    assert full.activations - own.activations == 4 * h * 20 * 255


def test_a_grouped_query_layer_by_hand():
    """Llama-70B's shape: 64 query heads over 8 key/value heads. k and v are 1024 wide where the attention keeps
    them grouped (the fast engine's), 8192 where they are repeated first (a masked batch); the log-sum-exp is per
    query head."""
    shape = memory.Shape.of(PRESETS["llama-70b-shape"])
    h, i, heads, kv, r = 8192, 28672, 64, 1024, 32
    fixed = 2 * (2 * h + 4) + 2 * h + 3 * 2 * r + 4 * heads + 2 * 2 * i  # norms, adapters' input, x·A, lse, MLP
    targets = ("q_proj", "k_proj", "v_proj")
    assert memory.layer_bytes_per_token(shape, 2, targets, r, fused=True) == fixed + 2 * (2 * h + 2 * kv)
    assert memory.layer_bytes_per_token(shape, 2, targets, r, fused=True, grouped_kv=False) == fixed + 2 * 4 * h



def test_a_softcapped_head_costs_its_chunks_a_second_fp32_copy():
    """Gemma 2's final logit softcapping, read from the config: the chunked head's transient is a chunk at 8
    bytes a logit, not 6 (head_loss.chunk_bytes_per_logit; test_head_loss measures both). The fused kernel works
    in the logits' place: 2 bytes a bf16 logit, softcapped or not."""
    fields = dict(PRESETS["llama-7b-shape"], vocab_size=256000)
    plain, capped = memory.Shape.of(fields), memory.Shape.of(fields | {"final_logit_softcapping": 30.0})
    assert not plain.softcap and capped.softcap
    targets, chunk = ("q_proj",), 2 ** 25 // 256000
    for fused, per_logit in ((False, (6, 8)), (True, (2, 2))):
        (_, p), (_, c) = (memory.pass_bytes(shape, 256, 255, 2, targets, 32, fused=fused, checkpointing=True,
                                            chunked_head=True) for shape in (plain, capped))
        assert (p, c) == (per_logit[0] * 256000 * chunk, per_logit[1] * 256000 * chunk), fused
    # fused model ops with the head's kernel refused by the engine's probe: the torch ops' bytes
    _, own_ops = memory.pass_bytes(capped, 256, 255, 2, targets, 32, fused=True, checkpointing=True,
                                   chunked_head=True, fused_head=False)
    assert own_ops == 8 * 256000 * chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_softcapping_models_own_head_keeps_one_more_copy_of_its_logits(dtype):
    """Where the model's own head runs (the reference; a head the chunked one cannot stand in for), Gemma 2's
    softcapping keeps the tanh of the logits for its backward: one more logit-sized tensor in the model's dtype,
    measured as the difference of two forward/backward passes, with and without the softcapping."""
    from test_fused_ops import _gemma
    from booster_fast.losses import logits_of, token_losses

    vocab, rows, length = 6007, 3, 41
    ids = torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    peaks = []
    for softcap in (None, 30.0):
        model = _gemma("gemma2", vocab).to(dtype)
        model.config.final_logit_softcapping = softcap
        with LiveBytes() as live:
            token_losses(logits_of(model, batch), batch).sum().backward()
        peaks.append(live.peak)
    logits = rows * (length - 1) * vocab
    assert (peaks[1] - peaks[0]) / logits == pytest.approx(dtype.itemsize, rel=0.1)
    capped = memory.Shape.of(model.config)
    plain = memory.Shape.of(model.config.to_dict() | {"final_logit_softcapping": None})
    assert capped.softcap and not plain.softcap
    (_, plain), (_, capped) = (memory.pass_bytes(shape, rows * length, rows * (length - 1), dtype.itemsize,
                                                 ("q_proj",), 8, fused=False, checkpointing=False)
                               for shape in (plain, capped))
    assert capped - plain == dtype.itemsize * logits

@pytest.mark.parametrize("dtype, quant", [(torch.float32, "none"), (torch.bfloat16, "none"), (None, "nf4")])
def test_weights_counted_from_the_shape_are_the_loaded_bytes(dtype, quant):
    """The weights term `booster-fast memory` prints (from the preset's shape) against the loaded model's bytes."""
    model, tok = load_model("tiny", dtype=dtype, quant=quant, device="cpu")
    model.requires_grad_(False)  # frozen_bytes counts what does not train
    counts = preset_weight_counts("tiny", vocab_size=len(tok))
    # NF4: bitsandbytes also keeps a 1 KiB code table and a few scalars per weight matrix, which the count leaves
    # out (1 % of tiny's 28 small matrices, ~0.01 % of a 7B model's)
    rel = 1e-2 if quant == "nf4" else 1e-4  # (and the rotary embedding's 192-byte frequency buffer)
    assert weight_bytes(*counts, quant, dtype or torch.float32) == pytest.approx(memory.frozen_bytes(model), rel=rel)


def test_a_composite_config_gives_its_text_models_shape():
    """Gemma 3's config holds a vision tower's beside its text model's: the estimate takes the text model's sizes
    (and its softcapping), from the config or from a dict of it."""
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"hidden_size": 320, "intermediate_size": 896, "num_hidden_layers": 3,
                                       "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 64,
                                       "vocab_size": 1003, "final_logit_softcapping": 30.0})
    want = memory.Shape(hidden=320, intermediate=896, layers=3, heads=5, kv_heads=1, head_dim=64, vocab=1003,
                        softcap=True)
    assert memory.Shape.of(config) == memory.Shape.of(config.to_dict()) == want


def test_unknown_shapes_get_no_estimate():
    assert memory.Shape.of({"n_embd": 768, "n_layer": 12}) is None
    assert memory.Shape.of({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 0, "vocab_size": 100}) is None
    assert memory.lora_targets("c_attn") is None
    assert memory.lora_targets("all-linear") == tuple(memory.LINEARS)
    assert memory.lora_targets(["model.layers.0.self_attn.q_proj"]) == ("q_proj",)


def test_memory_command_prints_the_estimate_and_its_alternatives(capsys):
    assert main(["memory", "--model", "llama-7b-shape", "--quant", "nf4", "--gradient-checkpointing",
                 "--steps", "5", "--output", "ignored"]) == 0  # align's command line, as it is
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("llama-7b-shape on cuda: one Booster step, fast engine (merged pass, fused ops), "
                             "10 + 10 rows x 256 tokens")
    rows = {line[2:].split("  ")[0]: line for line in out if line[:1] in "* " and "GiB" in line}
    assert set(rows) == {"NF4", "NF4, --gradient-checkpointing"}
    assert rows["NF4, --gradient-checkpointing"].startswith("* ") and rows["NF4"].startswith("  ")
    assert any(line.startswith("*: the settings given.") for line in out), out  # what the star marks
    assert main(["memory", "--model", "llama-7b-shape", "--method", "sft"]) == 0  # one pass: nothing merged
    assert capsys.readouterr().out.startswith("llama-7b-shape on cuda: one SFT step, fast engine (fused ops), 10 rows")
    shape = memory.Shape.of(PRESETS["llama-7b-shape"])
    from booster_fast.model_size import preset_weight_bytes

    want = memory.estimate(shape, weights=preset_weight_bytes("llama-7b-shape", "nf4"), rows=10, harmful_rows=10,
                           max_length=256, checkpointing=True, graph_warmup=True)  # CUDA graphs, packed: the default
    assert want.warmup == want.activations + want.transient > 0  # a second working set beside the graphs' pool
    assert rows["NF4, --gradient-checkpointing"].split()[-2:] == memory.size(want.total).split()
    assert "warm-up" in out[1] and any(line.startswith("warm-up: with CUDA graphs over packed batches") for line in out)
    for off in (["--graphs", "off"], ["--packing", "off"], ["--device", "cpu"]):  # no graphs, or one shape: none
        assert main(["memory", "--model", "llama-7b-shape", "--quant", "nf4", "--gradient-checkpointing", *off]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "warm-up" not in lines[1], off
        assert lines[0].startswith(f"llama-7b-shape on {'cpu' if off[0] == '--device' else 'cuda'}: "), lines[0]
        if off[0] == "--graphs":
            row = next(line for line in lines if line.startswith("* "))
            assert row.split()[-2:] == memory.size(want.total - want.warmup).split()


def test_memory_command_json_is_the_table_in_bytes(capsys):
    assert main(["memory", "--model", "llama-1b-shape", "--impl", "reference"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert main(["memory", "--model", "llama-1b-shape", "--impl", "reference", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert table[0] == f"llama-1b-shape on cuda: {doc['step']}" and doc["device"] == "cuda"
    assert "warm-up" not in "\n".join(table)  # the reference engine captures no graphs
    assert [s["setting"] for s in doc["settings"]] == ["bf16", "bf16, --gradient-checkpointing", "NF4",
                                                       "NF4, --gradient-checkpointing"]
    assert [s["given"] for s in doc["settings"]] == [True, False, False, False]
    for s, line in zip(doc["settings"], table[2:6]):
        assert s["warmup"] == 0  # the reference engine captures no graphs
        assert s["total"] == s["weights"] + s["state"] + s["activations"] + s["transient"]
        assert line.split()[-2:] == memory.size(s["total"]).split()
    # an fp32 model (tiny's default): NF4 computes the adapters and attention in bf16 (autocast), so it saves less
    # than fp32 does, though its residual stream stays fp32
    assert main(["memory", "--model", "tiny", "--json"]) == 0
    by = {s["setting"]: s for s in json.loads(capsys.readouterr().out)["settings"]}
    assert set(by) == {"fp32", "fp32, --gradient-checkpointing", "NF4", "NF4, --gradient-checkpointing"}
    assert by["NF4"]["activations"] < by["fp32"]["activations"]


def test_memory_command_reads_a_runs_flags(capsys, aligned):
    """--resume RUN: the estimate for that run's own settings (a finished one too)."""
    assert main(["memory", "--resume", str(aligned)]) == 0
    assert capsys.readouterr().out.startswith("tiny on cuda: one Booster step, fast engine (merged pass, fused ops), "
                                              "2 + 2 rows x 64 tokens")  # the run's --device: auto, cuda here


def test_memory_command_bad_input_is_one_line(capsys, tmp_path):
    assert main(["memory", "--model", "llama-1b-shape", "--targets", "c_attn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no estimate for LoRA targets 'c_attn'" in err[0]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
                                                      "n_head": 2, "vocab_size": 100, "bos_token_id": 0,
                                                      "eos_token_id": 0}))  # within the vocabulary
    assert main(["memory", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # add_lora's own line: GPT-2's layers are Conv1D, named c_attn, c_proj, c_fc
    assert len(err) == 1 and "LoRA targets ['q_proj', 'k_proj', 'v_proj'] not found in the model" in err[0]
    assert "it has linear layers named ['c_attn', 'c_fc', 'c_proj', 'lm_head']" in err[0]
    assert main(["memory", "--model", str(tmp_path), "--targets", "c_attn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no estimate for this architecture" in err[0]  # no intermediate_size
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    assert main(["memory", "--model", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("it has no config.json"), err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 0, "vocab_size": 100}))
    assert main(["memory", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot build it from its config" in err[0]
    assert main(["memory", "--batch-size", "3", "--grad-accum", "2"]) == 2  # align's own checks
    assert capsys.readouterr().err.strip() == "booster-fast: error: --batch-size 3 is not a multiple of --grad-accum 2"
    assert main(["memory", "--batch-size", "4", "--harmful-batch-size", "3", "--grad-accum", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("booster-fast: error: --harmful-batch-size 3 is not a multiple of "
                                               "--grad-accum 2")
    assert main(["memory", "--method", "sft", "--perturb-aware"]) == 2
    assert "does nothing with --method sft" in capsys.readouterr().err
    assert main(["memory", "--method", "sft", "--lamb", "3", "--no-meta-term"]) == 2
    assert capsys.readouterr().err.strip() == ("booster-fast: error: --lamb, --no-meta-term: Booster's own; they do "
                                               "nothing with --method sft")
    assert main(["memory", "--method", "sft", "--alpha", "0.2"]) == 2
    assert "--alpha: Booster's own" in capsys.readouterr().err
    assert main(["memory", "--model", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith(f"booster-fast: error: --model {tmp_path / 'absent'}: no such directory")
    assert main(["memory", "--device", "mps"]) == 2
    assert capsys.readouterr().err.strip() == "booster-fast: error: --device mps: give cpu, cuda or cuda:N"
    assert main(["memory", "--targets", "q_proj,v_proj,"]) == 0  # as align takes it
    assert "LoRA r=32 on q_proj,v_proj," in capsys.readouterr().out


def test_log_fit_warns_and_names_checkpointing(monkeypatch, caplog):
    """On a GPU too small for the step: one info line, one warning with the way out (the sizes faked)."""
    model, _ = load_model("tiny", device="cpu", num_hidden_layers=2)
    booster = Booster(add_lora(model), BoosterConfig(merge_passes=True, graphs="off"))
    full = memory.of_booster(booster, 8, 8, 128)
    ckpt = memory.of_booster(booster, 8, 8, 128, checkpointing=True)
    holds = (full.total + ckpt.total) // 2
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr("booster_fast.model_size.cuda_free_bytes", lambda device: holds)
    caplog.clear()  # (the engine's own lines, where an earlier test left the logger at INFO)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert memory.log_fit(booster, 8, 8, 128, "booster", "cuda") == full
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"memory: a step is estimated at {full.describe()}; cuda can hold")
    assert lines[1].endswith(f"--gradient-checkpointing brings it to ~{memory.size(ckpt.total)}")
    caplog.clear()
    monkeypatch.setattr("booster_fast.model_size.cuda_free_bytes", lambda device: full.total)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        memory.log_fit(booster, 8, 8, 128, "booster", "cuda")
    assert [r.levelname for r in caplog.records] == ["INFO"]  # it fits: no warning
    caplog.clear()

    # CUDA graphs over packed batches (faked: this engine has none on the CPU): the warm-up term, and where it
    # alone does not fit, the ways to avoid it
    monkeypatch.setattr(booster.engine, "graphs", object())
    monkeypatch.setattr(booster.engine, "pack", True)
    warm = memory.of_booster(booster, 8, 8, 128)
    assert warm.warmup == warm.activations + warm.transient and warm.total == full.total + warm.warmup
    monkeypatch.setattr("booster_fast.graphs.POOL_WARMUP", True)  # the forward in the pool: the backward beside it
    assert memory.of_booster(booster, 8, 8, 128).warmup == warm.transient
    monkeypatch.setattr("booster_fast.graphs.POOL_WARMUP", False)
    monkeypatch.setattr("booster_fast.model_size.cuda_free_bytes", lambda device: full.total)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        memory.log_fit(booster, 8, 8, 128, "booster", "cuda")
    warning = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "WARNING" and warning.endswith(
        f"the eager warm-up of each new packed length beside the CUDA graphs takes {memory.size(warm.warmup)}: "
        f"--packing off (one shape) or --graphs off avoids it"), warning
    assert "a new length's warm-up beside the CUDA graphs" in caplog.records[0].getMessage()
    caplog.clear()

    def broken(*args, **kwargs):
        raise AttributeError("an adapter config without target_modules")

    monkeypatch.setattr(memory, "of_booster", broken)  # advice only: never the end of a run
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert memory.log_fit(booster, 8, 8, 128, "booster", "cuda") is None
    assert [r.getMessage() for r in caplog.records] == [
        "memory: no estimate for this model (an adapter config without target_modules)"]


def test_the_readme_memory_table_is_what_booster_fast_memory_says(capsys):
    """README's 7B table (bf16 and NF4, with and without checkpointing) is `booster-fast memory`'s estimate, column
    by column, so that it follows any change of the estimate."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## How much memory"):]
    section = section[:section.index("\n## ")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith(("| bf16 |", "| NF4 |"))]
    assert main(["memory", "--model", "llama-7b-shape", "--quant", "none", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    gib = lambda b: f"{b / 2 ** 30:.1f} GiB"  # noqa: E731
    want = [[s["setting"].split(",")[0], "on" if "checkpointing" in s["setting"] else "off", gib(s["weights"]),
             gib(s["state"]), gib(s["activations"]), gib(s["transient"]), gib(s["warmup"]), gib(s["total"]),
             gib(s["total"] - s["warmup"])] for s in settings]
    assert rows == want


def test_the_peak_pass_is_the_larger_batch_of_an_unmerged_step():
    """The reference runs one batch per pass: a harmful batch larger than the alignment batch sets the peak."""
    shape = memory.Shape.of(PRESETS["llama-7b-shape"] | {"vocab_size": 32000})
    est = {rows: memory.estimate(shape, weights=0, rows=rows, harmful_rows=h, max_length=256, impl="reference")
           for rows, h in ((2, 10), (10, 10))}
    assert (est[2].activations, est[2].transient) == (est[10].activations, est[10].transient)
