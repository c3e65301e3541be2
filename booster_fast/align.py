"""`booster-fast align`: load a model, add LoRA, run Booster (or SFT) updates, save the adapter.

Every input is checked before anything is written: flags, the output directory, the data file (parsed before
the model is loaded), the model, the LoRA targets, the batch streams. A bad input ends with one line on
stderr, exit code 2 and nothing on disk. Only then does the run directory appear, marked `.incomplete`
until its final files are in place (layout and atomicity: checkpoint.py). Checkpoints are written every
`--save-every` steps, at the end, and when SIGINT / SIGTERM arrives (the current step is finished first; exit
130 / 143 with one line that says how to resume). `--resume RUN_DIR` continues from the newest checkpoint
with the saved flags, so an interrupted run ends with the same adapter as an uninterrupted one.

The loop never reads the device between log intervals: each step's metrics stay as device tensors and are
stacked and copied to the host once every `--log-every` steps (the one labelled sync of the loop; a
checkpoint also reads them). Non-finite updates are skipped on the device by the fast engine; the count
reaches the host with the metrics, and more than `--max-skipped` of them, or 10 in a row (a diverged run: the
step that diverges may itself be finite, every later one is not), end the run with exit code 3, keeping its
checkpoints (the error says when the last one was saved within the streak). Under torchrun every rank trains on
its own shard and rank 0 alone writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch

from .atomic import writes
from .cli import NonFiniteAbort, UsageError
from .data import ENCODING
from .errors import reason
from .models import PRESETS as MODEL_PRESETS
from .run_args import (apply_resume, check_common_args, check_device_flags, check_output, check_run_args,
                       config_from_args, data_fingerprints, resolve_device)

log = logging.getLogger("booster_fast")
METRICS = ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm", "skipped")
PERTURB_AWARE_METRICS = ("loss_perturbed",)  # the alignment loss under the attention-output perturbation
SKIPPED = METRICS.index("skipped")
SKIPPED_IN_A_ROW = 10       # this many skipped updates in a row stop a run (exit 3): it has diverged
DEFAULT_STEPS, DEFAULT_EPOCHS = 20, 20.0  # built-in models: a 20-step demo; a real model: the paper's 20 epochs
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class SkipTally:
    """The updates skipped as non-finite so far (align and attack): in all, and in a row up to the last one."""

    def __init__(self, total: int = 0, in_a_row: int = 0):
        self.total, self.in_a_row = total, in_a_row

    def add(self, flags):
        """Count the skip flags (1.0 skipped, 0.0 applied) of the updates since the last call, in order."""
        for flag in map(round, flags):
            self.total += flag
            self.in_a_row = self.in_a_row + 1 if flag else 0

    def too_many(self, steps: int, max_skipped: int) -> str | None:
        """Why the run must stop, or None: more than `max_skipped` in all, or SKIPPED_IN_A_ROW in a row (all of a
        shorter run)."""
        if self.total > max_skipped:
            return f"more than --max-skipped {max_skipped}"
        if self.in_a_row >= min(SKIPPED_IN_A_ROW, steps):
            return f"the last {self.in_a_row} in a row"
        return None


def metrics_line(record: dict) -> str:
    """One line of metrics.jsonl (align's and attack's): strict JSON, a NaN or infinite value written as null."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite) + "\n"


def peak_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory this process's tensors have held so far, in GiB (the caching allocator's statistics: a
    host-side read, no sync); None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


# ------------------------------------------------------------------------------------------------
# data, processes, signals
# ------------------------------------------------------------------------------------------------
_created_group = False  # whether _dist_setup created the process group (then align destroys it when done)


def _dist_teardown():
    """Destroy the process group align created, after a run that ended on every rank alike (done, or stopped
    by an agreed signal); NCCL warns at exit otherwise. A rank that failed leaves it to the process exit."""
    global _created_group
    if _created_group:
        import torch.distributed as dist

        _created_group = False
        dist.destroy_process_group()


def _env_int(name: str, default: int, least: int, hint: str) -> int:
    """An integer environment variable (torchrun's), at least `least`; a one-line UsageError with `hint` otherwise."""
    value = os.environ.get(name, str(default))
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < least:
        raise UsageError(f"the environment variable {name} is {value!r}, not an integer >= {least} ({hint})")
    return n


def _dist_setup(device_flag):
    global _created_group
    world = _env_int("WORLD_SIZE", 1, 1, "torchrun sets it; unset it for one process")
    if world == 1:
        return 0, 1, resolve_device(device_flag)
    import torch.distributed as dist

    local = _env_int("LOCAL_RANK", 0, 0, "torchrun sets it: the process's GPU on its machine")
    device = resolve_device(device_flag, local)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as e:  # torch's env:// rendezvous without RANK, MASTER_ADDR or MASTER_PORT
            raise UsageError(f"WORLD_SIZE={world} asks for several processes, but {reason(e, 160)}: launch them "
                             f"with torchrun") from None
        _created_group = True
    return dist.get_rank(), world, device  # (resolve_device made a CUDA device the current one)


def load_data(args):
    """Parse the data files (no tokenizer needed): bad data fails before a model is loaded."""
    from .data import load_safety_data

    sft = getattr(args, "method", "booster") == "sft"  # SFT never draws a harmful batch
    sets = load_safety_data(args.data, "train", harmful_data=args.harmful_data, need_harmful=not sft)
    kept = []
    for flag, rows in zip(("align_samples", "harmful_samples"), sets):  # the original's sample_num and
        n = getattr(args, flag, None)                                    # bad_sample_num: the first N rows
        if n is not None and not (sft and flag == "harmful_samples") and not 1 <= n <= len(rows):
            source = (f"--harmful-data {args.harmful_data}" if flag == "harmful_samples" and args.harmful_data
                      else f"--data {args.data}")
            raise UsageError(f"--{flag.replace('_', '-')} must be between 1 and the {len(rows)} rows of {source}, "
                             f"got {n}")
        kept.append(rows[:n])
    for what, rows in zip(("alignment", "harmful")[:1 if sft else 2], kept):
        blank = sum(not ex.output.strip() for ex in rows)
        if blank:  # trained on as they are, as the original does: said once
            log.warning("%d of the %d %s rows have an empty answer: their only target is the end-of-sequence "
                        "token", blank, len(rows), what)
    return tuple(kept)


def build_streams(args, tok, rank, world, data=None):
    """(alignment stream, harmful stream (None for --method sft, which never draws a harmful batch), the numbers
    of alignment and harmful rows truncated to --max-length)."""
    from .data import BatchStream, check_max_length, encode_all

    check_max_length(tok, args.max_length)
    align, harmful = load_data(args) if data is None else data
    sft = getattr(args, "method", "booster") == "sft"
    enc_a, trunc_a = encode_all(tok, align, args.max_length)
    enc_h, trunc_h = ([], 0) if sft else encode_all(tok, harmful, args.max_length)
    checks = [("--batch-size", args.batch_size, enc_a, "alignment")]
    checks += [] if sft else [("--harmful-batch-size", args.harmful_batch_size, enc_h, "harmful")]
    for flag, size, rows, what in checks:
        if size * world > len(rows):
            each = f" on each of {world} processes" if world > 1 else ""
            raise UsageError(f"{flag} {size}{each} needs at least {size * world} {what} rows; the data has "
                             f"{len(rows)}")
    sa = BatchStream(enc_a, args.batch_size, args.max_length, tok.pad_token_id, args.seed, rank, world)
    sh = None if sft else BatchStream(enc_h, args.harmful_batch_size, args.max_length, tok.pad_token_id,
                                      args.seed + 1, rank, world)
    return sa, sh, (trunc_a, trunc_h)


class Interrupts:
    """SIGINT / SIGTERM set a flag that the loop reads after each step (finish the step, checkpoint, exit);
    a second SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main thread and the
    previous ones are put back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_SIGNAL:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, world: int, device) -> int | None:
        """The signal to stop on; with several processes all ranks agree (a collective: call at sync points)."""
        if world == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None   # .item() is a host sync: only at log intervals and checkpoints


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run_align(args) -> int:
    from . import Booster, add_lora, load_model
    from .compute import compute_dtype, enable_gradient_checkpointing, slow_bf16_on
    from .models import check_positions
    from .checkpoint import RunDir

    if args.resume is not None:
        apply_resume(args)
    check_common_args(args)
    cfg = config_from_args(args, args.impl)
    max_skipped = check_run_args(args, cfg)
    rank, world, device = _dist_setup(args.device)
    check_device_flags(args, device)
    if world > 1 and cfg.impl == "reference":
        raise UsageError("the reference implementation runs in one process; use --impl fast under torchrun")
    if rank == 0 and args.resume is None:
        check_output(args.output, args.overwrite,
                     inputs={"--data": args.data, "--harmful-data": args.harmful_data, "--model": args.model})
    if args.resume is None:  # recorded in run_config.json: a resume checks them
        args.data_sha256, args.encoding = data_fingerprints(args), ENCODING

    # ---- every other input check, before anything is written ---------------------------------------------
    data = load_data(args)
    model, tok = load_model(args.model, quant=args.quant, seed=args.seed, device=device,
                            dtype=getattr(args, "dtype", None),
                            trust_remote_code=getattr(args, "trust_remote_code", False))
    beyond = check_positions(model, args.max_length)  # (a warning, said with the run's first lines)
    if getattr(args, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    torch.manual_seed(args.seed)
    model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.targets)
    *pair, truncated = build_streams(args, tok, rank, world, data)
    notes = [(logging.WARNING, beyond)] if beyond else []
    if compute_dtype(model) == torch.bfloat16 and slow_bf16_on(device):
        instead = "--dtype fp32" if args.quant == "none" else "--quant none --dtype fp32"
        notes.append((logging.INFO, f"bf16 base on a CPU without bf16 instructions (AVX512-BF16, AMX): steps run "
                                    f"many times slower than with {instead}"))
    if any(truncated):
        notes.append((logging.INFO, "truncated to --max-length %d: %d alignment and %d harmful rows"
                      % (args.max_length, *truncated)))
    streams = {k: s for k, s in zip(("align", "harmful"), pair) if s is not None}
    if args.steps is None and args.epochs is None:  # resolved here and saved so, for --resume
        # a demo on the built-in models; the paper's 20 epochs on a real one (a run saved with neither flag
        # came from an older version, whose default was 20 steps)
        demo = args.model in MODEL_PRESETS or args.resume
        args.steps, args.epochs = (DEFAULT_STEPS, None) if demo else (None, DEFAULT_EPOCHS)
    steps = args.steps
    if args.epochs is not None:
        steps = max(1, math.ceil(args.epochs * streams["align"].batches_per_epoch))
    try:
        booster = Booster(model, cfg)
        booster.check_length(args.max_length)
    except ValueError as e:  # a pinned feature this model cannot run (packing, fused ops): nothing written yet
        raise UsageError(str(e)) from None

    run = None
    try:
        with Interrupts() as stop:
            if rank == 0:
                run = (RunDir.reopen(args.output) if args.resume
                       else RunDir.create(args.output, vars(args)))
            code = _train(args, cfg, run, model, tok, booster, streams, steps, max_skipped, stop, rank, world,
                          device, notes)
            _dist_teardown()
            return code
    finally:
        if run is not None:
            run.abandon()   # removes a run that failed before its first checkpoint; a no-op after one


def _start_line(args, cfg, booster, steps, world, device, start, last_ckpt) -> str:
    """The run's first log line: model, device, method and engine, steps, batch, and how the step runs."""
    merged = getattr(booster.engine, "merge", False) and args.method != "sft"
    how = ((", merged pass" if merged else "")
           + (", batches packed without their pads" if getattr(booster.engine, "pack", False) else ""))
    resumed = (f", resumed at step {start}" + (f" from {last_ckpt}" if last_ckpt else " (no checkpoint yet)")
               if args.resume else "")
    method = f"{args.method} + Vaccine (rho {cfg.rho:g})" if cfg.perturb_aware else args.method
    sizes = (args.batch_size,) if args.method == "sft" else (args.batch_size, args.harmful_batch_size)
    rows = "+".join(map(str, sizes)) + " rows"  # (SFT draws no harmful batch)
    if world > 1:  # the batch sizes are per process
        rows += f" per process ({'+'.join(str(n * world) for n in sizes)} per update)"
    model = args.model + (f" ({args.quant.upper()} base weights)" if getattr(args, "quant", "none") != "none" else "")
    return (f"align: {model} on {device}, {method}/{cfg.impl}, {steps} step{'' if steps == 1 else 's'} of "
            f"{rows} x {args.max_length} tokens{how}{resumed}")


def _train(args, cfg, run, model, tok, booster, streams, steps, max_skipped, stop, rank, world, device,
           notes=()) -> int:
    from .progress import plain_line, progress_bar

    from .checkpoint import METRICS as METRICS_FILE
    from .atomic import fsync_file
    from .checkpoint import load_newest, save_checkpoint

    # ---- resume: newest checkpoint, metrics cut back to it ---------------------------------------------------
    start, metrics_bytes, last_ckpt, skips = 0, 0, None, SkipTally()
    if args.resume:
        state, ckpt = load_newest(args.output, model, booster, streams, steps, set_aside=rank == 0)
        if ckpt is not None:
            start, metrics_bytes, last_ckpt = state["step"], state["metrics_bytes"], ckpt
            # (the streak is absent from checkpoints of older versions)
            skips = SkipTally(state["skipped"], state.get("skipped_in_a_row", 0))
        if rank == 0:
            run.record_changes(args.resume_changes)
    metrics_file = None
    if rank == 0:
        path = run.path / METRICS_FILE
        if path.exists() and path.stat().st_size > metrics_bytes:
            os.truncate(path, metrics_bytes)
        metrics_file = open(path, "ab")
        log.info(_start_line(args, cfg, booster, steps, world, device, start, last_ckpt))
        for level, note in notes:  # (said once every input has been checked: an error is then the only line)
            log.log(level, note)
        if device.type == "cuda":
            from .memory import log_fit

            log_fit(booster, args.batch_size, args.harmful_batch_size, args.max_length, args.method, device)
        if cfg.impl == "reference":
            log.info("align: the reference engine applies non-finite updates, as the original trainer does "
                     "(--impl fast skips them)")

    names = METRICS + (PERTURB_AWARE_METRICS if cfg.perturb_aware else ())  # (refused with --method sft)
    pending, t_last, saved_at = [], time.perf_counter(), start if last_ckpt else None
    bar = progress_bar(steps, args.method, initial=start, enabled=rank == 0)

    def writing(what: str):
        """`writes` for an output of the run: the one-line error names the last checkpoint to resume from."""
        kept = (f"; the last checkpoint is {last_ckpt}: resume with booster-fast align --resume "
                f"{shlex.quote(str(args.output))} once it can be written" if last_ckpt else "")
        return writes(f"{what} in {run.path}", kept, where=run.path)

    def flush(step):
        """Bring the pending metrics to the host (the loop's one sync), write them, check --max-skipped."""
        nonlocal pending, t_last
        if not pending:
            return
        values = torch.stack(pending).tolist()  # .tolist() is a host sync: once per log interval / checkpoint
        now = time.perf_counter()
        dt = (now - t_last) / len(values)
        peak = peak_memory_gib(device)
        lines = []
        for i, row in enumerate(values):
            rec = {"step": step - len(values) + 1 + i, **dict(zip(names, row)), "step_time_s": dt,
                   **({} if peak is None else {"peak_mem_gib": peak})}
            if math.isfinite(rec.get("skipped", math.nan)):
                rec["skipped"] = round(rec["skipped"])  # a flag, 0 or 1 (attack's metrics count them too)
            lines.append(metrics_line(rec))
        skips.add(row[SKIPPED] for row in values)
        if metrics_file:
            with writing(METRICS_FILE):
                metrics_file.write("".join(lines).encode())
                metrics_file.flush()  # readable as it grows (fsynced only at checkpoints)
        last = dict(zip(names, values[-1]))
        post = {"loss": f"{last['loss']:.3f}"}
        if args.method != "sft":  # SFT has no harmful pass: its harmful metrics are NaN
            post.update(harmful=f"{last['harmful_loss']:.3f}", gnorm=f"{last['harmful_grad_norm']:.2f}")
        if peak is not None:
            post["mem_gib"] = peak
        if skips.total:
            post["skipped"] = skips.total
        bar.set_postfix(post, refresh=False)  # (a dict keeps its order; the update draws it)
        bar.update(len(values))
        if bar.disable and rank == 0:  # stderr kept in a file: a plain line per interval instead of the bar
            log.info(plain_line(args.method, step, steps, post, dt))
        pending, t_last = [], now
        why = max_skipped is not None and skips.too_many(steps, max_skipped)
        if why:
            where = (f"the last checkpoint is {last_ckpt}" if last_ckpt
                     else "no checkpoint had been written, so nothing was kept")
            streak = skips.in_a_row
            if last_ckpt and streak and saved_at >= step - streak:  # the diverging update may be finite
                where += (f" (saved within the last {streak} skipped updates or at the one before them: its "
                          f"weights may have diverged already; --keep-checkpoints keeps older ones)")
            raise NonFiniteAbort(f"{skips.total} updates skipped by step {step} because the loss or gradient was "
                                 f"NaN/inf, {why}; {where}")

    def checkpoint(step):
        nonlocal last_ckpt, saved_at
        flush(step)
        if rank == 0:
            with writing(f"the checkpoint of step {step}"):
                metrics_file.flush()
                fsync_file(run.path / METRICS_FILE)
                last_ckpt = save_checkpoint(run.path, step, model, booster, streams,
                                            {"skipped": skips.total, "skipped_in_a_row": skips.in_a_row,
                                             "metrics_bytes": metrics_file.tell(), "steps": steps},
                                            args.keep_checkpoints)
                run.commit()
        saved_at = step
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    try:
        for step in range(start + 1, steps + 1):
            a = booster.to_device(next(streams["align"]), device)
            if args.method == "sft":
                out_t = booster.sft_step(a)
            else:
                out_t = booster.step(a, booster.to_device(next(streams["harmful"]), device))
            nan = torch.full((), float("nan"), device=device)
            pending.append(torch.stack([out_t.get(k, torch.zeros((), device=device) if k == "skipped" else nan)
                                        .float().reshape(()) for k in names]))
            save_due = args.save_every > 0 and step % args.save_every == 0 and step < steps
            sync = step % args.log_every == 0 or step == steps or save_due
            if sync:
                flush(step)
            signum = stop.agreed(world, device) if (sync or world == 1) and step < steps else None
            if signum is not None:
                checkpoint(step)
                bar.close()
                if rank == 0:
                    print(f"booster-fast: interrupted at step {step} ({signal.Signals(signum).name}); resume with: "
                          f"booster-fast align --resume {shlex.quote(str(args.output))}", file=sys.stderr)
                return EXIT_SIGNAL[signum]
            if save_due:
                checkpoint(step)
        flush(steps)
        bar.close()
        if saved_at != steps:
            checkpoint(steps)
        if rank == 0:
            with writing("the adapter"):
                metrics_file.close()
                run.finish(model, tok)
            log.info("saved adapter and metrics to %s%s", args.output,
                     f" ({skips.total} non-finite updates skipped)" if skips.total else "")
        # a signal in the last step or the final save: the run is whole, and the caller (an experiment, a
        # scheduler) still learns that it was asked to stop
        signum = stop.agreed(world, device)
        if signum is not None:
            if rank == 0:
                print(f"booster-fast: {signal.Signals(signum).name} arrived as the run ended; the run is complete "
                      f"in {args.output}", file=sys.stderr)
            return EXIT_SIGNAL[signum]
        return 0
    finally:
        bar.close()
        if metrics_file is not None and not metrics_file.closed:
            metrics_file.close()
