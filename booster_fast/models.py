"""Models: the embedded tiny Llama, download-free shape presets, Hugging Face loading.

`load_model("tiny")` builds a ~3 M-parameter Llama from a config with a seeded init and the project's own
tokenizer, so everything runs offline on a CPU. `llama-1b-shape` / `-7b-` / `-13b-` / `-70b-shape` have the
layer shapes of TinyLlama-1.1B and Llama-2-7B/13B/70B with random weights (for benchmarks: the cost of a step
does not depend on the values). Anything else is a Hugging Face id or a local directory. `quant="nf4"` stores
the decoder's linear layers as bitsandbytes NF4 (nf4.py); LoRA is added by lora.py; the weights' size, and
whether they fit the device, are model_size.py's.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os

import torch
from torch import nn

from .config import is_integer
from .errors import described, reason
from .nf4 import quantize_linears_, quantize_nf4_

log = logging.getLogger("booster_fast")

PRESETS = {
    # name: LlamaConfig fields (vocab comes from the tokenizer for tiny, 32000 for the shapes)
    "tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000),
    "llama-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000),
    "llama-13b-shape": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                            num_key_value_heads=40, max_position_embeddings=4096, vocab_size=32000),
    "llama-70b-shape": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, max_position_embeddings=4096, vocab_size=32000),
}
QUANTS = ("none", "nf4")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype: what the base's frozen weights are kept in


class ModelError(ValueError):
    """A model that cannot be loaded, with a one-line reason."""


def load_model(name: str = "tiny", quant: str = "none", dtype: torch.dtype | None = None, seed: int = 0,
               device: str | torch.device | None = None, trust_remote_code: bool = False, **config_overrides):
    """Return (model, tokenizer).

    dtype (a torch dtype, or a name of DTYPES) defaults to float32 for `tiny` and bfloat16 for everything else:
    a pretrained checkpoint is loaded in bf16 whatever it was saved in, as the original trains it; fp32 is for
    exact comparisons. `config_overrides` change preset fields (e.g. `num_hidden_layers=8`; a name that is no
    LlamaConfig field is refused, and so is any override of a pretrained model, whose shape is its checkpoint's).
    With quant="nf4" the compute dtype is bf16 whatever `dtype` says.
    """
    if quant not in QUANTS:
        raise ModelError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ModelError(f"load_model: dtype must be a floating torch dtype or one of {', '.join(DTYPES)}, "
                         f"got {dtype!r}")
    if not is_integer(seed):  # 1.7 would be seed 1
        raise ModelError(f"load_model: seed must be an integer, got {seed!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name in PRESETS:
        from .model_size import check_fits, free_bytes

        config_overrides = _checked_overrides(name, config_overrides)
        dtype = dtype or (torch.float32 if name == "tiny" else torch.bfloat16)
        free = free_bytes(device)  # one line now rather than running out of memory halfway through the build
        if free is not None:
            check_fits(name, quant, dtype, free, device, **config_overrides)
        # the shape presets are quantised layer by layer as they are built: a 7B model never exists in bf16
        layer_by_layer = quant == "nf4" and name != "tiny"
        model, tok = _build_preset(name, dtype, seed, device, config_overrides, quantize_layers=layer_by_layer)
        if quant == "nf4" and not layer_by_layer:
            quantize_nf4_(model)
        return model, tok
    if config_overrides:  # they would go unused: from_pretrained builds the checkpoint's own config
        first = next(iter(config_overrides))
        raise ModelError(f"load_model({name!r}): {first}={config_overrides[first]!r}: config overrides change a "
                         f"built-in preset ({', '.join(PRESETS)}); a pretrained model keeps its checkpoint's config")
    return _load_pretrained(name, quant, dtype or torch.bfloat16, device, trust_remote_code)


def _checked_overrides(name: str, overrides: dict) -> dict:
    """`load_model`'s config overrides of a preset, numpy integers as ints (LlamaConfig takes no others); ModelError
    for ones no LlamaConfig of the preset can take: a name that is no field of it (LlamaConfig keeps any keyword as
    an attribute, so a typo such as num_layers=2 would go unused), num_hidden_layers, num_attention_heads or
    num_key_value_heads below 1, or heads not a multiple of kv heads."""
    from transformers import LlamaConfig

    overrides = {k: int(v) if is_integer(v) else v for k, v in overrides.items()}
    fields = {**PRESETS[name], **overrides}
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        value = fields[key]
        if not (key == "num_key_value_heads" and value is None) and (not is_integer(value) or value < 1):
            raise ModelError(f"load_model({name!r}): {key} must be an integer >= 1, got {value!r}")
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"] or fields["num_attention_heads"]
    if heads % kv_heads:
        raise ModelError(f"load_model({name!r}): num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    # a field is an attribute of the default config; a legacy name it converts (rope_theta into rope_parameters
    # in transformers 5) is no attribute of the built one, while a name it does not know is kept as one
    defaults, built = LlamaConfig(), LlamaConfig(**fields)
    unknown = [k for k in overrides if not hasattr(defaults, k) and k in vars(built)]
    if unknown:
        known = [k for k in vars(defaults) if not k.startswith("_")]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ModelError(f"load_model({name!r}): {unknown[0]}={overrides[unknown[0]]!r} is not a LlamaConfig "
                         f"field{hint}; the preset's fields are {', '.join(PRESETS[name])}")
    return overrides


def absolute_local_path(name: str) -> str:
    """A relative local model directory or data file as an absolute path (what run_config.json and an adapter
    record, so that the run loads from any working directory); presets, HF ids and absolute paths as they are.
    (Data set names never come here: cli.parse keeps them as names.)"""
    if name in PRESETS or os.path.isabs(name) or not os.path.exists(os.path.expanduser(name)):
        return name
    return os.path.abspath(os.path.expanduser(name))


def _build_preset(name, dtype, seed, device, overrides, quantize_layers=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from .tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    fields = dict(PRESETS[name])
    fields.setdefault("vocab_size", len(tok))
    fields.update(overrides)
    if fields["vocab_size"] < len(tok):
        raise ModelError(f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {len(tok)}")
    config = LlamaConfig(**fields, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attn_implementation="sdpa")
    with _seeded(seed, device), torch.device(device), _default_dtype(dtype):
        if not quantize_layers:
            model = LlamaForCausalLM(config)
        else:
            # build the model without its decoder layers, then each layer on its own, initialised as the model's
            # own init does it (normal(0, initializer_range) weights, unit norms) and quantised at once; the
            # peak is the NF4 model plus one bf16 layer (a 7B build then needs ~4 GB instead of 13.5)
            n_layers, config.num_hidden_layers = config.num_hidden_layers, 0
            model = LlamaForCausalLM(config)
            config.num_hidden_layers = n_layers
            for i in range(n_layers):
                layer = LlamaDecoderLayer(config, layer_idx=i)
                for m in layer.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, mean=0.0, std=config.initializer_range)
                with _default_dtype(torch.float32):  # bitsandbytes builds its NF4 code table in the default dtype
                    model.model.layers.append(quantize_linears_(layer))
            model.is_loaded_in_4bit = True
    model.config.use_cache = False
    return model, tok


@contextlib.contextmanager
def _default_dtype(dtype):
    """Create parameters directly in `dtype` (a 7B model never exists in fp32 on the device)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@contextlib.contextmanager
def _seeded(seed, device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class quiet_hub:
    """Silence huggingface_hub's retry warnings (one stderr line per failed request) while reaching the hub: a
    failure is reported once, as our own one-line error."""

    def __enter__(self):
        self.logger = logging.getLogger("huggingface_hub")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face hub's host name resolves (one DNS lookup; False in offline mode). Without it a
    download only retries with back-off, about 25 s per file, before it fails."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline():
    """The hub's offline mode (what HF_HUB_OFFLINE=1 sets) for the duration: files from the cache, no request.
    `local_files_only` alone does not reach every lookup: transformers' AutoModel loads probe for a peft adapter
    config without it, which offline costs ~25 s of retries even when the cache holds the model."""
    from huggingface_hub import constants
    from transformers.utils import hub

    flags = [(constants, "HF_HUB_OFFLINE")]
    if hasattr(hub, "_is_offline_mode"):  # transformers before 5 kept its own copy of the flag, taken at import
        flags.append((hub, "_is_offline_mode"))
    before = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, before):
            setattr(module, name, value)


# Keyword arguments of every pretrained model's load. transformers 5.25 swaps layers for kernels it fetches from
# the hub at load time unless told not to ("hub kernels", its `kernels` package); both engines run transformers'
# own modules (the reference computes the original trainer's maths, the fast engine fuses those modules itself)
# and nothing is fetched at run time. From transformers 5.2 (the floor) to 5.24 it is accepted and the default
NO_HUB_KERNELS = {"use_kernels": False}


def from_hub(load, name: str, **kwargs):
    """`load(name, **kwargs)` (a transformers from_pretrained) from a local directory or the local cache first,
    without a request, and from the hub only when that fails and the hub can be reached (its retry lines
    silenced); OSError at once when it cannot."""
    try:
        with hub_offline():
            return load(name, local_files_only=True, **kwargs)
    except OSError:
        if os.path.isdir(os.path.expanduser(name)):
            raise
        if not hub_reachable():
            raise OSError(f"{name} is not in the local cache and the Hugging Face hub cannot be reached "
                          f"(offline)") from None
    with quiet_hub():
        return load(name, **kwargs)


def checked_path(name: str, flag: str = "--model") -> str:
    """A model name with `~` expanded; ModelError (naming `flag`) for one that looks like a local path and is no
    directory."""
    looks_like_path = (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
                       or name.count("/") > 1)
    path = os.path.expanduser(name)
    if looks_like_path and not os.path.isdir(path):
        raise ModelError(f"{flag} {name}: no such directory (built-in presets: {', '.join(PRESETS)}; or a "
                         f"Hugging Face id such as meta-llama/Llama-2-7b-hf)")
    return path


def _check_config(path: str, where: str, trust_remote_code: bool) -> None:
    """Load a pretrained model's config alone: a missing or unreachable one stays an OSError (for the caller to
    explain); a malformed one (a field of the wrong type, an unknown model_type) is a ModelError with the reason.
    transformers' and huggingface_hub's validation errors share no base class below Exception."""
    from transformers import AutoConfig

    try:
        from_hub(AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load config.json {where} ({described(e)})") from None


def _load_pretrained(name, quant, dtype, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_size import check_fits, free_bytes, pretrained_weight_counts

    path = checked_path(name)
    local = os.path.isdir(path)
    free = free_bytes(device)  # one line now rather than running out of memory minutes into the load
    if free is not None:
        counts = pretrained_weight_counts(path, trust_remote_code)
        if counts is not None:
            check_fits(name, quant, dtype, free, device, counts=counts)
    # the weights go straight to the device as they load (a 70B bf16 checkpoint never sits in host memory whole);
    # from the hub only the safetensors files (no pickled .bin), a local directory's .bin is the user's own
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": device}, **NO_HUB_KERNELS,
                  **({} if local else {"use_safetensors": True}))
    if quant == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    tok = None
    try:
        # the config alone first: a malformed one is named as such (and never reaches the tokenizer's fallbacks,
        # which warn); a directory without one is left to the loads below and the missing files named
        if not local or os.path.isfile(os.path.join(path, "config.json")):
            _check_config(path, f"in {name}" if local else f"of {name!r}", trust_remote_code)
        tok = from_hub(AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code)
        model = from_hub(AutoModelForCausalLM.from_pretrained, path, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed tokenizer file raises KeyError, tokenizers' Exception, ...
        if tok is not None and not isinstance(e, (OSError, ValueError)):
            raise  # the weights' load failing otherwise (out of memory, say) is no bad input
        first = reason(e)
        if tok is None and not isinstance(e, OSError):
            first = f"its tokenizer does not load ({described(e)})"
        if local:
            files = os.listdir(path)
            missing = [what for what, there in (
                ("config.json", "config.json" in files),
                ("weights (*.safetensors or *.bin)", any(f.endswith((".safetensors", ".bin")) for f in files)))
                if not there]
            raise ModelError(f"cannot load the model in {name}: "
                             + (f"it has no {' and no '.join(missing)}" if missing else first)) from None
        raise ModelError(f"cannot load model {name!r} (a Hugging Face id; built-in presets: {', '.join(PRESETS)}): "
                         f"{first} — download it first (e.g. `hf download {name}`)") from None
    if quant == "none" and len(set((getattr(model, "hf_device_map", None) or {}).values())) == 1:
        del model.hf_device_map  # one device: not a model split across devices (which the HF Trainer would assume)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = model.get_input_embeddings().num_embeddings
    if tok.pad_token_id is not None and tok.pad_token_id >= rows:
        # a pad added to the tokenizer but not to the model (common with Llama-2's [PAD]): pads are never
        # attended to nor labelled, so any id in the table does; the embedding lookup of one outside fails
        if tok.eos_token_id is None or tok.eos_token_id >= rows:
            raise ModelError(f"--model {name}: the tokenizer's pad id {tok.pad_token_id} is outside the model's "
                             f"{rows} embeddings and it has no EOS to pad with instead")
        log.info("padding with EOS (id %d): the tokenizer's pad id %d is outside the model's %d embeddings",
                 tok.eos_token_id, tok.pad_token_id, rows)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.use_cache = False
    return model, tok


def learned_positions(model: nn.Module) -> int | None:
    """The number of positions in a model's learned absolute position table (GPT-2's wpe, OPT's embed_positions,
    ...), None for a model without one (rotary, sinusoidal). Only the table beside the token embeddings counts
    (not an audio or vision encoder's)."""
    tokens = model.get_input_embeddings()
    parent = next((m for m in model.modules() if any(c is tokens for c in m.children())), None)
    for name, m in (parent.named_children() if parent is not None else ()):
        if isinstance(m, nn.Embedding) and name in ("wpe", "embed_positions", "position_embeddings"):
            # OPT keeps 2 rows before position 0 (`offset`); RoBERTa-style tables start after padding_idx
            skip = int(getattr(m, "offset", 0)) or (m.padding_idx + 1 if m.padding_idx is not None else 0)
            return m.num_embeddings - skip
    return None


def check_positions(model: nn.Module, max_length: int, flag: str = "--max-length") -> str | None:
    """ModelError when rows of `max_length` tokens do not fit a model's learned absolute position table
    (learned_positions): the lookup would fail in the first step. Rows longer than a rotary model's
    max_position_embeddings run, on positions it never trained on: the warning to log for them is returned (None
    otherwise), for the caller to log once every input is checked."""
    positions = learned_positions(model)
    if positions is not None:
        if max_length > positions:
            raise ModelError(f"{flag} {max_length} exceeds the model's {positions} learned positions; "
                             f"use {flag} {positions} or less")
        return None
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(trained, int) and max_length > trained:  # rotary: runs, beyond what the model was trained on
        return (f"{flag} {max_length} exceeds the model's max_position_embeddings ({trained}): positions beyond it "
                f"were never trained")
    return None


def length_dependent_rope(model: nn.Module) -> tuple[str, int] | None:
    """(rope type, L) for a model whose rotary embedding takes its frequencies from each forward's longest position
    once that passes L, else None. transformers' "dynamic" types rescale to the longest sequence seen so far (kept
    from forward to forward until one shorter than L resets them; L = max_position_embeddings), and "longrope"
    switches from its short factors to its long ones (L = original_max_position_embeddings). Up to L positions
    both are a fixed rotary embedding (dynamic's plain one, longrope's short factors)."""
    found = []
    for m in model.modules():
        types = getattr(m, "rope_type", None)
        if not hasattr(m, "original_max_seq_len") or not isinstance(types, (str, dict)):
            continue
        config = getattr(m, "config", None)
        params = getattr(config, "rope_parameters", None) or {}
        for layer_type, kind in (types.items() if isinstance(types, dict) else [(None, types)]):
            if "dynamic" in kind:
                found.append((kind, int(m.original_max_seq_len)))
            elif kind == "longrope":
                own = params.get(layer_type, {}) if layer_type is not None else params
                limit = (own.get("original_max_position_embeddings") if isinstance(own, dict) else None) or \
                    getattr(config, "original_max_position_embeddings", None) or m.original_max_seq_len
                found.append((kind, int(limit)))
    return min(found, key=lambda f: f[1]) if found else None


def check_rope_length(rope: tuple[str, int] | None, length: int, what: str) -> None:
    """ModelError (a ValueError) where `length` positions pass the L of `rope` (length_dependent_rope's answer):
    beyond L the fast engine's forwards (the merged [h ; f], packed micro-batches, batches kept at max_length for
    CUDA graphs) span other rows than the reference's, and so get other frequencies (FastBooster.check_length)."""
    if rope is not None and length > rope[1]:
        kind, limit = rope
        raise ModelError(f"{what}: this model's {kind!r} RoPE changes its frequencies beyond {limit} positions, "
                         f"by each forward's longest row, and there the fast engine's passes would not compute "
                         f"the reference's update; use max_length <= {limit} (--max-length) or impl='reference' "
                         f"(--impl reference)")
