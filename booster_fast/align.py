"""`booster-fast align`: load a model, add LoRA, run Booster (or SFT) updates, save the adapter.

The loop never reads the device between log intervals: each step's metrics stay as device tensors and are
stacked and copied to the host once every `--log-every` steps (the one labelled sync of the loop). The run is
written into a temporary directory beside `--output` and renamed when complete; under torchrun every rank
trains on its own shard and rank 0 alone writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .cli import UsageError
from .config import BoosterConfig

log = logging.getLogger("booster_fast")
METRICS = ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm")


def config_from_args(args, impl: str) -> BoosterConfig:
    merge = {"auto": None, "on": True, "off": False}[args.merge_passes]
    try:
        return BoosterConfig(lamb=args.lamb, alpha=args.alpha, lr=args.lr, weight_decay=args.weight_decay,
                             max_grad_norm=args.max_grad_norm, impl=impl, merge_passes=merge,
                             meta_term=not args.no_meta_term, grad_accum=args.grad_accum)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_common_args(args):
    for flag in ("batch_size", "max_length", "lora_r"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.harmful_batch_size is None:
        args.harmful_batch_size = args.batch_size
    if args.harmful_batch_size < 1:
        raise UsageError(f"--harmful-batch-size must be >= 1, got {args.harmful_batch_size}")
    for flag in ("batch_size", "harmful_batch_size"):
        if getattr(args, flag) % args.grad_accum:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a multiple of "
                             f"--grad-accum {args.grad_accum}")


def resolve_device(name: str | None, rank_local: int = 0) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", rank_local)
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r} (cpu or cuda)")
    return device


RUN_MARKERS = ("run_config.json", "metrics.jsonl", "adapter_config.json")


def prepare_output(path: str, overwrite: bool) -> tuple[Path, list[Path]]:
    """Check that `path` can receive a run; return a fresh temporary directory beside it and the parent
    directories created for it (removed again if the run fails)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {path} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise UsageError(f"--output {path} is a non-empty directory that holds no run; refusing to replace it")
        if not overwrite:
            raise UsageError(f"--output {path} already holds a run; pass --overwrite to replace it")
    created, parent = [], out.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --output {path}: {parent} is not a directory")
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    except OSError as e:
        remove_dirs(created)
        raise UsageError(f"cannot write --output {path}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a run directory follows the umask like any other
    return tmp, created


def remove_dirs(dirs: list[Path]):
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break


def publish(tmp: Path, out: Path):
    """Atomically move the finished run into place (replacing an old one only after the new one is complete)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dist_setup(device_flag):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_flag)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def build_streams(args, tok, rank, world):
    from .data import BatchStream, check_max_length, encode_all, load_safety_data

    check_max_length(tok, args.max_length)
    align, harmful = load_safety_data(args.data, "train", harmful_data=args.harmful_data)
    enc_a, trunc_a = encode_all(tok, align, args.max_length)
    enc_h, trunc_h = encode_all(tok, harmful, args.max_length)
    if (trunc_a or trunc_h) and rank == 0:
        log.info("truncated to --max-length %d: %d alignment and %d harmful rows", args.max_length, trunc_a, trunc_h)
    sa = BatchStream(enc_a, args.batch_size, args.max_length, tok.pad_token_id, args.seed, rank, world)
    sh = BatchStream(enc_h, args.harmful_batch_size, args.max_length, tok.pad_token_id, args.seed + 1, rank, world)
    return sa, sh


def run_align(args) -> int:
    from tqdm.auto import tqdm

    from . import Booster, add_lora, load_model
    from .batches import to_device

    check_common_args(args)
    cfg = config_from_args(args, args.impl)
    if args.log_every < 1:
        raise UsageError(f"--log-every must be >= 1, got {args.log_every}")
    rank, world, device = _dist_setup(args.device)
    if world > 1 and cfg.impl == "reference":
        raise UsageError("the reference implementation runs in one process; use --impl fast under torchrun")
    out = Path(args.output)
    tmp, created = prepare_output(args.output, args.overwrite) if rank == 0 else (None, [])
    ok = False
    try:
        model, tok = load_model(args.model, quant=args.quant, seed=args.seed, device=device)
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        torch.manual_seed(args.seed)
        model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=targets)
        align_stream, harmful_stream = build_streams(args, tok, rank, world)
        steps = args.steps
        if args.epochs is not None:
            if not args.epochs > 0:
                raise UsageError(f"--epochs must be > 0, got {args.epochs}")
            steps = max(1, math.ceil(args.epochs * align_stream.batches_per_epoch))
        steps = 20 if steps is None else steps
        if steps < 1:
            raise UsageError(f"--steps must be >= 1, got {steps}")
        booster = Booster(model, cfg)
        if rank == 0:
            (tmp / "run_config.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
            log.info("align: %s on %s, %s/%s, %d steps of %d+%d rows x %d tokens", args.model, device,
                     args.method, cfg.impl, steps, args.batch_size, args.harmful_batch_size, args.max_length)
        metrics_file = open(tmp / "metrics.jsonl", "w") if rank == 0 else None
        pending, t_last = [], time.perf_counter()
        bar = tqdm(total=steps, disable=rank != 0, dynamic_ncols=True, desc=args.method)
        for step in range(1, steps + 1):
            a = to_device(next(align_stream), device)
            if args.method == "sft":
                out_t = booster.sft_step(a)
            else:
                out_t = booster.step(a, to_device(next(harmful_stream), device))
            pending.append(torch.stack([out_t.get(k, torch.full((), float("nan"), device=device))
                                        .float().reshape(()) for k in METRICS]))
            if step % args.log_every == 0 or step == steps:
                values = torch.stack(pending).tolist()  # .tolist() is a host sync: once per log interval
                now = time.perf_counter()
                dt = (now - t_last) / len(values)
                for i, row in enumerate(values):
                    rec = {"step": step - len(values) + 1 + i, **dict(zip(METRICS, row)), "step_time_s": dt}
                    rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
                    if metrics_file:
                        metrics_file.write(json.dumps(rec) + "\n")
                last = dict(zip(METRICS, values[-1]))
                bar.set_postfix(loss=f"{last['loss']:.3f}", h=f"{last['harmful_loss']:.3f}",
                                gnorm=f"{last['harmful_grad_norm']:.2f}", it_s=f"{1 / dt:.2f}")
                bar.update(len(values))
                pending, t_last = [], now
        bar.close()
        if rank == 0:
            metrics_file.close()
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            publish(tmp, out)
            log.info("saved adapter and metrics to %s", out)
        ok = True
        return 0
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            remove_dirs(created)
