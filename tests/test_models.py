"""Models: the embedded tiny Llama, its tokenizer, LoRA wrapping, NF4 on the CPU, and offline failures."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from booster_fast import Booster, BoosterConfig, ModelError, add_lora, load_model

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0, device="cpu")


def random_batch(vocab: int, rows: int = 2, length: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    ids[1, -5:], labels[1, -5:], mask[1, -5:] = 0, -100, 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------ tiny preset
def test_tiny_is_a_small_llama(tiny):
    from transformers import LlamaForCausalLM

    model, tok = tiny
    assert type(model) is LlamaForCausalLM
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n <= 5_000_000, n
    assert model.config.vocab_size >= len(tok)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, model.config.vocab_size) and torch.isfinite(out).all()


def test_tiny_is_deterministic_per_seed(tiny):
    a = tiny[0].state_dict()
    b = load_model("tiny", seed=0, device="cpu")[0].state_dict()
    c = load_model("tiny", seed=1, device="cpu")[0].state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed gives different random weights (norm weights are 1 in both, so ask for most tensors)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    weights = [k for k in a if a[k].dim() == 2]
    assert set(weights) <= set(differ)


def test_tiny_load_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", seed=5, device="cpu", num_hidden_layers=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("text", [
    "Below is an instruction that describes a task.\n\n### Response:\n",
    "  leading spaces, tabs\tand trailing newline\n",
    "Unicode: naïve café — 東京 🙂 Ω≈ç√",
    "",
])
def test_tokenizer_round_trips(tiny, text):
    tok = tiny[1]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_config_override_num_hidden_layers():
    model, _ = load_model("tiny", device="cpu", num_hidden_layers=2)
    assert model.config.num_hidden_layers == 2
    assert len(model.model.layers) == 2
    assert model.config.hidden_size == 192   # the other preset fields stay


# ------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_only_lora_trainable_fp32(dtype):
    base, _ = load_model("tiny", seed=0, device="cpu", dtype=dtype, num_hidden_layers=2)
    model = add_lora(base, r=4, alpha=8, targets=("q_proj", "v_proj"))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x 2 targets x (A, B)
    assert len(trainable) == 8
    for n, p in trainable:
        assert "lora_A" in n or "lora_B" in n, n
        assert p.dtype == torch.float32, (n, p.dtype)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.dtype == dtype for p in frozen)     # the base keeps its dtype
    shapes = {n.split(".lora_")[1].split(".")[0]: tuple(p.shape) for n, p in trainable if "q_proj" in n}
    assert shapes == {"A": (4, 192), "B": (192, 4)}


def test_add_lora_defaults_are_the_papers():
    """The original's Booster scripts: LoRA r 32, alpha 4 (scale 1/8) on q, k and v, no dropout."""
    model = add_lora(load_model("tiny", device="cpu", num_hidden_layers=1)[0])
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (32, 4, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4 / 32


@pytest.mark.parametrize("targets", [("nonexistent_proj",), ("q_proj", "nonexistent_proj"), ("proj",), "_proj"])
def test_add_lora_unknown_target_raises_model_error(targets):
    base, _ = load_model("tiny", device="cpu", num_hidden_layers=1)
    with pytest.raises(ModelError) as e:
        add_lora(base, targets=targets)
    msg = str(e.value)
    missing = [t for t in ([targets] if isinstance(targets, str) else targets) if t != "q_proj"]
    assert "\n" not in msg and f"LoRA targets {missing} not found" in msg  # peft matches whole names only
    # the failed call left the model as it was
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=2.5), "r (the LoRA rank) must be an integer >= 1, got 2.5"),
    (dict(r="8"), "r (the LoRA rank) must be an integer >= 1, got '8'"),
    (dict(r=None), "r (the LoRA rank) must be an integer >= 1, got None"),
    (dict(r=True), "r (the LoRA rank) must be an integer >= 1, got True"),
    (dict(r=0), "r (the LoRA rank) must be an integer >= 1, got 0"),
    (dict(alpha=0), "alpha must be a finite number > 0 (the scale is alpha / r), got 0"),
    (dict(alpha=-4.0), "alpha must be a finite number > 0 (the scale is alpha / r), got -4.0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0 (the scale is alpha / r), got nan"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0 (the scale is alpha / r), got inf"),
    (dict(alpha="4"), "alpha must be a finite number > 0 (the scale is alpha / r), got '4'"),
    (dict(alpha=True), "alpha must be a finite number > 0 (the scale is alpha / r), got True"),
    (dict(dropout=1.0), "dropout must be a number with 0 <= dropout < 1, got 1.0"),
    (dict(dropout=-0.1), "dropout must be a number with 0 <= dropout < 1, got -0.1"),
    (dict(dropout=float("nan")), "dropout must be a number with 0 <= dropout < 1, got nan"),
    (dict(dropout=True), "dropout must be a number with 0 <= dropout < 1, got True"),
    (dict(dropout="0.1"), "dropout must be a number with 0 <= dropout < 1, got '0.1'"),
])
def test_add_lora_refuses_bad_numbers_at_the_call(kwargs, match):
    """A rank, alpha or dropout that would fail inside torch or peft, or silently train nothing (alpha 0, dropout
    1) or something else (True as rank 1), is one ModelError naming the argument and its value."""
    base, _ = load_model("tiny", device="cpu", num_hidden_layers=1)
    with pytest.raises(ModelError) as e:
        add_lora(base, **kwargs)
    assert str(e.value) == f"add_lora: {match}"
    assert all(p.requires_grad for p in base.parameters())  # the model as it was


def test_add_lora_takes_numpy_numbers():
    base, _ = load_model("tiny", device="cpu", num_hidden_layers=1)
    cfg = add_lora(base, r=np.int64(4), alpha=np.float64(8.0), dropout=np.float32(0.25)).peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8.0, 0.25)
    assert type(cfg.r) is int and type(cfg.lora_alpha) is float and type(cfg.lora_dropout) is float


def test_unknown_model_fails_fast_offline():
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_model("no/such-model-xyz", device="cpu")
    assert time.perf_counter() - t < 20
    msg = str(e.value)
    assert "\n" not in msg.strip()
    assert "no/such-model-xyz" in msg
    assert "`hf download no/such-model-xyz`" in msg  # the hub's current command (huggingface-cli is gone)


@pytest.mark.parametrize("name", ["no-such-dir/", "./no-such-dir", "a/b/c"])
def test_a_missing_local_directory_is_named_as_one(name):
    """A name that can only be a path (a trailing slash, a leading dot, two slashes) gets "no such directory",
    not the hub's advice to download a repository of that name."""
    with pytest.raises(ModelError, match=f"--model {name}: no such directory"):
        load_model(name, device="cpu")


def test_unknown_quant_raises_model_error():
    with pytest.raises(ModelError):
        load_model("tiny", quant="int3")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=2), "load_model('tiny'): num_layers=2 is not a LlamaConfig field (did you mean "
                         "num_hidden_layers?); the preset's fields are hidden_size, intermediate_size, "),
    (dict(hidden_sise=64), "load_model('tiny'): hidden_sise=64 is not a LlamaConfig field (did you mean hidden_size?)"),
    (dict(num_hidden_layers=0), "load_model('tiny'): num_hidden_layers must be an integer >= 1, got 0"),
    (dict(num_hidden_layers=1.5), "load_model('tiny'): num_hidden_layers must be an integer >= 1, got 1.5"),
    (dict(num_hidden_layers=True), "load_model('tiny'): num_hidden_layers must be an integer >= 1, got True"),
    (dict(num_key_value_heads=0), "load_model('tiny'): num_key_value_heads must be an integer >= 1, got 0"),
    (dict(num_key_value_heads=3), "load_model('tiny'): num_attention_heads=4 is not a multiple of "
                                  "num_key_value_heads=3"),
    (dict(hidden_size=96, num_attention_heads=6), "load_model('tiny'): num_attention_heads=6 is not a multiple of "
                                                  "num_key_value_heads=4"),
    (dict(seed=1.7), "load_model: seed must be an integer, got 1.7"),
    (dict(seed="0"), "load_model: seed must be an integer, got '0'"),
    (dict(seed=True), "load_model: seed must be an integer, got True"),
    (dict(dtype=torch.int64), "load_model: dtype must be a floating torch dtype or one of bf16, fp32, got torch.int64"),
    (dict(dtype=torch.bool), "load_model: dtype must be a floating torch dtype or one of bf16, fp32, got torch.bool"),
])
def test_load_model_refuses_bad_arguments_at_the_call(kwargs, match):
    """A config override no LlamaConfig field takes (a typo would go unused), too few layers, heads that kv heads
    do not divide, a fractional seed or an integer dtype: one ModelError naming the argument and its value."""
    with pytest.raises(ModelError) as e:
        load_model("tiny", device="cpu", **kwargs)
    assert str(e.value).startswith(match) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs", [dict(seed=1.7), dict(dtype=torch.int64)])
def test_a_pretrained_models_seed_and_dtype_are_checked_before_the_load(kwargs):
    with pytest.raises(ModelError, match="^load_model: (seed|dtype) must be"):
        load_model("no/such-model-xyz", device="cpu", **kwargs)


def test_a_pretrained_model_refuses_config_overrides_before_the_load():
    """from_pretrained builds the checkpoint's own config: an override would go unused without a word."""
    with pytest.raises(ModelError, match=r"^load_model\('no/such-model-xyz'\): num_hidden_layers=2: config "
                                         r"overrides change a built-in preset \(tiny, "):
        load_model("no/such-model-xyz", device="cpu", num_hidden_layers=2)


def test_load_model_takes_numpy_integers_and_grouped_kv_heads():
    a = load_model("tiny", device="cpu", seed=np.int64(3), num_hidden_layers=np.int64(1), num_key_value_heads=2)[0]
    b = load_model("tiny", device="cpu", seed=3, num_hidden_layers=1, num_key_value_heads=2)[0]
    assert a.config.num_key_value_heads == 2 and len(a.model.layers) == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -------------------------------------------------------------------------------------------------- NF4
def test_nf4_base_booster_steps():
    import bitsandbytes as bnb

    model, tok = load_model("tiny", quant="nf4", device="cpu", num_hidden_layers=2)
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            mod = layer.get_submodule("self_attn." + name if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                      else "mlp." + name)
            assert isinstance(mod, bnb.nn.Linear4bit), (name, type(mod))
            assert mod.weight.dtype == torch.uint8                      # packed 4-bit
            assert mod.weight.numel() * 2 == mod.in_features * mod.out_features
            assert mod.weight.quant_state.quant_type == "nf4"
        assert not any(type(m) is nn.Linear for m in layer.modules())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32

    batch = random_batch(len(tok))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()

    model = add_lora(model, r=4, alpha=4)
    # peft may re-wrap the layers: collect the 4-bit weights from the wrapped model
    q4 = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
          for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(q4) == 2 * len(DECODER_LINEARS)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())

    booster = Booster(model, BoosterConfig(impl="reference", lr=1e-2))
    harmful = random_batch(len(tok), seed=1)
    for step in range(3):
        out = booster.step(batch, harmful)
        for k in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
            assert math.isfinite(float(out[k])), (step, k, out[k])
        assert float(out["harmful_grad_norm"]) > 0

    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            data, absmax = q4[n]
            assert m.weight.dtype == torch.uint8
            assert torch.equal(m.weight.data, data), n
            assert torch.equal(m.weight.quant_state.absmax, absmax), n
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n], v) for n, v in lora.items())


@pytest.mark.parametrize("name,published", [("llama-1b-shape", 1_100_048_384), ("llama-7b-shape", 6_738_415_616),
                                            ("llama-13b-shape", 13_015_864_320), ("llama-70b-shape", 68_976_648_192)])
def test_shape_presets_have_the_published_sizes(name, published):
    """Each shape preset has exactly the parameter count of the model it copies (TinyLlama-1.1B, Llama-2-7B/13B/
    70B; built on the meta device, nothing allocated), and preset_weight_bytes says its bf16 size exactly."""
    from booster_fast.model_size import preset_weight_bytes

    model, _ = load_model(name, device="meta")
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == published
    assert preset_weight_bytes(name) == sum(p.numel() * p.element_size() for p in params)
    assert preset_weight_bytes(name, dtype=torch.float32) == 2 * preset_weight_bytes(name)


def test_nf4_size_estimate_and_the_fit_check():
    """preset_weight_bytes(quant="nf4") matches what bitsandbytes really stores (packed weights, double-quantised
    statistics, bf16 rest) within 0.5 %; check_fits refuses, in one line naming the 4-bit way out, a preset
    whose weights exceed the free memory, and lets one through that fits."""
    from booster_fast.nf4 import quant_state_tensors
    from booster_fast.model_size import check_fits, preset_weight_bytes

    small = dict(num_hidden_layers=2, hidden_size=384, intermediate_size=1000, num_attention_heads=6,
                 num_key_value_heads=2)
    model, _ = load_model("llama-70b-shape", quant="nf4", device="cpu", **small)
    held = [t for p in model.parameters() for t in (p, *quant_state_tensors(p))]
    # every statistic, the doubly quantised ones (state2) included: too small for the size check to see them
    weight = next(m.weight for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state"))
    qs, found = weight.quant_state, quant_state_tensors(weight)
    assert qs.state2 is not None, "double quantisation is off"
    for t in (qs.absmax, qs.code, qs.state2.absmax, qs.state2.code):
        assert any(t is f for f in found)
    real = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
    assert abs(preset_weight_bytes("llama-70b-shape", "nf4", **small) / real - 1) < 0.005
    assert preset_weight_bytes("llama-70b-shape", "nf4") < 0.27 * preset_weight_bytes("llama-70b-shape")

    gib = 2**30
    with pytest.raises(ModelError) as e:
        check_fits("llama-70b-shape", "none", torch.bfloat16, 80 * gib, "cuda:0")
    assert str(e.value) == ("llama-70b-shape needs ~128 GiB for its bfloat16 weights alone and cuda:0 has 80 GiB "
                            "free; with --quant nf4 they take ~34 GiB")
    with pytest.raises(ModelError, match="NF4 weights alone"):
        check_fits("llama-70b-shape", "nf4", torch.bfloat16, 30 * gib)
    check_fits("llama-70b-shape", "nf4", torch.bfloat16, 40 * gib)
    check_fits("llama-7b-shape", "none", torch.bfloat16, 13 * gib, num_hidden_layers=30)


def test_free_cuda_memory_counts_the_allocators_cache(monkeypatch):
    """The fit check's free memory: the driver's free bytes plus what torch's allocator caches unused (the bench
    frees one entry's weights into that cache before it builds the next)."""
    from booster_fast import model_size

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 26 * gib)
    assert model_size.cuda_free_bytes("cuda:0") == 46 * gib


def test_a_preset_too_big_for_the_hosts_memory_is_refused_before_it_is_built(monkeypatch):
    """On the CPU the fit check weighs the weights against the host's available memory (MemAvailable): a 70B
    shape on a small machine is one line at once, not minutes of building ending in the OOM killer."""
    from booster_fast import model_size, models

    available = model_size.host_available_bytes()
    assert available is None or available > 2**20  # Linux says; elsewhere the check is skipped
    gib = 2**30

    def built(*a, **k):
        raise AssertionError("built after the fit check")

    monkeypatch.setattr(models, "_build_preset", built)
    monkeypatch.setattr(model_size, "host_available_bytes", lambda: 5 * gib)
    with pytest.raises(ModelError, match=r"^llama-7b-shape needs ~13 GiB for its bfloat16 weights alone and cpu "
                                         r"has 5.0 GiB free; with --quant nf4 they take ~3.\d GiB$"):
        load_model("llama-7b-shape", device="cpu")
    monkeypatch.setattr(model_size, "host_available_bytes", lambda: 3 * gib)
    with pytest.raises(ModelError, match="NF4 weights alone"):
        load_model("llama-7b-shape", quant="nf4", device="cpu")  # ~3.6 GiB in NF4
    monkeypatch.setattr(model_size, "host_available_bytes", lambda: 20 * gib)  # fits: built
    with pytest.raises(AssertionError, match="built after"):
        load_model("llama-7b-shape", device="cpu")
    monkeypatch.setattr(model_size, "host_available_bytes", lambda: None)  # unknown: no check, the build goes ahead
    with pytest.raises(AssertionError, match="built after"):
        load_model("llama-7b-shape", device="cpu")


def test_shape_preset_nf4_is_built_layer_by_layer():
    """The shape presets with quant="nf4" are quantised layer by layer while they are built (a 7B model never
    exists in bf16): every decoder linear is NF4, the layers' weights follow the model's own init (std
    initializer_range before quantisation), the build is deterministic per seed, and the model trains."""
    import bitsandbytes as bnb

    small = dict(num_hidden_layers=3, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2)
    model, tok = load_model("llama-1b-shape", quant="nf4", device="cpu", seed=3, **small)
    again, _ = load_model("llama-1b-shape", quant="nf4", device="cpu", seed=3, **small)
    other, _ = load_model("llama-1b-shape", quant="nf4", device="cpu", seed=4, **small)
    assert len(model.model.layers) == model.config.num_hidden_layers == 3
    quantized = [m for m in model.model.layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 3 * len(DECODER_LINEARS)
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert model.lm_head.weight.dtype == torch.bfloat16 and getattr(model, "is_loaded_in_4bit", False)
    state, state2, state3 = (m.state_dict() for m in (model, again, other))
    assert all(torch.equal(v, state2[k]) for k, v in state.items())
    assert not all(torch.equal(v, state3[k]) for k, v in state.items())
    assert quantized[0].weight.quant_state.code.dtype == torch.float32  # the NF4 table, as bitsandbytes builds it
    w = bnb.functional.dequantize_4bit(quantized[0].weight.data, quantized[0].weight.quant_state).float()
    assert abs(w.std().item() - model.config.initializer_range) < 0.2 * model.config.initializer_range

    model = add_lora(model, r=4)
    booster = Booster(model, BoosterConfig(impl="fast"))
    batch = {k: v for k, v in random_batch(model.config.vocab_size).items() if k != "attention_mask"}
    out = booster.step(batch, batch)
    assert abs(float(out["loss"]) - math.log(model.config.vocab_size)) < 1.0  # random weights: ~ln(vocab)



def test_the_fast_engine_needs_bitsandbytes_only_for_4_bit(monkeypatch):
    """A machine without bitsandbytes still runs the fp32/bf16 paths (importing it is what failed there once)."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    model, _ = load_model("tiny", device="cpu")
    booster = Booster(add_lora(model, r=4, alpha=8), BoosterConfig(impl="fast"))
    assert booster.engine.flat.W.dtype == torch.float32


def test_checkpointing_a_model_that_overrides_the_old_method():
    """Remote-code models may override `gradient_checkpointing_enable` with transformers 4's signature: they get
    that method called (transformers' new `activation_checkpointing_enable` would call it with arguments it does
    not take)."""
    from booster_fast.compute import enable_gradient_checkpointing

    model, _ = load_model("tiny", device="cpu")
    calls = []

    class OldStyle(type(model)):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    model.__class__ = OldStyle
    enable_gradient_checkpointing(model)
    assert calls == [{"use_reentrant": False, "preserve_rng_state": False}]
    assert model.is_gradient_checkpointing


def test_the_readme_use_snippet_runs():
    """README's "Use" example is run as written (on the CPU), so that it stays true."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python", text.index("## Use")) + len("```python")
    code = text[start:text.index("```", start)].replace('"cuda"', '"cpu"')
    scope: dict = {}
    exec(compile(code, "README.md (Use)", "exec"), scope)
    out = scope["out"]
    assert set(out) >= {"loss", "skipped"} and torch.isfinite(out["loss"])


def test_a_pretrained_nf4_model_trains_on_the_cpu(tmp_path):
    """A 4-bit model from from_pretrained (eval mode) on the CPU: bitsandbytes would repack its weights for the
    inference kernel at an eval-mode forward, after which every gradient through them is silently zero. Both
    engines keep the trainable layout (undoing a repack already done: the packed weights come back exactly,
    the statistics within their 8-bit rounding), and their first updates agree."""
    import bitsandbytes as bnb

    from booster_fast.nf4 import keep_nf4_trainable_
    from test_fast import builtin_batches

    model, tok = load_model("tiny", device="cpu")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def pretrained():
        m, _ = load_model(str(tmp_path), quant="nf4", device="cpu")
        assert not m.training
        return m

    m = pretrained()
    layer = next(x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit))
    def weight():
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()

    repack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if repack is None:  # a bitsandbytes before 0.49 has no CPU repack: nothing to undo
        assert keep_nf4_trainable_(m) == 0
    else:
        packed, w = layer.weight.data.clone(), weight()
        layer.weight.data, layer.weight.quant_state = repack(layer.weight.data, layer.weight.quant_state)
        assert keep_nf4_trainable_(m) == 1 and not layer.support_avx512bf16_for_cpu
        assert not layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, packed)
        assert ((weight() - w).norm() / w.norm()) < 1e-2  # the 8-bit statistics are requantized on the way back

    (a, h), = builtin_batches(tok, 1)
    outs = []
    for impl in ("reference", "fast"):
        m = pretrained()
        with torch.no_grad():
            m(input_ids=a["input_ids"])  # an eval-mode forward first, as a held-out loss or a probe runs one
        torch.manual_seed(0)
        booster = Booster(add_lora(m, r=8, alpha=16), BoosterConfig(impl=impl))
        outs.append(booster.step(a, h))
    for out in outs:
        assert out["harmful_grad_norm"] > 0.1 and out["harmful_loss_perturbed"] != out["harmful_loss"]
    assert abs(outs[0]["harmful_grad_norm"] / outs[1]["harmful_grad_norm"] - 1) < 2e-2


def test_a_model_in_the_hub_cache_loads_by_its_id_without_a_request(tmp_path):
    """A model id whose files are in the Hugging Face cache loads offline at once: transformers' probe for a peft
    adapter config ignores local_files_only and, with the hub out of reach, retried ~25 s (a stderr line per try)
    before the load went on. The hub here is an address that never resolves."""
    model, tok = load_model("tiny", device="cpu")
    repo = tmp_path / "hub" / "models--someone--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(repo / "snapshots" / revision)
    tok.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "https://hub.invalid"}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import booster_fast as bf; m, t = bf.load_model('someone/tiny', device='cpu'); "
            "print(type(m).__name__, m.config.num_hidden_layers)")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["LlamaForCausalLM", str(model.config.num_hidden_layers)]
    assert "hub.invalid" not in run.stderr and "Retry" not in run.stderr, run.stderr[-2000:]
    assert elapsed < 20, f"{elapsed:.0f} s: the load waited on the hub"


def test_hub_loads_try_the_cache_first_and_never_retry_an_unreachable_hub(monkeypatch, tmp_path):
    """from_hub: the local cache first (no request at all when it has the files); the hub only when it can be
    reached, else an OSError at once (offline, huggingface_hub retried each file with back-off, ~25 s and a stderr
    line per try, before the one-line error)."""
    import booster_fast.models as models

    from huggingface_hub import constants
    from transformers.utils import hub

    monkeypatch.setattr(hub, "_is_offline_mode", False, raising=False)  # transformers 4's own copy of the flag
    calls, offline = [], []

    def loader(name, local_files_only=False, **kw):
        calls.append(local_files_only)
        offline.append(constants.HF_HUB_OFFLINE and hub._is_offline_mode)
        if local_files_only and name != "cached/model":
            raise OSError(f"{name} is not cached")
        return ("loaded", name, kw)

    assert models.from_hub(loader, "cached/model", dtype="x") == ("loaded", "cached/model", {"dtype": "x"})
    assert calls == [True]                                   # from the cache: no online attempt
    calls.clear()
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert models.from_hub(loader, "online/model")[1] == "online/model" and calls == [True, False]
    assert offline[-2:] == [True, False]  # the cache attempt requests nothing at all
    assert hub._is_offline_mode is False
    calls.clear()
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(OSError, match="hub cannot be reached"):
        models.from_hub(loader, "online/model")
    assert calls == [True]                                   # never tried online
    with pytest.raises(OSError, match="is not cached"):      # a local directory: its own error, no hub
        models.from_hub(loader, str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="cannot be reached"):
        load_model("someone/not-a-model-xyz", device="cpu")
    assert time.perf_counter() - t0 < 20


def test_nf4_models_compute_in_bf16_with_double_quantisation(tmp_path):
    """[N1, N6, M4, M6] nf4.py quantize_linears_/quantize_nf4_ and compute.py compute_dtype, models.py _load_pretrained: every
    NF4 layer (tiny, a shape preset built layer by layer, a pretrained checkpoint) computes in bf16 with doubly
    quantised statistics, the model says it is 4-bit, and the step's autocast is on."""
    import bitsandbytes as bnb

    from booster_fast.compute import Autocast, compute_dtype

    model, tok = load_model("tiny", quant="nf4", device="cpu", num_hidden_layers=2)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert compute_dtype(model) == torch.bfloat16 and Autocast(model, "cpu").enabled
    preset, _ = load_model("llama-1b-shape", quant="nf4", device="cpu", num_hidden_layers=1, hidden_size=128,
                              intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    base, _ = load_model("tiny", device="cpu", num_hidden_layers=1)
    base.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pretrained, _ = load_model(str(tmp_path), quant="nf4", device="cpu")
    for m in (model, preset, pretrained):
        layers = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
        assert layers and all(x.compute_dtype == torch.bfloat16 for x in layers)
        assert all(x.weight.quant_state.nested for x in layers)


def test_a_boolean_config_flag_named_like_dropout_is_no_dropout():
    """[M7] compute.py has_dropout: only numbers count as probabilities (bool is an int subclass)."""
    from booster_fast.compute import has_dropout

    model, _ = load_model("tiny", device="cpu", num_hidden_layers=1)
    assert not has_dropout(model)
    model.config.use_dropout = True
    assert not has_dropout(model)
    model.config.hidden_dropout = 0.1
    assert has_dropout(model)


@pytest.mark.parametrize("avx512_bf16, amx, slow", [(False, False, True), (True, False, False), (False, True, False),
                                                    (None, None, True)])
def test_a_cpu_without_bf16_instructions_is_told_apart(monkeypatch, avx512_bf16, amx, slow):
    """compute.py slow_bf16_on: a CPU is slow at bf16 unless torch finds AVX512-BF16 or AMX on it (an older torch
    without the checks counts as slow); a CUDA device never is."""
    from booster_fast.compute import slow_bf16_on

    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert slow_bf16_on(torch.device("cpu")) is slow and slow_bf16_on("cpu") is slow
    assert slow_bf16_on(torch.device("cuda")) is False
