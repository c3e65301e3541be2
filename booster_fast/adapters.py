"""Adapter directories, shared by `attack` and `eval`: which base model an adapter goes on, and loading it.

An adapter is an align or attack run directory (its run_config.json names the base model and the settings), one
of an align run's checkpoints (`RUN/checkpoints/step-000020`: the run's run_config.json applies), or any peft LoRA
adapter directory, whose adapter_config.json's `base_model_name_or_path` names the base. `--base-model`, `--quant`
and `--base-seed` override the base either way. Anything else is a one-line UsageError.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .cli import UsageError

log = logging.getLogger("booster_fast")

INCOMPLETE = ".incomplete"    # the marker of a run that has not finished (align's and attack's)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DEFAULT_MAX_LENGTH = 256      # the paper's; for an adapter whose directory has no run_config.json
DEFAULT_SEED = 43             # the paper's


def add_base_args(p):
    """The flags that say which base model an adapter goes on (attack and eval)."""
    from .cli import TRUST_REMOTE_CODE_HELP, seed_value
    from .models import PRESETS, QUANTS

    p.add_argument("--base-model", default=None, metavar="MODEL",
                   help=f"the base model under the adapter: HF id | local path | {' | '.join(PRESETS)} (default: "
                        "the run's run_config.json, else adapter_config.json's base_model_name_or_path)")
    p.add_argument("--quant", default=None, choices=QUANTS, help="base weights (default: the run's, else none)")
    p.add_argument("--base-seed", type=seed_value, default=None, metavar="N",
                   help="init seed of a random-weight preset base such as tiny (default: the run's, else 0 = "
                        "load_model's default); ignored for pretrained models")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP + "; asked again here, "
                   "not taken from the run")


def _read_json(d: Path, name: str, run_dir) -> dict:
    try:
        cfg = json.loads((d / name).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--adapter {run_dir}: unreadable {name} ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--adapter {run_dir}: {name} is not a JSON object")
    return cfg


def read_run_config(run_dir: str | Path) -> dict:
    """run_config.json of a finished align/attack run, or {} for any other LoRA adapter directory (no
    run_config.json); UsageError (one line) for anything else."""
    d = Path(run_dir)
    if not d.is_dir():
        step = re.fullmatch(r"step-(\d+)", d.name)
        named = d.with_name(f"step-{int(step.group(1)):06d}") if step else None
        hint = f" (checkpoints have six digits: {named})" if named is not None and named.is_dir() else ""
        raise UsageError(f"--adapter {run_dir}: no such adapter directory{hint}")
    if (d / INCOMPLETE).exists():
        raise UsageError(f"--adapter {run_dir}: the run has not finished (resume it with booster-fast align --resume)")
    if not (d / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {run_dir}: not a LoRA adapter directory (no adapter_config.json)")
    peft_type = _read_json(d, "adapter_config.json", run_dir).get("peft_type")
    if peft_type != "LORA":
        raise UsageError(f"--adapter {run_dir}: adapter_config.json holds a {peft_type or 'untyped'} adapter, "
                         "not LoRA")
    if not any((d / f).is_file() for f in ADAPTER_WEIGHTS):  # peft would look for them on the Hub instead
        raise UsageError(f"--adapter {run_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if (d / "run_config.json").is_file():
        return _checked_fields(_read_json(d, "run_config.json", run_dir), run_dir)
    run = d.absolute().parent.parent
    if d.absolute().parent.name == "checkpoints" and (run / "run_config.json").is_file():  # a checkpoint of a run
        log.info("adapter %s: a checkpoint of %s, whose run_config.json gives the base and settings", run_dir, run)
        return _checked_fields(_read_json(run, "run_config.json", run_dir), run_dir)
    return {}


# run_config.json's fields that attack and eval read as names (of a model, a data set or file, a method, a command)
_NAME_FIELDS = ("command", "model", "quant", "dtype", "data", "harmful_data", "harmful", "benign", "method",
                "aligned_with")


def _checked_fields(cfg: dict, run_dir) -> dict:
    """cfg, once the fields attack and eval read have their types (an edited file gets one line, not a traceback);
    the integers are checked where they are read (config_int)."""
    for where, fields in (("", cfg), ("base.", cfg.get("base"))):
        if fields is None:
            continue
        if not isinstance(fields, dict):
            raise UsageError(f"--adapter {run_dir}: run_config.json's base is {fields!r}, not a JSON object")
        for key in _NAME_FIELDS:
            if fields.get(key) is not None and not isinstance(fields[key], str):
                raise UsageError(f"--adapter {run_dir}: run_config.json's {where}{key} is {fields[key]!r}, not a "
                                 "string")
    return cfg


def config_int(cfg: dict, key: str, default: int) -> int:
    """An integer field of a run_config.json (`default` when absent); UsageError for anything else."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UsageError(f"run_config.json: {key} is {value!r}, not an integer")
    return int(value)


def base_of(cfg: dict) -> dict:
    """How to rebuild the base model of a run: align writes model/quant/seed at the top, attack under "base" (with
    "merged": the adapters merged into the base before its own LoRA was added, `attack --lora new`, as folders of
    the run directory)."""
    base = cfg.get("base") or cfg
    out = {"model": base.get("model", "tiny"), "quant": base.get("quant", "none"),
           "seed": config_int(base, "seed", DEFAULT_SEED), "dtype": base.get("dtype")}
    merged = base.get("merged") if cfg.get("base") else None
    if merged:
        if not (isinstance(merged, list) and all(isinstance(m, str) for m in merged)):
            raise UsageError(f"run_config.json: base.merged is {merged!r}, not a list of adapter directories")
        out["merged"] = merged
    return out


def resolve_base(args, run_cfg: dict) -> tuple[dict, str]:
    """({model, quant, seed}, where the model name came from) for `args.adapter`: the run's run_config.json, or
    adapter_config.json's base_model_name_or_path, each overridden by --base-model / --quant / --base-seed."""
    from .models import PRESETS, checked_path

    if run_cfg:
        base, source = base_of(run_cfg), "run_config.json"
    else:  # a plain peft adapter (the Python API's): quant none and load_model's default seed unless the flags say
        name = _read_json(Path(args.adapter), "adapter_config.json", args.adapter).get("base_model_name_or_path")
        base, source = {"model": name or None, "quant": "none", "seed": 0, "dtype": None}, "adapter_config.json"
    if getattr(args, "base_model", None):
        checked_path(args.base_model, "--base-model")  # (a local path that is not there: named by its own flag)
        base["model"], source = args.base_model, "--base-model"
    if getattr(args, "quant", None):
        base["quant"] = args.quant
    if getattr(args, "base_seed", None) is not None:
        base["seed"] = args.base_seed
    for merged in base.get("merged") or ():  # (before minutes of loading: load_adapter merges them)
        if not (Path(args.adapter) / merged / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {args.adapter}: the adapter its base merged, {merged}, is missing from it "
                             "(run_config.json's base.merged)")
    if not base["model"]:
        raise UsageError(f"--adapter {args.adapter}: no run_config.json, and adapter_config.json names no base model; "
                         f"pass --base-model (HF id, local directory, or one of {', '.join(PRESETS)})")
    if not run_cfg and base["model"] in PRESETS and getattr(args, "base_seed", None) is None:
        log.info("adapter %s has no run_config.json: its %s base is built with seed %d (load_model's default; "
                 "--base-seed for another, e.g. 43 for align's)", args.adapter, base["model"], base["seed"])
    return base, source


def default_harmful_data(base_model: str) -> str:
    """Harmful data of an adapter without run_config.json: the built-in set for a random-weight preset (its
    tokenizer is trained on it), the paper's BeaverTails for a pretrained model."""
    from .models import PRESETS

    return "builtin" if base_model in PRESETS else "beavertails"


def load_adapter(run_dir: str | Path, device, trainable: bool, base: dict | None = None, cfg: dict | None = None,
                 trust_remote_code: bool = False):
    """(peft model, tokenizer, run config): the base model (`base`, else the run's) with the adapter on top.
    `cfg`: the run's config when the caller has read it already (read_run_config)."""
    from peft import PeftModel

    from .errors import described
    from .models import ModelError, load_model
    from .nf4 import keep_nf4_trainable_

    if cfg is None:
        cfg = read_run_config(run_dir)
    if base is None:
        base = base_of(cfg)
    model, tok = load_model(base["model"], quant=base["quant"], seed=base["seed"], device=device,
                            dtype=base.get("dtype"), trust_remote_code=trust_remote_code)
    for merged in base.get("merged") or ():  # an attack that trained a new LoRA on the aligned model merged
        model = merge_adapter(model, str(Path(run_dir) / merged), f"{run_dir}'s run_config.json names it under "
                              "base.merged")
    try:
        model = PeftModel.from_pretrained(model, str(run_dir), is_trainable=trainable)
    except Exception as e:  # noqa: BLE001 - shape mismatch, missing modules, a corrupt weights file: one line
        first = described(e)  # a state_dict error's header with its first mismatch (which tensor, which shapes)
        if "safetensor" in type(e).__name__.lower() or "pickl" in type(e).__name__.lower():
            raise ModelError(f"cannot read the adapter weights in {run_dir} ({first})") from None
        raise ModelError(f"cannot load the adapter {run_dir} onto {base['model']} ({first}); "
                         f"is that the base model it was trained on? (--base-model)") from None
    if trainable:  # LoRA weights are fp32 masters, as add_lora makes them
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        keep_nf4_trainable_(model)  # the held-out loss runs in eval mode: no inference-only repack on the CPU
    if (Path(run_dir) / "tokenizer.json").is_file():  # the run's own tokenizer (a checkpoint keeps its vocabulary)
        from transformers import AutoTokenizer

        try:
            saved = AutoTokenizer.from_pretrained(str(run_dir))
        except Exception as e:  # noqa: BLE001 - a corrupt tokenizer.json or tokenizer_config.json: one line
            raise ModelError(f"cannot load the tokenizer in {run_dir} ({described(e)})") from None
        if saved.eos_token_id is None:  # every example ends with EOS (a tokenizer_config.json that lost its tokens)
            raise ModelError(f"the tokenizer in {run_dir} has no eos_token; check its tokenizer_config.json")
        if len(saved) == len(tok):
            tok = saved
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok, cfg


def merge_adapter(model, adapter_dir: str, why: str):
    """`model` with the LoRA adapter in `adapter_dir` merged into its weights (peft's merge_and_unload; 4-bit
    weights are dequantised, merged and quantised again); ModelError (one line) where it cannot be loaded."""
    from peft import PeftModel

    from .errors import described
    from .models import ModelError

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - as load_adapter's own load: one line
        raise ModelError(f"cannot merge the adapter {adapter_dir} into the base ({described(e)}; {why})") from None
