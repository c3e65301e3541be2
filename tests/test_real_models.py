"""Pretrained models from local directories, as users bring them: paths, dtypes, pad ids, position tables, LoRA
target spellings and what an adapter saves."""
import json

import pytest
import torch

import booster_fast as bf
from booster_fast.cli import main
from booster_fast.models import ModelError, check_positions, learned_positions, load_model

SMALL = ["--steps", "1", "--max-length", "64", "--batch-size", "2", "--align-samples", "4", "--save-every", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved as a Hugging Face checkpoint (fp32), with its tokenizer."""
    d = tmp_path_factory.mktemp("hf") / "model"
    model, tok = load_model("tiny", device="cpu")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_relative_model_directory_is_recorded_absolute(model_dir, tmp_path, monkeypatch):
    """run_config.json and the adapter name the base by its absolute path, so the run loads from anywhere."""
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "run"
    assert main(["align", "--model", "model", "--output", str(out), *SMALL]) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert cfg["model"] == adapter["base_model_name_or_path"] == str(model_dir)
    monkeypatch.chdir(tmp_path)  # elsewhere: the adapter still finds its base
    from booster_fast.adapters import load_adapter

    model, _, _ = load_adapter(out, "cpu", trainable=False)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def spy_on_loads(monkeypatch, auto_class) -> list[dict]:
    """The keyword arguments of every `auto_class.from_pretrained` call from now on (each call goes through)."""
    seen, real = [], auto_class.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(auto_class, "from_pretrained", classmethod(spy))
    return seen


def test_pretrained_models_load_without_hub_kernels(model_dir, monkeypatch):
    """transformers 5.25 swaps layers for kernels it fetches from the hub at load time unless use_kernels=False
    (earlier releases default to False): both engines run transformers' own modules, and nothing is fetched."""
    from transformers import AutoModelForCausalLM

    seen = spy_on_loads(monkeypatch, AutoModelForCausalLM)
    model, _ = load_model(str(model_dir), device="cpu")
    assert [kwargs.get("use_kernels") for kwargs in seen] == [False], seen
    assert not getattr(model, "use_kernels", False)


def test_a_checkpoint_loads_in_bf16_unless_fp32_is_asked(model_dir, tmp_path):
    """The original trains in bf16: an fp32 checkpoint is converted to it by default; --dtype fp32 keeps it (and
    is recorded, for --resume and the attack)."""
    assert next(load_model(str(model_dir), device="cpu")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(str(model_dir), dtype="fp32", device="cpu")[0].parameters()).dtype == torch.float32
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(model_dir), dtype="fp8", device="cpu")
    out = tmp_path / "run"
    assert main(["align", "--model", str(model_dir), "--dtype", "fp32", "--output", str(out), *SMALL]) == 0
    assert json.loads((out / "run_config.json").read_text())["dtype"] == "fp32"


def test_a_pad_id_outside_the_embeddings_pads_with_eos(model_dir, tmp_path):
    """A [PAD] added to the tokenizer but not to the model (Llama-2 users do this): its id has no embedding, so
    padded batches would fail in the lookup. The model pads with EOS instead, and a padded step runs."""
    d = tmp_path / "extpad"
    model, tok = load_model(str(model_dir), dtype="fp32", device="cpu")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id >= model.get_input_embeddings().num_embeddings
    model.save_pretrained(d)
    tok.save_pretrained(d)
    model, tok = load_model(str(d), dtype="fp32", device="cpu")
    assert tok.pad_token_id == tok.eos_token_id < model.get_input_embeddings().num_embeddings
    out = tmp_path / "run"
    assert main(["align", "--model", str(d), "--impl", "reference", "--output", str(out), *SMALL]) == 0


def test_rows_longer_than_a_learned_position_table_are_refused(tmp_path, capsys):
    """GPT-2-style learned positions: --max-length beyond the table is refused in one line before anything is
    written (it used to fail with an IndexError at the first step)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = load_model("tiny", device="cpu")
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=32, n_layer=1, n_head=2)).save_pretrained(d)
    tok.save_pretrained(d)
    model, _ = load_model(str(d), device="cpu")
    check_positions(model, 40)
    with pytest.raises(ModelError, match="exceeds the model's 40 learned positions"):
        check_positions(model, 41)
    out = tmp_path / "run"
    assert main(["align", "--model", str(d), "--targets", "c_attn", "--output", str(out), *SMALL]) == 2
    assert "exceeds the model's 40 learned positions" in capsys.readouterr().err and not out.exists()


def test_eval_refuses_answers_that_would_run_past_a_learned_position_table(tmp_path, capsys):
    """GPT-2-style learned positions: a prompt and its new-token budget beyond the table are refused in one line
    before any answer is generated (greedy decoding failed at the first position past it, after the answers
    before); a budget that fits runs. The attack's refusal probe is checked the same way, before its first step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from booster_fast.evaluate import harmful_prompts, prompt_ids

    _, tok = load_model("tiny", device="cpu")
    d = tmp_path / "gpt2"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():  # EOS's logit 0 (tied head) below the top one: answers run to their budget
        gpt2.transformer.wte.weight[tok.eos_token_id] = 0
    gpt2.save_pretrained(d)
    tok.save_pretrained(d)
    run = tmp_path / "run"
    assert main(["align", "--model", str(d), "--targets", "c_attn", "--output", str(run), *SMALL]) == 0
    longest = max(map(len, prompt_ids(tok, harmful_prompts("builtin", None, 3)[0])))
    assert 0 < longest < 96
    out = tmp_path / "eval.json"
    common = ["eval", "--adapter", str(run), "--output", str(out), "--prompts", "builtin", "--num-prompts", "3",
              "--task", "builtin", "--num-task", "2", "--judge", "refusal", "--device", "cpu"]
    capsys.readouterr()
    room = 96 - longest + 1  # the last new token is never fed back
    code = main([*common, "--max-new-tokens", str(room + 1), "--task-max-new-tokens", "1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert code == 2 and f"use --max-new-tokens {room} or less" in line and not out.exists(), line
    assert main([*common, "--max-new-tokens", str(room), "--task-max-new-tokens", "1", "--save-generations"]) == 0
    answers = [g["answer"] for g in json.loads(out.read_text())["generations"]["harmful"]]
    assert len(answers) == 3 and max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) > 30
    # the attack's refusal probe generates too: its budget is checked before the first step
    from booster_fast.data import load_safety_data

    test_rows = load_safety_data("builtin", "test")[1][:2]
    probe = max(map(len, prompt_ids(tok, [(e.instruction, e.input) for e in test_rows])))
    attacked = tmp_path / "attacked"
    code = main(["attack", "--adapter", str(run), "--output", str(attacked), "--steps", "2", "--refusal-prompts", "2",
                 "--refusal-max-new-tokens", str(96 - probe + 2), "--max-length", "64", "--batch-size", "2"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"use --refusal-max-new-tokens {96 - probe + 1} or less" in line, line
    assert not attacked.exists()


def test_eval_checks_the_task_budget_and_names_a_prompt_longer_than_the_table(tmp_path, capsys, monkeypatch):
    """The task's budget is checked as the harmful one is (before any answer); a prompt longer than the table
    is named as such; prompt_ids put the tokenizer's BOS first, as generation feeds it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import booster_fast.data as data
    from booster_fast.cli import UsageError
    from booster_fast.data import format_prompt
    from booster_fast.evaluate import check_answer_room, prompt_ids

    _, tok = load_model("tiny", device="cpu")

    def gpt2(n):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n, n_embd=32, n_layer=1, n_head=2))

    d = tmp_path / "gpt2"
    gpt2(96).save_pretrained(d)
    tok.save_pretrained(d)
    run = tmp_path / "run"
    assert main(["align", "--model", str(d), "--targets", "c_attn", "--output", str(run), *SMALL]) == 0
    capsys.readouterr()
    code = main(["eval", "--adapter", str(run), "--output", str(tmp_path / "e.json"), "--prompts", "builtin",
                 "--num-prompts", "2", "--task", "builtin", "--num-task", "2", "--judge", "refusal", "--device",
                 "cpu", "--max-new-tokens", "1", "--task-max-new-tokens", "96"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--task-max-new-tokens 96 with the longest of the builtin test prompts" in line, line
    examples = [("Say hi to everyone in the room, please.", "")]
    longest = len(prompt_ids(tok, examples)[0])
    check_answer_room(gpt2(longest), tok, [("--max-new-tokens", examples, 1, "harmful")])
    with pytest.raises(UsageError, match=f"takes {longest} tokens, more than the model's {longest - 1} learned"):
        check_answer_room(gpt2(longest - 1), tok, [("--max-new-tokens", examples, 1, "harmful")])
    monkeypatch.setattr(data, "default_prefix", lambda t: [t.bos_token_id])
    assert prompt_ids(tok, examples) == [[tok.bos_token_id] + tok(format_prompt(*examples[0]),
                                                                  add_special_tokens=False)["input_ids"]]


def test_only_the_text_position_table_counts_and_its_offset():
    """RoBERTa-style tables start after the pad row (514 rows hold 512 positions), OPT's after its offset of 2; a
    table that does not sit beside the token embeddings (an encoder's of another modality) is not the text's
    limit."""
    from transformers import OPTConfig, OPTForCausalLM, RobertaConfig, RobertaForCausalLM

    roberta = RobertaForCausalLM(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32, is_decoder=True,
                                               max_position_embeddings=42, pad_token_id=1))
    check_positions(roberta, 40)
    with pytest.raises(ModelError, match="40 learned positions"):
        check_positions(roberta, 41)
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=40, word_embed_proj_dim=16))
    assert learned_positions(opt) == 40  # OPT's table holds 42 rows, the first 2 before position 0
    with pytest.raises(ModelError, match="40 learned positions"):
        check_positions(opt, 41)
    model, _ = load_model("tiny", device="cpu")
    model.audio_tower = torch.nn.Module()
    model.audio_tower.embed_positions = torch.nn.Embedding(8, 4)  # another modality's table
    check_positions(model, 64)


def test_lora_targets_take_peft_spellings():
    """peft matches a target on a module's full name or its last dotted components, and takes all-linear: so do
    we. A module that exists but is not linear is named as such."""
    def lora_layers(targets):
        model, _ = load_model("tiny", device="cpu")
        torch.manual_seed(0)
        return {n.rsplit(".lora_A", 1)[0] for n, _ in bf.add_lora(model, targets=targets).named_parameters()
                if ".lora_A" in n}

    layers = len(load_model("tiny", device="cpu")[0].model.layers)
    assert len(lora_layers(("self_attn.q_proj",))) == layers
    assert len(lora_layers(("all-linear",))) == 7 * layers  # q k v o gate up down; not the LM head
    assert lora_layers("all-linear") == lora_layers(("all-linear",))  # a string is not split into letters
    assert lora_layers("q_proj, v_proj") == lora_layers(("q_proj", "v_proj"))
    with pytest.raises(ModelError, match="embed_tokens is not a linear layer"):
        lora_layers(("embed_tokens",))
    with pytest.raises(ModelError, match="give it alone"):
        lora_layers(("all-linear", "q_proj"))


def test_an_adapter_on_the_lm_head_saves_lora_only(tmp_path):
    """LoRA on lm_head makes peft save the frozen head too by default (250 MB a checkpoint at 7B): ours hold the
    LoRA weights only, and they load back onto the base exactly."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["align", "--targets", "q_proj,lm_head", "--output", str(out), *SMALL]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), sorted(saved)
    from booster_fast.adapters import load_adapter

    model, _, _ = load_adapter(out, "cpu", trainable=False)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any("lm_head" in n for n in loaded)
    for k, v in saved.items():
        name = next(n for n in loaded if n.replace(".default", "") == k)
        torch.testing.assert_close(loaded[name].float(), v.float(), rtol=0, atol=0)


def test_local_directories_as_users_have_them(model_dir, tmp_path, monkeypatch):
    """`~/dir` through the Python API, a checkpoint saved as pytorch_model.bin (the user's own file: not refused
    for lacking safetensors), and a directory without a model named as such (no advice to download it)."""
    home = tmp_path / "home"
    model, tok = load_model(str(model_dir), dtype="fp32", device="cpu")
    model.save_pretrained(home / "ck")  # then as an older checkpoint: the pickled state dict instead
    (home / "ck" / "model.safetensors").unlink()
    torch.save(model.state_dict(), home / "ck" / "pytorch_model.bin")
    tok.save_pretrained(home / "ck")
    assert (home / "ck" / "pytorch_model.bin").exists() and not (home / "ck" / "model.safetensors").exists()
    monkeypatch.setenv("HOME", str(home))
    loaded, _ = load_model("~/ck", dtype="fp32", device="cpu")
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in loaded.named_parameters())

    (home / "empty").mkdir()
    with pytest.raises(ModelError) as e:
        load_model(str(home / "empty"), device="cpu")
    assert "it has no config.json and no weights" in str(e.value) and "download" not in str(e.value)


def test_running_out_of_gpu_memory_is_one_line(capsys):
    """A configuration too big for the GPU ends with one line naming the ways to need less, and exit code 4."""
    from booster_fast.cli import OUT_OF_MEMORY, run_reporting

    def step():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB of which 1.2 GiB is free.\nmore detail")

    assert run_reporting(step) == OUT_OF_MEMORY == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("booster-fast: error: out of GPU memory (CUDA out of memory)")
    assert "--gradient-checkpointing" in err[0] and "--quant nf4" in err[0]


def test_a_pretrained_model_too_big_for_the_device_is_refused_before_it_loads(model_dir, monkeypatch):
    """The fit check of the presets applies to pretrained models too, from their config alone (the model built on
    the meta device): one line before any weight is read, naming the 4-bit way out. Its count is exact."""
    from booster_fast import model_size

    counts = model_size.pretrained_weight_counts(str(model_dir))
    loaded, _ = load_model(str(model_dir), device="cpu")
    assert model_size.weight_bytes(*counts) == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert model_size.pretrained_weight_counts(str(model_dir / "missing")) is None  # the load says why, not the check
    from transformers import AutoConfig

    quantised = AutoConfig.from_pretrained(str(model_dir))
    quantised.quantization_config = {"quant_method": "gptq", "bits": 4}
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: quantised)
    assert model_size.pretrained_weight_counts(str(model_dir)) is None  # a quantised checkpoint: no false refusal
    monkeypatch.undo()

    monkeypatch.setattr(model_size, "cuda_free_bytes", lambda device: model_size.weight_bytes(*counts) // 2)
    with pytest.raises(ModelError, match=r"needs ~0.0 GiB for its bfloat16 weights alone and cuda has 0.0 GiB "
                                         r"free; with --quant nf4"):
        load_model(str(model_dir), device="cuda")
    monkeypatch.setattr(model_size, "host_available_bytes", lambda: model_size.weight_bytes(*counts) // 2)
    with pytest.raises(ModelError, match=r"needs ~0.0 GiB for its bfloat16 weights alone and cpu has 0.0 GiB "):
        load_model(str(model_dir), device="cpu")  # on the CPU against the host's available memory


def test_rows_beyond_a_rotary_models_trained_positions_get_one_warning(tmp_path, caplog, capsys):
    """Rotary positions have no table to overflow: rows longer than the model was trained on run, said once, with
    the run's first lines (after every input is checked: a --max-length that is refused is the only line)."""
    import logging

    model, _ = load_model("tiny", device="cpu")
    n = model.config.max_position_embeddings
    assert check_positions(model, n) is None
    warning = (f"--max-length {n + 1} exceeds the model's max_position_embeddings ({n}): positions beyond it were "
               "never trained")
    assert check_positions(model, n + 1) == warning
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        code = main(["align", "--output", str(tmp_path / "run"), *SMALL[:2], "--max-length", str(n + 1),
                     "--batch-size", "2", "--align-samples", "4", "--save-every", "0"])
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert code == 0 and said.count((logging.WARNING, warning)) == 1, said
    assert said[0][1].startswith("align: tiny on cpu") and said[1] == (logging.WARNING, warning), said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="booster_fast"):  # refused by the batches' memory check
        code = main(["align", "--output", str(tmp_path / "big"), "--max-length", str(10**12)])
    assert code == 2 and [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert "--max-length" in capsys.readouterr().err and not (tmp_path / "big").exists()


def test_a_left_padding_tokenizer_pads_on_the_right(tmp_path):
    """[M10] models.py _load_pretrained: a checkpoint whose tokenizer pads on the left (common for chat models)
    comes back padding on the right, as the training batches and the fast engine's mask-free path expect."""
    from booster_fast.models import load_model

    model, tok = load_model("tiny", device="cpu", num_hidden_layers=1)
    tok.padding_side = "left"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.padding_side == "right"
    ids = loaded(["a b c", "a"], padding=True)["attention_mask"]
    assert ids[1][0] == 1 and ids[1][-1] == 0
