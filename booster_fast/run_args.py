"""align's flags, checked before anything is loaded or written: the Booster settings they make, the loop's
limits, the device, the output directory, and `--resume` (the saved run's flags taken over, a conflicting one
refused). bench, attack, eval and `booster-fast memory` share the checks of the flags they share with align.
Every error is a one-line UsageError (exit 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from .atomic import check_not_empty, check_spares_inputs, existing_folder
from .cli import UsageError
from .config import BoosterConfig
from .lora import split_targets
from .models import absolute_local_path

DEFAULT_MAX_SKIPPED = 100   # see --max-skipped's help: a healthy fp32/bf16 run skips none
# flags a resumed run may change: they do not touch the maths of an update
RESUME_FREE = ("device", "log_every", "save_every", "keep_checkpoints", "max_skipped")
RESUME_IGNORED = ("command", "output", "overwrite", "resume")


def config_from_args(args, impl: str) -> BoosterConfig:
    tristate = {"auto": None, "on": True, "off": False}
    merge, packing = tristate[args.merge_passes], tristate[getattr(args, "packing", "auto")]
    fused = tristate[getattr(args, "fused_ops", "auto")]
    try:
        return BoosterConfig(lamb=args.lamb, alpha=args.alpha, lr=args.lr, weight_decay=args.weight_decay,
                             max_grad_norm=args.max_grad_norm, impl=impl, merge_passes=merge, packing=packing,
                             fused_ops=fused,
                             meta_term=not args.no_meta_term, perturb_aware=getattr(args, "perturb_aware", False),
                             rho=getattr(args, "rho", BoosterConfig.rho), grad_accum=args.grad_accum,
                             graphs=getattr(args, "graphs", "auto"))
    except ValueError as e:  # named by its field ("lr must be ..."): named by its flag here
        field, _, rest = str(e).partition(" ")
        flag = f"--{field.replace('_', '-')}" if field in BoosterConfig.__dataclass_fields__ else field
        raise UsageError(f"{flag} {rest}") from None


def check_common_args(args):
    for flag in ("batch_size", "max_length", "lora_r", "grad_accum"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.lora_alpha < math.inf:  # LoRA's scale alpha / r: 0 trains nothing, NaN everything into NaN
        raise UsageError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if hasattr(args, "targets") and not split_targets(args.targets):
        raise UsageError("--targets names no module (comma-separated names such as q_proj,v_proj, or all-linear)")
    if args.harmful_batch_size is None:
        args.harmful_batch_size = args.batch_size
    if args.harmful_batch_size < 1:
        raise UsageError(f"--harmful-batch-size must be >= 1, got {args.harmful_batch_size}")
    for flag in ("batch_size", "harmful_batch_size"):
        if getattr(args, flag) % args.grad_accum:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a multiple of "
                             f"--grad-accum {args.grad_accum}")


def check_run_args(args, cfg: BoosterConfig) -> int | None:
    """Checks of the flags of the run loop; returns the --max-skipped limit in force (None: not checked)."""
    for flag, low in (("log_every", 1), ("save_every", 0), ("keep_checkpoints", 1), ("max_skipped", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.epochs is not None and not 0 < args.epochs < math.inf:
        raise UsageError(f"--epochs must be a finite number > 0, got {args.epochs}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if cfg.perturb_aware and args.method == "sft":
        raise UsageError("--perturb-aware changes the Booster update only; it does nothing with --method sft")
    if not cfg.perturb_aware and cfg.rho != BoosterConfig.rho:
        raise UsageError(f"--rho {cfg.rho} does nothing without --perturb-aware")
    resumed = getattr(args, "resume", None) is not None  # a run saved before the checks below resumes as it ran
    if args.method == "sft" and getattr(args, "merge_passes", "auto") == "on" and not resumed:
        raise UsageError("--merge-passes on: the SFT step runs one pass, there is nothing to merge")
    idle = [flag for flag, set_ in (("--lamb", cfg.lamb != BoosterConfig.lamb),
                                    ("--alpha", cfg.alpha != BoosterConfig.alpha),
                                    ("--no-meta-term", not cfg.meta_term)) if set_]
    if args.method == "sft" and idle and not resumed:
        raise UsageError(f"{', '.join(idle)}: Booster's own; {'they do' if len(idle) > 1 else 'it does'} nothing "
                         f"with --method sft")
    if cfg.impl == "reference":
        pinned = [f"--{f.replace('_', '-')} on" for f in ("merge_passes", "packing", "fused_ops", "graphs")
                  if getattr(args, f, "auto") == "on"]
        if pinned and not resumed:
            raise UsageError(f"{', '.join(pinned)}: the fast engine's; --impl reference runs the original trainer's "
                             "step as it is")
        if args.max_skipped is not None:
            raise UsageError("--max-skipped needs --impl fast: the reference implementation applies non-finite "
                             "updates as the original trainer does")
        return None
    return DEFAULT_MAX_SKIPPED if args.max_skipped is None else args.max_skipped


def resolve_device(name: str | None, rank_local: int = 0) -> torch.device:
    """--device as a torch.device (default: cuda if there is one, else cpu; cuda without an index: the local
    rank's GPU). A CUDA device becomes the current one: Triton launches its kernels on the current device."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", rank_local)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r} (cpu or cuda)")
    return device


def check_device_flags(args, device: torch.device):
    """Raise UsageError for a flag pinned on that `device` cannot honour (before anything is loaded)."""
    from .kernels.booster_kernels import triton_unusable
    from .kernels.model_kernels import available

    if getattr(args, "graphs", "auto") == "on" and device.type != "cuda":
        raise UsageError(f"--graphs on needs a CUDA device, not {device}")
    if getattr(args, "fused_ops", "auto") == "on" and not available(device):
        if device.type == "cuda":
            raise UsageError(f"--fused-ops on needs Triton, which cannot launch on {device}: "
                             f"{triton_unusable(device)}")
        raise UsageError(f"--fused-ops on needs a CUDA device (the Triton kernels), not {device}")


# ------------------------------------------------------------------------------------------------
# the output directory and --resume
# ------------------------------------------------------------------------------------------------
# what makes a directory a run (any one of them): only such a directory is replaced with --overwrite
RUN_MARKERS = ("run_config.json", "metrics.jsonl", "adapter_config.json", ".incomplete", "checkpoints")


def check_output(path: str, overwrite: bool, resumable: bool = True, inputs: dict | None = None):
    """Raise UsageError unless `path` can receive a new run (writes nothing): not a file, not a directory that
    holds something other than a run (or a run, without `overwrite`), not a checkpoint of a run, and neither one
    of `inputs` nor a folder holding one (atomic.check_spares_inputs). `resumable`: the command can continue an
    unfinished run with --resume (align can; attack cannot)."""
    if not str(path).strip():
        raise UsageError(f"--output {path!r} is empty: name the run's directory")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {path} exists and is not a directory")
    check_spares_inputs(out, "--output", inputs)
    run = out.absolute().parent.parent
    if out.absolute().parent.name == "checkpoints" and (run / "run_config.json").exists():
        raise UsageError(f"--output {path} is inside the checkpoints of the run {run}; refusing to write there")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise UsageError(f"--output {path} is a non-empty directory that holds no run; refusing to replace it")
        if not overwrite:
            if resumable and (out / ".incomplete").exists():
                raise UsageError(f"--output {path} holds an unfinished run; continue it with --resume {path}, "
                                 f"or pass --overwrite to replace it")
            raise UsageError(f"--output {path} already holds a run; pass --overwrite to replace it")
    parent = existing_folder(out)
    if not parent.is_dir():
        raise UsageError(f"cannot write --output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --output {path}: {parent} is not writable")


def _cli_defaults(model: str) -> dict:
    from .cli import build_parser

    d = vars(build_parser().parse_args(["align"]))
    tiny = model == "tiny"          # cli.main() fills these two the same way
    d["batch_size"], d["max_length"] = (8, 128) if tiny else (10, 256)
    return d


def _align_flags() -> dict:
    """align's flags by destination: their parser actions."""
    from .cli import subparser

    return {action.dest: action for action in subparser("align")._actions}


def _saved_fault(key: str, value, action, default) -> str | None:
    """Why `value`, read from run_config.json for `key`, is not a value align's flag (its parser `action`) could
    have recorded, or None when it is one. None stands for a flag left out, where its default is None."""
    if value is None and default is None:
        return None
    if action.nargs == 0 and isinstance(action.const, bool):  # a switch (store_true)
        return None if isinstance(value, bool) else f"{key} is {json.dumps(value)}, not true or false"
    if action.type is None:  # a string flag
        ok = isinstance(value, str)
        what = "a string"
    else:  # read back through the flag's own type: the value must come back as it is (so 2.0 is no int)
        try:
            ok = not isinstance(value, (str, bool)) and action.type(str(value)) == value
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            ok = False
        what = {int: "an int", float: "a number"}.get(action.type, f"a valid --{key.replace('_', '-')}")
    if ok and action.choices is not None and value not in action.choices:
        ok, what = False, f"one of {', '.join(map(str, action.choices))}"
    return None if ok else f"{key} is {json.dumps(value)}, not {what}"


def _check_saved(resume: str, saved, defaults: dict):
    """One-line UsageError unless run_config.json holds what align records: a JSON object whose flags have
    values their parser could have given, and a {path: SHA-256} data_sha256."""
    from .checkpoint import CONFIG

    if not isinstance(saved, dict):
        raise UsageError(f"--resume {resume}: {CONFIG} holds {json.dumps(saved)[:40]}, not a JSON object")
    flags = _align_flags()
    for key, value in saved.items():
        if key in flags and key not in RESUME_IGNORED:
            fault = _saved_fault(key, value, flags[key], defaults.get(key))
            if fault:
                raise UsageError(f"--resume {resume}: {CONFIG}: {fault}")
    sums = saved.get("data_sha256")
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise UsageError(f"--resume {resume}: {CONFIG}: data_sha256 is {json.dumps(sums)[:40]}, not a JSON object "
                         f"of SHA-256 digests")


def apply_resume(args, finished_ok: bool = False):
    """Take the flags of the run in args.resume: a flag given on the command line (cli.given_flags: also at its
    default; from Python, a value other than the default) with a value other than the saved one is a conflict
    (one-line UsageError), except the few in RESUME_FREE. finished_ok: a finished run's flags too (`booster-fast
    memory` reads them; align can only resume an unfinished run)."""
    from .checkpoint import CHECKPOINTS, CONFIG, MARKER, METRICS

    check_not_empty(args.resume, "--resume", "name the run's directory")
    run = Path(args.resume)
    if not run.is_dir():
        raise UsageError(f"--resume {args.resume}: " + ("a file, not a run directory" if run.exists()
                                                       else "no such run directory"))
    try:
        saved = json.loads((run / CONFIG).read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume {args.resume}: holds no run ({CONFIG} is missing)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {args.resume}: cannot read {CONFIG} ({e})") from None
    if isinstance(saved, dict) and saved.get("command", "align") != "align":
        raise UsageError(f"--resume {args.resume}: {saved['command']!r} wrote this run; --resume takes an align run")
    if not finished_ok and not (run / MARKER).exists():
        raise UsageError(f"--resume {args.resume}: the run is finished, nothing to resume")
    if args.overwrite:
        raise UsageError("--resume continues a run; --overwrite would replace it: pass one of them")
    for name, fits, kind in ((CHECKPOINTS, Path.is_dir, "a directory"), (METRICS, Path.is_file, "a file")):
        found = run / name  # what the resumed run writes into (absent: created)
        if not finished_ok and (found.exists() or found.is_symlink()) and not fits(found):
            raise UsageError(f"--resume {args.resume}: {name} is not {kind}; the run cannot continue in it")
    defaults = _cli_defaults(args.model)
    _check_saved(args.resume, saved, defaults)
    # a flag counts as given when it is on the command line (cli.given_flags), else (the Python API) when its value
    # is not the default
    on_line = vars(args).pop("given_flags", None)

    def given(key: str, value) -> bool:
        return key in on_line if on_line is not None else value != defaults.get(key)

    if given("output", args.output) and Path(args.output).absolute() != run.absolute():
        raise UsageError(f"--resume {args.resume} and --output {args.output} name different runs")
    conflicts, changed = [], {}
    for key in ("model", "data", "harmful_data"):  # a run recorded before local paths were absolute
        if isinstance(saved.get(key), str):
            saved[key] = absolute_local_path(saved[key])
    for key, value in vars(args).items():
        if key in RESUME_IGNORED or (key not in saved and key not in defaults):
            continue
        if key not in saved:  # a flag newer than the run: it ran at the flag's default
            saved[key] = defaults[key]
        if key in RESUME_FREE:
            if not given(key, value):
                setattr(args, key, saved[key])
            elif value != saved[key]:
                changed[key] = value
        elif given(key, value) and value != saved[key]:
            conflicts.append(f"--{key.replace('_', '-')} {value} (the run has "
                             f"{'none' if saved[key] is None else saved[key]})")
        else:
            setattr(args, key, saved[key])
    if conflicts:
        raise UsageError(f"--resume {args.resume}: flags that differ from the saved run: {', '.join(conflicts)}; "
                         f"drop them or start a new run")
    if not finished_ok:
        _check_encoding(args.resume, saved)
    args.data_sha256 = data_fingerprints(args)
    for path, digest in (saved.get("data_sha256") or {}).items():
        if args.data_sha256.get(path) != digest:
            what = "changed since the run started (its SHA-256 differs)" if os.path.isfile(path) else "is gone"
            raise UsageError(f"--resume {args.resume}: {path} {what}: the resumed steps would not train on the "
                             f"run's rows; start a new run")
    args.output, args.overwrite, args.resume_changes = str(run.absolute()), False, changed


def _check_encoding(resume: str, saved: dict):
    """One-line UsageError when the run's examples may have become tokens otherwise than this version makes them: a
    run recorded without "encoding" comes from a version before the record, and the older of those tokenized the
    response apart from its prompt. The built-in models' tokenizer gives the same tokens either way, so their runs
    go on."""
    from .data import ENCODING
    from .models import PRESETS

    found = saved.get("encoding")
    if found != ENCODING and not (found is None and saved.get("model") in PRESETS):
        how = ("records no token encoding (versions before the record may have tokenized each response apart "
               "from its prompt)" if found is None else f"tokenized its examples as {json.dumps(found)[:40]}")
        raise UsageError(f"--resume {resume}: the run {how}; this version tokenizes prompt and response together, "
                         f"so the resumed steps could train on other tokens: start a new run")


def data_fingerprints(args) -> dict[str, str]:
    """{path: SHA-256} of the local data files of a run (--data, --harmful-data), recorded in run_config.json so
    that a resume can tell whether they changed (the streams check only the row counts)."""
    return {path: file_sha256(path) for path in (args.data, getattr(args, "harmful_data", None))
            if path and os.path.isfile(path)}


def file_sha256(path) -> str:
    """A file's SHA-256 (hex), read in 1 MiB blocks; an unreadable file is a one-line UsageError."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()
