"""Packed (pad-free) batches: the layout, the per-segment attention against a float64 reference, and the fast
step on packed batches against the reference on padded ones."""
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

import booster_fast as bf
from booster_fast import attention
from booster_fast.attention import segment_attention, varlen_attention_forward
from booster_fast.batches import micro_batches, to_device
from booster_fast.compute import enable_gradient_checkpointing
from booster_fast.opcount import count_ops
from booster_fast.packing import bucket_size, concat_packed, pack

from test_fast import SEED, builtin_batches, first_update, make_model, randomize_lora_b_, relative, step_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def ragged_batch(lengths, width, vocab=1000, seed=0):
    """Right-padded random tokens with the given real lengths; the first third of each row is an unlabelled prompt."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths)[:, None]
    pos = torch.arange(width).expand(len(lengths), width)
    real = pos < n
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g).masked_fill(~real, 0)
    labels = ids.masked_fill(~real | (pos < n // 3), -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": real.long()}


def test_pack_layout():
    lengths = [37, 0, 53, 53, 11]  # an empty row and a full one among irregular lengths
    batch = ragged_batch(lengths, 53)
    batch["labels"][3] = batch["input_ids"][3]  # a full row labelled from its first token: nothing to wrap around to
    p = pack(batch)
    total, size = sum(lengths), p["input_ids"].shape[1]
    step = bucket_size(5, 53)
    assert size % step == 0 and total < size < total + step, "the packed length is not the next bucket"
    assert p["cu_seqlens"].dtype == torch.int32
    assert step > 53, "the filler should need more than one segment here"
    fill = size - total
    chunks = [min(53, max(0, fill - i * 53)) for i in range(-(-step // 53))]
    ends = [sum(chunks[:i + 1]) + total for i in range(len(chunks))]
    assert p["cu_seqlens"].tolist() == [0, 37, 37, 90, 143, 154] + ends and ends[-1] == size
    assert p["max_seqlen"] == 53
    # the LM head runs on the labelled positions only: the targets of every position, scattered back from `keep`
    keep, kept = p["keep"], p["targets"][0]
    labelled = int((kept != -100).sum())
    assert keep.numel() % step == 0 or keep.numel() == size, "the kept count is not bucketed"
    assert (keep[labelled:] == size - 1).all() and (kept[labelled:] == -100).all(), "the padding of `keep`"
    assert (keep[:labelled].diff() > 0).all(), "kept positions are not in order"
    full = torch.full((size,), -100)
    full[keep[:labelled]] = kept[:labelled]
    start = 0
    for row, n in enumerate(lengths):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        seg = slice(start, start + n)
        assert torch.equal(p["input_ids"][0, seg], ids[:n])
        assert torch.equal(p["position_ids"][0, seg], torch.arange(n))
        # position j predicts token j + 1 of its own row; the row's last token predicts nothing
        want = torch.cat([labels[1:n], torch.tensor([-100])])[:n]
        assert torch.equal(full[seg], want), f"row {row}: targets are not the labels shifted in-row"
        start += n
    assert (full[total:] == -100).all()
    assert torch.equal(p["position_ids"][0, total:], torch.cat([torch.arange(n) for n in chunks]))
    assert labelled == int((batch["labels"][:, 1:] != -100).sum())


def test_unbucketed_pack_holds_exactly_the_real_and_labelled_positions(batch):
    """Without CUDA graphs nothing is rounded: P is the real tokens, K the labelled ones, max_seqlen the longest
    row; an all-pad batch packs to one filler token. The step on it gives the reference's gradient."""
    lengths = [37, 0, 29, 11]
    b = ragged_batch(lengths, 53)
    p = pack(b, bucketed=False)
    labelled = int((b["labels"][:, 1:] != -100).sum())
    assert p["input_ids"].shape == (1, sum(lengths)) and p["cu_seqlens"].tolist() == [0, 37, 37, 66, 77, 77]
    assert p["keep"].numel() == labelled and (p["targets"] != -100).all() and p["max_seqlen"] == 37
    empty = pack(ragged_batch([0, 0], 16), bucketed=False)
    assert empty["input_ids"].shape == (1, 1) and empty["cu_seqlens"].tolist() == [0, 0, 0, 1]
    # the engine without graphs (the CPU) gets them from to_device; the update is the reference's
    booster = bf.Booster(make_model()[0], bf.BoosterConfig(packing=True))
    a, h = (booster.to_device(x, "cpu") for x in batch)
    assert a["input_ids"].shape[1] == int(batch[0]["attention_mask"].sum())
    ref = first_update("reference", batch)
    fast = first_update("fast", (a, h), packing=True)
    assert relative(fast[:ref.numel()], ref) <= 1e-5


def test_a_batch_without_pads_packs_to_its_padded_size():
    batch = ragged_batch([64] * 8, 64)
    p = pack(batch)
    assert p["input_ids"].shape == (1, 512) and p["cu_seqlens"][-2:].tolist() == [512, 512], \
        "a full batch should need no filler"
    assert p["cu_seqlens"].numel() == 8 + 1 + 1
    assert torch.equal(p["input_ids"][0], batch["input_ids"].flatten())


def test_pack_refuses_what_it_cannot_pack_exactly():
    batch = ragged_batch([5, 8], 8)
    with pytest.raises(ValueError, match="right-padded"):
        pack({k: v.flip(1) for k, v in batch.items()})
    labelled_pad = dict(batch, labels=batch["labels"].clone())
    labelled_pad["labels"][0, 6] = 3
    with pytest.raises(ValueError, match="pad position carries a label"):
        pack(labelled_pad)
    with pytest.raises(ValueError, match="micro-batches"):
        micro_batches(pack(batch), 2)


def test_concat_packed_offsets_the_second_batch():
    a, b = pack(ragged_batch([5, 9], 9, seed=1)), pack(ragged_batch([3, 7, 2], 7, seed=2))
    both = concat_packed(a, b)
    n = a["input_ids"].shape[1]
    assert torch.equal(both["cu_seqlens"], torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + n]))
    assert torch.equal(both["targets"], torch.cat([a["targets"], b["targets"]], 1))
    assert torch.equal(both["keep"], torch.cat([a["keep"], b["keep"] + n]))
    assert both["max_seqlen"] == max(a["max_seqlen"], b["max_seqlen"])


def per_segment_reference(q, k, v, cu, scale):
    """float64 causal attention run separately on each segment (GQA by repeating the kv heads)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_segment_attention_matches_per_segment_float64(heads, kv_heads):
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 17, 17, 60, 61, 97], dtype=torch.int32)  # an empty and a one-token segment
    tokens, dim = 97, 24
    q = torch.randn(tokens, heads, dim, generator=g, requires_grad=True)
    k = torch.randn(tokens, kv_heads, dim, generator=g, requires_grad=True)
    v = torch.randn(tokens, kv_heads, dim, generator=g, requires_grad=True)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = segment_attention(q, k, v, cu, 43, scale=0.3)
    want = per_segment_reference(*exact, cu, 0.3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, exact, grad.double())
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.fixture(scope="module")
def batch():
    _, tok = bf.load_model("tiny", device="cpu")
    (b,) = builtin_batches(tok, 1, batch_size=8, max_length=160)  # ~60% real tokens: packing shrinks them
    assert all(pack(x)["input_ids"].numel() < x["input_ids"].numel() for x in b), "packing would prove nothing"
    return b


@pytest.fixture(scope="module")
def few_rows(batch):
    """The first three rows of each of `batch`'s two batches, for the slow steps (bf16, NF4 on the CPU)."""
    b = tuple({k: v[:3] for k, v in x.items()} for x in batch)
    assert all(pack(x)["input_ids"].numel() < x["input_ids"].numel() for x in b), "packing would prove nothing"
    return b


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("meta", [True, False])
def test_packed_fast_step_gives_the_reference_gradient(batch, merge, meta):
    """The combined gradient the optimizer receives, on packed batches, equals the reference's on padded ones
    (fp32 summation order only), and so do the logged losses."""
    ref = first_update("reference", batch, meta_term=meta)
    booster = bf.Booster(make_model()[0], bf.BoosterConfig(packing=True, merge_passes=merge, meta_term=meta))
    assert booster.engine.pack
    packed = tuple(pack(b) for b in batch)
    fast = first_update("fast", packed, packing=True, merge_passes=merge, meta_term=meta)
    assert ref.norm() > 0
    err = relative(fast[:ref.numel()], ref)
    assert err <= 1e-5, f"merge={merge} meta={meta}: packed gradient differs from the reference by {err:.3g}"
    out_ref = bf.Booster(make_model()[0], bf.BoosterConfig(impl="reference", meta_term=meta)).step(*batch)
    out = bf.Booster(make_model()[0], bf.BoosterConfig(packing=True, merge_passes=merge, meta_term=meta)).step(*packed)
    for key in ("loss", "harmful_loss", "harmful_grad_norm") + (("harmful_loss_perturbed",) if meta else ()):
        torch.testing.assert_close(out[key], out_ref[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_packed_grad_accumulation_is_exact(batch):
    """With grad_accum > 1, to_device packs each micro-batch; the update equals one packed batch."""
    four = bf.Booster(make_model()[0], bf.BoosterConfig(packing=True, grad_accum=4))
    lists = tuple(four.to_device(b, "cpu") for b in batch)
    assert all(isinstance(x, list) and len(x) == 4 for x in lists)
    assert any("cu_seqlens" in m for x in lists for m in x), "no micro-batch was packed: the test proves nothing"
    g1 = first_update("fast", tuple(pack(b) for b in batch), packing=True)
    g4 = first_update("fast", lists, packing=True, grad_accum=4)
    assert relative(g4, g1) <= 1e-5, f"4 packed micro-batches differ from one packed batch by {relative(g4, g1):.3g}"


def test_a_collators_extra_keys_do_not_stop_the_split_into_micro_batches(batch):
    """A collated batch may carry non-tensor keys (ids, sources): to_device splits it into micro-batches before
    it keeps the model's keys, so the split must pass over them (it crashed on list.chunk)."""
    align = dict(batch[0], source=["builtin"] * batch[0]["input_ids"].shape[0])
    parts = micro_batches(align, 2)
    assert len(parts) == 2 and all(set(p) == set(batch[0]) for p in parts)
    four = bf.Booster(make_model()[0], bf.BoosterConfig(packing=True, grad_accum=2))
    sent = four.to_device(align, "cpu")
    assert isinstance(sent, list) and len(sent) == 2 and all("input_ids" in m and "source" not in m for m in sent)


@pytest.mark.parametrize("quant, checkpointing", [("none", True), ("nf4", False)])
def test_packed_step_matches_padded_and_reads_nothing_back(few_rows, quant, checkpointing):
    """NF4 and gradient checkpointing (whose recompute must see the segments again): the packed step gives the
    padded step's gradient, and no op of it reads a value back to the host. Two layers and three rows a batch
    (NF4's bf16 matmuls are slow on a CPU without bf16 instructions)."""
    grads = {}
    for packing in (False, True):
        model, _ = bf.load_model("tiny", quant=quant, seed=SEED, device="cpu", num_hidden_layers=2)
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(SEED)
        booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                             bf.BoosterConfig(packing=packing, merge_passes=True))
        a, h = (pack(b) if packing else booster.to_device(b, "cpu") for b in few_rows)
        grads[packing] = step_gradient(booster, a, h)[0]
        if packing:
            for fn, args in ((booster.step, (a, h)), (booster.sft_step, (a,))):
                syncs = count_ops(fn, *args)["host_syncs"]
                assert not syncs, f"packed {fn.__name__} reads back to the host: {syncs}"
    tol = 1e-5 if quant == "none" else 2e-2  # NF4 computes in bf16: other sums, other roundings
    err = relative(grads[True], grads[False])
    assert err <= tol, f"{quant} checkpointing={checkpointing}: packed differs from padded by {err:.3g}"


def test_packing_default_and_unsupported_models(caplog):
    booster = bf.Booster(make_model()[0], bf.BoosterConfig())
    assert booster.engine.pack, "packing is measured to pay on the CPU too"
    assert "cu_seqlens" in booster.to_device(ragged_batch([40, 7, 64], 64), "cpu")
    full = booster.to_device(ragged_batch([64] * 8, 64), "cpu")
    assert "cu_seqlens" not in full and "attention_mask" not in full, \
        "a batch that packing does not shrink goes padded, without its mask"
    reference = bf.Booster(make_model()[0], bf.BoosterConfig(impl="reference", packing=True))
    batch = ragged_batch([3, 5], 5)
    assert "attention_mask" in reference.to_device(batch, "cpu"), "the reference never packs"
    with pytest.raises(ValueError, match="reference engine takes padded batches"):
        reference.sft_step(pack(batch))


# Falcon's attention code is its own before transformers 5.25; from 5.25 on it looks its attention up in the
# registry (so its right-padded batches may leave their masks out), but does not pass packing's arguments on
FALCON_OWN_ATTENTION = Version(transformers.__version__) < Version("5.25")


def _own_attention_model(arch: str, vocab_size: int):
    """A small random model of a family whose attention code does not go through transformers' registry, with
    LoRA on its query/value projections: XGLM, GPT-Neo, Bloom (eager), Falcon (sdpa, which breaks when its
    attention implementation name is swapped, before transformers 5.25)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {"xglm": dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=256),
              "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                              max_position_embeddings=256, embed_dropout=0.0, attention_dropout=0.0,
                              resid_dropout=0.0),
              "bloom": dict(hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
              "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, alibi=False, new_decoder_architecture=False)}
    targets = {"xglm": ("q_proj", "v_proj"), "gpt_neo": ("q_proj", "v_proj")}.get(arch, ("query_key_value",))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=vocab_size, **shapes[arch]),
                                             attn_implementation="sdpa" if arch == "falcon" else "eager")
    torch.manual_seed(SEED)
    return randomize_lora_b_(bf.add_lora(model.float(), r=8, alpha=16, targets=targets), SEED + 1)


@pytest.mark.parametrize("arch", ["xglm", "gpt_neo", "bloom", "falcon"])
def test_models_with_their_own_attention_are_not_packed(batch, arch, caplog):
    """Packing (and leaving masks out) works through transformers' attention registry. Models with attention code
    of their own once packed silently wrong (sequences attending to each other) or crashed; the engine's probe
    now finds them when it is built: they run padded (Falcon before transformers 5.25 with its masks), and the
    step is the reference's."""
    vocab = int(max(b["input_ids"].max() for b in batch)) + 1
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        booster = bf.Booster(_own_attention_model(arch, vocab), bf.BoosterConfig())
    assert not booster.engine.pack and "packing off" in caplog.text, caplog.text
    if arch == "falcon" and FALCON_OWN_ATTENTION:  # its own code breaks under the mask-free attention: masks kept
        assert not booster.engine.drop_mask and "attention masks kept" in caplog.text, caplog.text
    elif arch == "falcon":  # its attention goes through the registry, but without the packed batch's arguments
        assert booster.engine.drop_mask and "not handed the packed sequences' boundaries" in caplog.text, caplog.text
    else:
        assert booster.engine.drop_mask and "registry" in caplog.text, caplog.text
    with pytest.raises(ValueError, match="packing=True"):
        bf.Booster(_own_attention_model(arch, vocab), bf.BoosterConfig(packing=True))
    fast = step_gradient(booster, *(booster.to_device(b, "cpu") for b in batch))[0]
    ref = step_gradient(bf.Booster(_own_attention_model(arch, vocab), bf.BoosterConfig(impl="reference")), *batch)[0]
    err = relative(fast[:ref.numel()], ref)
    assert err <= 1e-5, f"{arch}: fast differs from the reference by {err:.3g}"


def test_the_attention_probe_in_bf16_logs_its_margin_and_refuses_a_leak(monkeypatch, caplog):
    """In bf16 the probe's tolerance is 1e-1 (kernels round differently, and deep random-init models amplify
    it), and rows that attend to each other (0.8 relative) are still refused; the errors it measured are logged
    where the forms do not agree bit for bit."""
    model, _ = bf.load_model("tiny", dtype=torch.bfloat16, seed=SEED)
    model.requires_grad_(False)  # the base frozen, as under LoRA: it computes in bf16
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert attention.probe_attention(model) == (None, None)
    assert "attention probe:" not in caplog.text, caplog.text  # on the CPU the three forms agree exactly
    exact = attention.segment_attention

    def leaky(q, k, v, cu, max_seqlen, scale=None, dropout=0.0):  # every token in one segment
        whole = torch.tensor([0, q.shape[0]], dtype=cu.dtype, device=cu.device)
        return exact(q, k, v, whole, q.shape[0], scale=scale, dropout=dropout)

    monkeypatch.setattr(attention, "segment_attention", leaky)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        why_pack, why_mask = attention.probe_attention(model)
    assert why_mask is None and why_pack is not None and "packed logits differ" in why_pack, why_pack
    assert "the mask-free and packed logits differ from the padded ones by 0.0e+00 and " in caplog.text
    assert "(tolerance 1e-01)" in caplog.text, caplog.text


def test_the_attention_probe_names_the_form_whose_forward_failed(monkeypatch):
    """A model whose forward cannot take a form (StableLM's packed forward raises KeyError: 'cu_seq_lens_q') is
    refused that form with a reason naming it, not with the bare exception."""
    model, _ = bf.load_model("tiny", seed=SEED)

    def fails(q, k, v, cu, max_seqlen, scale=None, dropout=0.0):
        raise KeyError("cu_seq_lens_q")

    monkeypatch.setattr(attention, "segment_attention", fails)
    assert attention.probe_attention(model) == ("its packed forward failed (KeyError: 'cu_seq_lens_q')", None)


def test_varlen_attention_names_the_boundaries_a_layer_was_not_handed():
    """A model that calls the registered attention without passing its forward's arguments on (Falcon from
    transformers 5.25 on) is told so in words, which the probe's packing-off line then carries."""
    q = torch.randn(1, 4, 8, 16)
    for kwargs in ({}, {"cu_seq_lens_q": torch.tensor([0, 3, 8], dtype=torch.int32)}, {"max_length_q": 5}):
        with pytest.raises(ValueError, match=r"not handed the packed sequences' boundaries \(cu_seq_lens_q"):
            varlen_attention_forward(None, q, q, q, **kwargs)


def test_varlen_attention_takes_one_row():
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="one row"):
        varlen_attention_forward(None, q, q, q, cu_seq_lens_q=torch.tensor([0, 8], dtype=torch.int32),
                                 max_length_q=8)


def test_packed_attention_applies_the_layers_dropout():
    """A model trained with attention dropout gets it in its packed batches too (the layer passes its rate in
    training mode): the output depends on the seed, and reproducibly so."""
    q, k, v = (torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)

    def attend(dropout, seed=0):
        torch.manual_seed(seed)
        return varlen_attention_forward(None, q, k, v, dropout=dropout, cu_seq_lens_q=cu, max_length_q=5)[0]

    assert torch.equal(attend(0.5), attend(0.5)) and not torch.equal(attend(0.5), attend(0.5, seed=1))
    assert not torch.allclose(attend(0.5), attend(0.0)) and torch.equal(attend(0.0), attend(0.0, seed=1))


@pytest.mark.parametrize("extra, why", [({"sliding_window": 4}, "sliding window of 4"), ({"softcap": 50.0}, "softcap"),
                                        ({"s_aux": torch.zeros(4)}, "s_aux")])
def test_varlen_attention_refuses_what_it_does_not_implement(extra, why):
    q = torch.randn(1, 4, 8, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=why):
        varlen_attention_forward(None, q, q, q, cu_seq_lens_q=cu, max_length_q=5, **extra)
    # the same keywords left unset (as Mistral and Qwen2 pass them), or a window no segment fills, are fine
    out, _ = varlen_attention_forward(None, q, q, q, cu_seq_lens_q=cu, max_length_q=5, sliding_window=None,
                                      softcap=None)
    assert out.shape == (1, 8, 4, 16)
    assert torch.equal(varlen_attention_forward(None, q, q, q, cu_seq_lens_q=cu, max_length_q=5, sliding_window=5)[0],
                       out)


def _mistral(window: int, vocab_size: int):
    """A small random Mistral (sliding-window attention) in fp32, with LoRA."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(SEED)
    model = MistralForCausalLM(MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=window, max_position_embeddings=512))
    torch.manual_seed(SEED)
    return randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1)


@pytest.mark.parametrize("window", [200, 24])
def test_sliding_window_models_pack_the_batches_the_window_does_not_touch(batch, window):
    """Mistral's window changes nothing for sequences no longer than it: such batches pack. Batches with longer
    rows go padded, where the model builds its own windowed mask. Either way the step is the reference's."""
    vocab = int(max(b["input_ids"].max() for b in batch)) + 1
    booster = bf.Booster(_mistral(window, vocab), bf.BoosterConfig(packing=True))
    assert booster.engine.pack and booster.engine.window == window
    assert bf.Booster(_mistral(4, vocab), bf.BoosterConfig(packing=True)).engine.pack, \
        "a window narrower than the build-time probe's rows must not rule packing out"
    a, h = (booster.to_device(b, "cpu") for b in batch)
    longest = max(int(b["attention_mask"].sum(1).max()) for b in batch)
    assert ("cu_seqlens" in a) == (longest <= window) and "attention_mask" not in a, (longest, window)
    if "cu_seqlens" not in a:  # padded as the engine pads without graphs: to the batch's longest row
        assert a["input_ids"].shape[1] == int(batch[0]["attention_mask"].sum(1).max()) < batch[0]["input_ids"].shape[1]
    fast = step_gradient(booster, a, h)[0]
    ref = step_gradient(bf.Booster(_mistral(window, vocab), bf.BoosterConfig(impl="reference")), *batch)[0]
    err = relative(fast[:ref.numel()], ref)
    assert err <= 1e-5, f"window {window}: fast differs from the reference by {err:.3g}"
    # padded without the mask: the mask-free causal SDPA where the window is wider than the rows (no mask
    # building, no host read), the model's own windowed mask where it is not
    from booster_fast import attention

    padded = bf.Booster(_mistral(window, vocab), bf.BoosterConfig(packing=False))
    a, h = (padded.to_device(b, "cpu") for b in batch)
    before = attention._calls[attention.CAUSAL_SDPA]
    grad = step_gradient(padded, a, h)[0]
    assert (attention._calls[attention.CAUSAL_SDPA] > before) == (a["input_ids"].shape[1] <= window)
    assert relative(grad[:ref.numel()], ref) <= 1e-5
    if a["input_ids"].shape[1] <= window:
        assert not count_ops(padded.step, a, h)["host_syncs"], "the mask-free padded step reads back to the host"


def test_the_mask_free_attention_at_the_window_boundary():
    """Rows exactly as long as the sliding window are causal only (the window reaches back window - 1 tokens): the
    mask-free causal SDPA runs them, with the model's own windowed result; one token more keeps the model's mask."""
    from booster_fast import attention

    model = _mistral(8, 50).eval()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(SEED))
    for width, expected in ((8, attention.CAUSAL_SDPA), (9, "sdpa")):
        batch = {"input_ids": ids[:, :width]}
        with torch.no_grad(), attention.unmasked_causal(model, batch):
            assert model.config._attn_implementation == expected, width
            free = model(input_ids=batch["input_ids"]).logits
        with torch.no_grad():
            own = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits
        assert model.config._attn_implementation == "sdpa"
        assert torch.allclose(free, own, atol=1e-5), width


def _fake_flash_apis():
    """Stand-ins for the three shapes torch's varlen_attn has had (2.10: is_causal and no scale; 2.11: window_size
    and scale, no enable_gqa; later: enable_gqa too), computing with the exact grid path, recording what they were
    called with. Without enable_gqa, `no_gqa` refuses grouped k/v as a kernel of equal head counts would, and
    `no_gqa_native` takes them (as the flash kernel behind torch 2.11's does)."""
    calls = []

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        calls.append({"is_causal": is_causal, "kv_heads": key.shape[1]})
        assert is_causal
        return segment_attention(query.float(), key.float(), value.float(), cu_seq_q, max_q).to(query.dtype)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        calls.append({"window_size": window_size, "scale": scale, "enable_gqa": enable_gqa})
        assert window_size == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
        return segment_attention(query.float(), key.float(), value.float(), cu_seq_q, max_q,
                                 scale=scale).to(query.dtype)

    def no_gqa_native(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
        calls.append({"window_size": window_size, "scale": scale, "kv_heads": key.shape[1]})
        assert window_size == (-1, 0)
        return segment_attention(query.float(), key.float(), value.float(), cu_seq_q, max_q,
                                 scale=scale).to(query.dtype)

    def no_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
        if key.shape[1] != query.shape[1]:
            raise RuntimeError("Number of heads in key/value must equal the number of heads in query")
        return no_gqa_native(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size)

    return old, new, no_gqa, no_gqa_native, calls


@pytest.mark.parametrize("api", ["old", "no_gqa", "no_gqa_native", "new"])
def test_flash_varlen_is_called_the_way_each_torch_takes_it(monkeypatch, caplog, api):
    """The packed attention finds flash's variable-length kernel whichever shape its API has (after the probe an
    engine runs when it is built: grouped k/v heads go in as they are where the kernel takes them, else
    repeated), falls back to the grid (one log line) where the kernel cannot compute the model's attention, and
    after a run-time failure."""
    from booster_fast import attention

    old, new, no_gqa, no_gqa_native, calls = _fake_flash_apis()
    fake = {"old": old, "no_gqa": no_gqa, "no_gqa_native": no_gqa_native, "new": new}[api]
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    attention._flash_varlen.cache_clear()
    monkeypatch.setattr(attention, "_flash_failed", None)
    monkeypatch.setattr(attention, "_gqa_repeat", False)
    monkeypatch.setattr(attention, "_logged", set())
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    assert attention.probe_flash("cpu", torch.bfloat16, 4, 2, 16) is None
    assert attention._gqa_repeat == (api == "no_gqa") and attention.packed_kv_grouped("cuda") == (api != "no_gqa")
    calls.clear()
    g = torch.Generator().manual_seed(9)
    cu = torch.tensor([0, 30, 31, 70], dtype=torch.int32)
    q = torch.randn(1, 4, 70, 16, generator=g).bfloat16()
    kv = torch.randn(1, 2, 70, 16, generator=g).bfloat16()
    want = segment_attention(q[0].transpose(0, 1).float(), kv[0].transpose(0, 1).float(),
                             kv[0].transpose(0, 1).float(), cu, 40)
    try:
        with caplog.at_level(logging.INFO, logger="booster_fast"):
            out, _ = varlen_attention_forward(None, q, kv, kv, scaling=0.25, cu_seq_lens_q=cu, max_length_q=40)
            assert len(calls) == 1, "flash was not used for a bf16 batch with the default scale"
            if api.startswith("no_gqa"):
                assert calls[0]["kv_heads"] == (4 if api == "no_gqa" else 2), calls
            torch.testing.assert_close(out[0].float(), want, rtol=2e-2, atol=2e-2)
            varlen_attention_forward(None, q.float(), kv.float(), kv.float(), scaling=0.25, cu_seq_lens_q=cu,
                                     max_length_q=40)
            assert len(calls) == 1, "flash was called with fp32 inputs"
            out, _ = varlen_attention_forward(None, q, kv, kv, scaling=0.1, cu_seq_lens_q=cu, max_length_q=40)
            assert len(calls) == (1 if api == "old" else 2), "a scale the API cannot take reached it"
            if api != "old":
                assert calls[-1]["scale"] == 0.1, calls[-1]
            want_01 = segment_attention(q[0].transpose(0, 1).float(), kv[0].transpose(0, 1).float(),
                                        kv[0].transpose(0, 1).float(), cu, 40, scale=0.1)
            torch.testing.assert_close(out[0].float(), want_01, rtol=2e-2, atol=2e-2)  # the model's scale, either way

            def broken(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
                raise RuntimeError("no kernel image is available for execution on the device\nmore")
            monkeypatch.setattr(varlen, "varlen_attn", broken)
            attention._flash_varlen.cache_clear()
            for _ in range(2):
                out, _ = varlen_attention_forward(None, q, kv, kv, scaling=0.25, cu_seq_lens_q=cu, max_length_q=40)
                torch.testing.assert_close(out[0].float(), want, rtol=2e-2, atol=2e-2)
    finally:
        attention._flash_varlen.cache_clear()
    assert "packed attention: flash variable-length kernel" in caplog.text
    assert "no flash variable-length kernel (torch.float32 (it needs bf16 or fp16))" in caplog.text
    if api == "old":
        assert "takes no scale" in caplog.text
    assert caplog.text.count("flash varlen failed: no kernel image is available for execution on the device") == 1


def test_flash_out_of_memory_is_raised_and_keeps_the_kernel(monkeypatch):
    """Out of memory inside flash's kernel is the step's failure (align reports it, exit 4), not the kernel's: it
    is raised, and the packed attention keeps flash for the steps after it (a RuntimeError of its own switches
    to the grid for the rest of the run)."""
    from booster_fast import attention
    import torch.nn.attention.varlen as varlen

    def oom(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(varlen, "varlen_attn", oom)
    attention._flash_varlen.cache_clear()
    monkeypatch.setattr(attention, "_flash_failed", None)
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(37, 4, 16, generator=g).bfloat16() for _ in range(3))
    cu = torch.tensor([0, 12, 37], dtype=torch.int32)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            attention._flash(q, k, v, cu, 25, None, 0.0)
        assert attention._flash_failed is None
    finally:
        attention._flash_varlen.cache_clear()


def test_flash_probe_accepts_a_sound_kernel_and_rejects_a_wrong_one(monkeypatch):
    """probe_flash, run when a packing engine is built on CUDA, checks the kernel forward and backward against the
    exact grid path; a kernel that computes something else, or has no backward, is switched off with a reason."""
    from booster_fast import attention
    import torch.nn.attention.varlen as varlen

    _, new, _, _, calls = _fake_flash_apis()

    def wrong(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
              enable_gqa=False):
        return new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                   enable_gqa=enable_gqa) * 1.1

    def forward_only(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
        with torch.no_grad():
            return new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                       enable_gqa=enable_gqa)

    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    try:
        for fake, verdict in ((new, None), (wrong, "disagrees with the exact path"),
                              (forward_only, "backward failed")):
            monkeypatch.setattr(varlen, "varlen_attn", fake)
            monkeypatch.setattr(attention, "_flash_failed", None)
            attention._flash_varlen.cache_clear()
            why = attention.probe_flash("cpu", torch.bfloat16, 4, 2, 16)
            if verdict is None:
                assert why is None and calls, "a sound kernel was rejected"
            else:
                assert verdict in why and attention._flash_failed == why, (fake.__name__, why)
    finally:
        attention._flash_varlen.cache_clear()


def test_flash_probe_repeats_grouped_kv_only_where_the_kernel_needs_it(monkeypatch, caplog):
    """Where varlen_attn takes no enable_gqa, grouped k/v heads go in as they are; a kernel that refuses them, or
    takes them and computes something else, gets them repeated to every query head (one log line), and one that
    is wrong either way is switched off."""
    from booster_fast import attention
    import torch.nn.attention.varlen as varlen

    _, _, no_gqa, no_gqa_native, calls = _fake_flash_apis()

    def grouped_wrong(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):  # takes grouped k/v but pairs each query head with k/v head 0
        if key.shape[1] != query.shape[1]:
            key, value = (x[:, :1].expand(-1, query.shape[1], -1) for x in (key, value))
        return no_gqa_native(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size)

    def always_wrong(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
        return no_gqa_native(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size) * 1.1

    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    try:
        for fake, repeat, verdict in ((no_gqa_native, False, None), (no_gqa, True, None),
                                      (grouped_wrong, True, None), (always_wrong, True, "disagrees")):
            monkeypatch.setattr(varlen, "varlen_attn", fake)
            monkeypatch.setattr(attention, "_flash_failed", None)
            monkeypatch.setattr(attention, "_gqa_repeat", False)
            attention._flash_varlen.cache_clear()
            calls.clear()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="booster_fast"):
                why = attention.probe_flash("cpu", torch.bfloat16, 4, 2, 16)
            assert attention._gqa_repeat == repeat, fake.__name__
            assert (verdict is None and why is None) or (verdict in why and attention._flash_failed == why), why
            assert ("the k/v heads go in repeated" in caplog.text) == repeat, caplog.text
            assert calls and calls[-1]["kv_heads"] == (4 if repeat else 2), (fake.__name__, calls)
            assert attention.probe_flash("cpu", torch.bfloat16, 4, 4, 16) == why  # equal heads: nothing to repeat
    finally:
        attention._flash_varlen.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_flash_varlen_matches_segment_grid_on_cuda(heads, kv_heads):
    """On CUDA in bf16 the packed attention runs flash's variable-length kernel: it must agree with the exact
    grid path (float32 inputs upcast) within bf16 rounding, values and gradients."""
    g = torch.Generator(device="cuda").manual_seed(5)
    cu = torch.tensor([0, 100, 100, 357, 358, 611], dtype=torch.int32, device="cuda")
    tokens, dim = 611, 64
    q = torch.randn(1, heads, tokens, dim, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, tokens, dim, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, tokens, dim, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = varlen_attention_forward(None, q, k, v, scaling=dim ** -0.5, cu_seq_lens_q=cu, max_length_q=257)
    want = segment_attention(*(x.float()[0].transpose(0, 1) for x in (q, k, v)), cu, 257, scale=dim ** -0.5)
    torch.testing.assert_close(out[0].float(), want, rtol=2e-2, atol=2e-2)
    grad = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad[0].float())
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu
def test_packed_step_matches_padded_on_cuda(batch):
    """On CUDA an fp32 model's packed batches take the grid path, a bf16 model's flash's variable-length kernel:
    both give the padded step's gradient within their precision."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        grads = {}
        for packing in (False, True):
            model, _ = bf.load_model("tiny", dtype=dtype, seed=SEED, device="cuda")
            torch.manual_seed(SEED)
            booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                                 bf.BoosterConfig(packing=packing, graphs="off", merge_passes=True))
            a, h = (to_device(pack(b) if packing else b, "cuda", drop_mask=not packing) for b in batch)
            grads[packing] = step_gradient(booster, a, h)[0]
        err = relative(grads[True], grads[False])
        assert err <= tol, f"{dtype}: packed differs from padded by {err:.3g} on CUDA"


def test_packed_step_with_empty_one_token_and_full_rows():
    """Rows with no real token, a single one, or no pad at all (empty segments, a lone token, no filler in-row):
    the packed step still gives the reference's gradient on the padded batches."""
    a = ragged_batch([40, 0, 17, 64, 1], 64, vocab=2000, seed=1)
    h = ragged_batch([0, 33, 64, 2, 50], 64, vocab=2000, seed=2)
    ref = first_update("reference", (a, h))
    assert ref.norm() > 0
    for merge in (True, False):
        g = first_update("fast", (pack(a), pack(h)), packing=True, merge_passes=merge)
        assert relative(g[:ref.numel()], ref) <= 1e-5, f"merge={merge}: {relative(g[:ref.numel()], ref):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 32, 128), (32, 4, 64)])  # 7B-shape, 1B-shape
def test_flash_probe_passes_on_cuda(heads, kv_heads, head_dim):
    from booster_fast import attention

    assert attention.probe_flash("cuda", torch.bfloat16, heads, kv_heads, head_dim) is None, attention._flash_failed


@pytest.mark.gpu
def test_a_batch_already_on_the_gpu_runs_padded(caplog):
    from booster_fast import batches as batches_module

    batches_module._warned_device_batch = False
    booster = bf.Booster(make_model(device="cuda")[0], bf.BoosterConfig(packing=True, graphs="off"))
    on_gpu = {k: v.cuda() for k, v in ragged_batch([40, 7, 64], 64).items()}
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        sent = booster.to_device(on_gpu, "cuda")
    assert "cu_seqlens" not in sent and "attention_mask" not in sent
    assert "arrived already on cuda" in caplog.text


def test_lm_head_runs_on_the_kept_positions_only():
    from booster_fast.losses import logits_of, token_losses

    model = make_model()[0]
    p = pack(ragged_batch([40, 7, 64, 30], 64, vocab=2000, seed=4))
    logits = logits_of(model, p)
    assert logits.shape[:2] == (1, p["keep"].numel()) < (1, p["input_ids"].shape[1])
    assert not model.get_output_embeddings()._forward_pre_hooks, "the LM head kept its gather hook"
    assert token_losses(logits, p).shape == p["targets"].shape


def test_the_flash_path_inside_a_model_step(monkeypatch, few_rows):
    """The flash branch wired into a whole step, on the CPU: a bf16 model (two layers) whose packed attention goes
    through a stand-in for torch's varlen_attn (the later API shape; it computes with the exact grid path). The step
    must call it in every layer of every pass and give the grid path's gradient; both are the padded bf16 step's
    within bf16 rounding."""
    from booster_fast import attention
    import torch.nn.attention.varlen as varlen

    def gradient(packing: bool, calls: list):
        model, _ = bf.load_model("tiny", dtype=torch.bfloat16, seed=SEED, device="cpu", num_key_value_heads=2,
                                 num_hidden_layers=2)
        torch.manual_seed(SEED)
        booster = bf.Booster(randomize_lora_b_(bf.add_lora(model, r=8, alpha=16), SEED + 1),
                             bf.BoosterConfig(packing=packing, merge_passes=True))
        a, h = (pack(b) if packing else booster.to_device(b, "cpu") for b in few_rows)
        del calls[:]  # building the engine probes the attention: count the step's calls only
        return step_gradient(booster, a, h)[0], model.config.num_hidden_layers

    padded, _ = gradient(False, [])
    grid, _ = gradient(True, [])
    _, new, _, _, calls = _fake_flash_apis()
    monkeypatch.setattr(varlen, "varlen_attn", new)
    monkeypatch.setattr(attention, "_flash_failed", None)
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    attention._flash_varlen.cache_clear()
    try:
        flash, layers = gradient(True, calls)
    finally:
        attention._flash_varlen.cache_clear()
    assert len(calls) == 2 * layers, f"{len(calls)} flash calls for 2 passes of {layers} layers"
    assert all(c["enable_gqa"] and c["window_size"] == (-1, 0) for c in calls)
    err = relative(flash, grid)
    assert err <= 1e-6, f"the flash branch in a bf16 step differs from the grid path by {err:.3g}"
    # packed against padded in bf16: the GEMMs see other shapes and round differently (measured 9e-3 with
    # torch 2.13 on the CPU); one bf16 rounding is 4e-3
    err = relative(flash, padded)
    assert err <= 2e-2, f"the packed bf16 step differs from the padded one by {err:.3g}"


def test_concat_packed_bounds_the_segments_of_either_batch():
    """[P1] packing.py concat_packed: max_seqlen must cover the second batch's segments too (the existing test
    puts the longer rows first, so `out["max_seqlen"] = a["max_seqlen"]` passes it). A bound shorter than a
    segment makes segment_attention's grid slots spill into the next segment."""
    short, long = pack(ragged_batch([3, 7, 2], 7, seed=2)), pack(ragged_batch([5, 9], 9, seed=1))
    both = concat_packed(short, long)
    assert both["max_seqlen"] == 9
    g = torch.Generator().manual_seed(0)
    tokens = both["input_ids"].shape[1]
    q, k, v = (torch.randn(tokens, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = segment_attention(q, k, v, both["cu_seqlens"], both["max_seqlen"])
    torch.testing.assert_close(out, per_segment_reference(q, k, v, both["cu_seqlens"], None))


def test_packed_attention_leaves_flash_alone_when_the_layer_has_dropout(monkeypatch):
    """[A5] attention.py _flash: flash's varlen kernel takes no dropout, so a layer with attention dropout must
    take the grid path even where flash could run (CUDA, bf16): dropout applied, seed-dependent."""
    import torch.nn.attention.varlen as varlen

    _, new, _, _, calls = _fake_flash_apis()
    monkeypatch.setattr(varlen, "varlen_attn", new)
    monkeypatch.setattr(attention, "_flash_failed", None)
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    attention._flash_varlen.cache_clear()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 8, 16, generator=g).bfloat16() for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)

    def attend(dropout, seed=0):
        torch.manual_seed(seed)
        return varlen_attention_forward(None, q, k, v, dropout=dropout, cu_seq_lens_q=cu, max_length_q=5)[0]

    try:
        attend(0.0)
        assert len(calls) == 1, "the stand-in flash kernel was not used without dropout: the test proves nothing"
        first, second = attend(0.5, seed=0), attend(0.5, seed=1)
    finally:
        attention._flash_varlen.cache_clear()
    assert len(calls) == 1, "a layer with attention dropout reached flash's kernel, which drops no attention"
    assert not torch.equal(first, second), "attention dropout was not applied"


def test_to_device_packs_a_batch_whose_rows_fill_the_window_exactly():
    """[B1] batches.py to_device: segments as long as the sliding window are exact (the window reaches back
    window - 1 tokens), so such a batch packs (`<= window`, not `< window`)."""
    batch = ragged_batch([40, 7, 64], 64)
    assert "cu_seqlens" in to_device(batch, "cpu", pack=True, window=64)
    assert "cu_seqlens" not in to_device(batch, "cpu", pack=True, window=63)


def test_a_device_batch_meant_for_packing_is_checked_and_loses_its_mask(caplog):
    """[B6] batches.py to_device: a batch already on a device cannot be packed; it must go padded *without its
    mask* after the host-side check (the GPU-only test_a_batch_already_on_the_gpu_runs_padded says so, but is
    skipped on the CPU). Stood in for by input_ids on the meta device."""
    batch = ragged_batch([5, 8, 3], 8)
    on_device = dict(batch, input_ids=batch["input_ids"].to("meta"))
    sent = to_device(on_device, "meta", pack=True)
    assert "cu_seqlens" not in sent and "attention_mask" not in sent
    left = {k: v.flip(1) for k, v in batch.items()}
    left["input_ids"] = left["input_ids"].to("meta")
    with pytest.raises(ValueError, match="right-padded"):
        to_device(left, "meta", pack=True)
