"""Command line: `booster-fast align|memory|bench|attack|eval|experiment ...` (also `python -m booster_fast`).

Every user error (bad flag value, unknown model, missing or malformed data, an output that cannot be written)
ends with one line on stderr and exit code 2, and leaves nothing half-written behind: files are written under a
temporary name and renamed, and an align run directory is marked `.incomplete` until its final files are in
place (checkpoints inside it let an interrupted run resume).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import select
import signal
import sys
import threading

from .config import BoosterConfig
from .errors import reason

log = logging.getLogger("booster_fast")


class UsageError(ValueError):
    """Bad input from the user: reported in one line, exit code 2."""


class OutputError(RuntimeError):
    """An output a run could not write partway (a full disk, say): reported in one line, exit code 1."""


class StdoutError(OutputError):
    """stdout itself could not be written (a full disk under `> file`)."""


class NonFiniteAbort(RuntimeError):
    """Too many updates were skipped as non-finite (align, attack: align.SkipTally.too_many): reported in one
    line, exit code 3."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that a command's cleanup (its finally blocks remove
    what it had half-written) runs before the process ends with exit code 143. align installs its own handler
    while it trains (finish the step, checkpoint, exit)."""


def _terminate(signum, frame):
    raise Terminated


TRUST_REMOTE_CODE_HELP = "allow a Hugging Face model to run its own Python code (off unless asked)"
BENCH_TINY_LENGTH = 64  # the bench's tiny default, a quick CPU run: it cuts most built-in rows (256 keeps them whole)

# the original Booster code's command-line names (its train.py and scripts) -> ours, for the error a swap-in
# user meets first
ORIGINAL_FLAGS = {
    "--model_name_or_path": "--model", "--output_dir": "--output", "--learning_rate": "--lr",
    "--num_train_epochs": "--epochs", "--max_steps": "--steps", "--per_device_train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--grad-accum", "--model_max_length": "--max-length",
    "--weight_decay": "--weight-decay", "--max_grad_norm": "--max-grad-norm",
    "--perturb_aware": "--perturb-aware (a switch: no True after it)",
    "--sample_num": "--align-samples", "--bad_sample_num": "--harmful-samples",
    "--data_path": "--data (beavertails for PKU-Alignment/BeaverTails_safe)",
    "--optimizer": "--method (booster, the default, or sft)", "--lora_r": "--lora-r", "--lora_alpha": "--lora-alpha",
    "--bf16": "nothing (the base loads in bf16, --dtype fp32 to keep fp32; --quant nf4 for 4-bit)", "--tf32": "nothing",
    "--lr_scheduler_type": "nothing (the schedule is constant, as the paper's)",
    "--save_steps": "--save-every", "--save_total_limit": "--keep-checkpoints", "--logging_steps": "--log-every",
}


def seed_value(text: str) -> int:
    """argparse type of a seed: an integer that torch's and Python's generators both take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {text}")
    return value


class _Help(argparse.HelpFormatter):
    """--help with each flag's default, where its text does not give it already; a text's "(paper: X)" becomes
    "(default: X, the paper's)" where the default is the paper's value, as it is for every such flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default in ([], argparse.SUPPRESS) \
                or "default" in text:  # (by identity: a default of 0 is shown, though 0 == False)
            return text
        paper = re.search(r"\(paper: ([^)]*)\)", text)
        if paper:
            same = _same_number(paper.group(1), action.default)
            return text.replace(paper.group(0), "(default: %(default)s, the paper's)" if same
                                else f"(default: %(default)s; paper: {paper.group(1)})")
        return f"{text[:-1]} (default: %(default)s)." if text.endswith(".") else f"{text} (default: %(default)s)"


def _same_number(text: str, value) -> bool:
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return False


class Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (no usage block: --help has it), naming the subcommand's --help, and a
    hint for the original Booster code's flag names in the 'unrecognized arguments' error. With `raises` set, an
    error is a UsageError instead (a command line that another command built and checks)."""

    raises = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand's parser, so that the error names its --help
            subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            parser = subs[0].choices[args.command] if subs and getattr(args, "command", None) else self
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            hints = [f"{flag} -> {ORIGINAL_FLAGS[flag]}" for flag in (w.split("=", 1)[0] for w in message.split()[2:])
                     if flag in ORIGINAL_FLAGS]
            if hints:
                message += " (the original Booster code's names; here: " + ", ".join(hints) + ")"
        if self.raises:
            raise UsageError(" ".join(message.split()))
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser, tiny_length: int = 128,
                    device_default: str = "cuda when available"):
    from .models import PRESETS

    p.add_argument("--model", default="tiny", help=f"{' | '.join(PRESETS)} (random weights, no download) | "
                                                   "HF id | local path")
    p.add_argument("--quant", default="none", choices=["none", "nf4"], help="4-bit NF4 base weights (bitsandbytes)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="the frozen base weights' dtype, whatever the checkpoint holds (default: fp32 for tiny, else "
                        "bf16, as the original trains; fp32 for exact comparisons)")
    p.add_argument("--device", default=None, help=f"cpu | cuda | cuda:N (default: {device_default})")
    p.add_argument("--seed", type=seed_value, default=43, help="seed for init, data order and LoRA (paper: 43)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="alignment rows per update, on each process under torchrun (default: 8 for tiny, else 10 "
                        "as in the paper)")
    p.add_argument("--harmful-batch-size", type=int, default=None,
                   help="harmful rows per update, on each process under torchrun (default: = --batch-size)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per row, right-padded to it (default: {tiny_length} for tiny, else 256 as in the "
                        "paper)")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (paper: 32)")
    p.add_argument("--lora-alpha", type=float, default=4, help="LoRA alpha; the scale is alpha / r (paper: 4)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj", help="comma-separated LoRA target modules")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate, constant (paper: 5e-4)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the combined gradient to this global norm; 0 disables (paper: 1.0)")
    p.add_argument("--lamb", type=float, default=5.0, help=BoosterConfig.help()["lamb"])
    p.add_argument("--alpha", type=float, default=0.1, help=BoosterConfig.help()["alpha"])
    p.add_argument("--grad-accum", type=int, default=1, help=BoosterConfig.help()["grad_accum"])
    p.add_argument("--merge-passes", default="auto", choices=["auto", "on", "off"],
                   help="fast: harmful + alignment batches as one pass (auto: on for CUDA, off for the CPU)")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="fast: pad-free batches, no pad position computed (auto: on wherever the model allows it)")
    p.add_argument("--fused-ops", default="auto", choices=["auto", "on", "off"],
                   help="fast: the model's RMSNorm, MLP gate and RoPE as fused Triton kernels (auto: on for CUDA, "
                        "off for the CPU)")
    p.add_argument("--no-meta-term", action="store_true",
                   help="drop the −λ·∇h(w̃) term, an ablation not in the original code: ∇f + λ·∇h (one pass "
                        "fewer)")
    p.add_argument("--perturb-aware", action="store_true", help=BoosterConfig.help()["perturb_aware"])
    p.add_argument("--rho", type=float, default=BoosterConfig.rho, help=BoosterConfig.help()["rho"])
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"], help=BoosterConfig.help()["graphs"])
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward (non-reentrant): less memory, ~1/3 "
                        "more compute; the merged pass holds activations of both batches at once")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def _add_align_args(a: argparse.ArgumentParser, for_memory: bool = False, **model_args):
    """align's flags (also memory's, which takes align's command line as it is: `for_memory` hides from its --help
    the flags that change the run but not its step, which it accepts and does not use)."""
    def run_only(text: str) -> str:
        return argparse.SUPPRESS if for_memory else text

    _add_model_args(a, **model_args)
    a.add_argument("--data", default="builtin", help="builtin | beavertails | PATH (.json/.jsonl)")
    a.add_argument("--harmful-data", default=None,
                   help="harmful set (instruction/input/output rows) for such a --data file, or in place of "
                        "builtin's or beavertails' own")
    a.add_argument("--impl", default="fast", choices=["reference", "fast"],
                   help="fast: this project's step; reference: the original trainer's, op for op")
    a.add_argument("--method", default="booster", choices=["booster", "sft"],
                   help="booster: the defence; sft: plain alignment SFT, the paper's baseline")
    g = a.add_mutually_exclusive_group()
    # (shown to memory too: argparse's usage line fails on a hidden member of a mutually exclusive group)
    g.add_argument("--steps", type=int, default=None,
                   help="number of updates (default: 20 for the built-in models, a demo; else --epochs 20)")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the alignment set (default for a real model: 20, the paper's)")
    a.add_argument("--align-samples", type=int, default=None, metavar="N",
                   help="use the first N alignment rows of --data (the original's --sample_num; default: all)")
    a.add_argument("--harmful-samples", type=int, default=None, metavar="N",
                   help="use the first N harmful rows (the original's --bad_sample_num; default: all)")
    a.add_argument("--log-every", type=int, default=10, metavar="N",
                   help=run_only("read metrics from the device every N steps"))
    a.add_argument("--output", default="runs/demo", metavar="DIR",
                   help=run_only("run directory (adapter, metrics.jsonl)"))
    a.add_argument("--overwrite", action="store_true", help=run_only("replace an existing run directory"))
    a.add_argument("--save-every", type=int, default=100, metavar="N",
                   help=run_only("write a checkpoint every N steps (also at the end and on SIGINT/SIGTERM; 0: only "
                                 "then)"))
    a.add_argument("--keep-checkpoints", type=int, default=2, metavar="K",
                   help=run_only("keep the newest K checkpoints"))
    a.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its newest checkpoint with its saved settings (the result "
                        "equals an uninterrupted run, bit for bit on the CPU); may change only --device, "
                        "--log-every, --save-every, --keep-checkpoints, --max-skipped")
    a.add_argument("--max-skipped", type=int, default=None, metavar="N",
                   help=run_only("fast: updates with a NaN/inf loss or gradient are skipped on the device and "
                                 "counted; stop with exit code 3 once more than N are skipped (checked at log "
                                 "intervals; default 100: a healthy fp32/bf16 run skips none; 10 in a row also stop "
                                 "the run, or all of a shorter one: it has diverged). Not with --impl reference, "
                                 "which applies them as the original trainer does"))


def subparser(command: str) -> argparse.ArgumentParser:
    """A fresh parser of one subcommand's flags (argparse keeps them in private attributes)."""
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def given_flags(command: str, argv: list[str]) -> set[str]:
    """The destinations of the flags on the command line of `command`, a default value included (a flag left out
    and one given at its default are two things to --resume)."""
    sub = subparser(command)
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(sub.parse_args(argv[argv.index(command) + 1:])))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="booster-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("align", help="align a model with Booster (or SFT) and save the LoRA adapter",
                       epilog="exit codes: 0 done; 1 a checkpoint, the metrics or the adapter could not be written "
                              "(a full disk: one line; earlier checkpoints are kept); 2 bad input (one line on "
                              "stderr, nothing written); 3 more than --max-skipped non-finite updates, or 10 in a "
                              "row (checkpoints are kept); 4 out of GPU memory (one line; checkpoints are kept); "
                              "5 CUDA rejected a graph capture (one line: rerun with --graphs off); 130 / 143 "
                              "stopped by SIGINT / SIGTERM after a checkpoint (the line says how to resume), or as "
                              "the run ended (the run is complete)")
    _add_align_args(a)

    b = sub.add_parser("bench", help="time reference vs fast Booster steps side by side in one process",
                       epilog="exit codes: 0 done; 1 an entry failed, or its first step disagrees with its "
                              "baseline's (the others are reported); 2 bad input (one "
                              "line on stderr, nothing written); 3 a CUDA graph capture was invalidated, so nothing "
                              "more could be measured in the process (--output keeps what was; rerun without "
                              "fast-graphs)")
    _add_model_args(b, tiny_length=BENCH_TINY_LENGTH)
    b.add_argument("--data", default=None,
                   help="random | builtin | beavertails | PATH (.json/.jsonl): the rows the steps take, streamed as "
                        "align streams them (default: builtin for tiny; random for any other model: right-padded "
                        "random tokens, rows 60-100%% real, 80%% of each batch)")
    b.add_argument("--harmful-data", default=None, help="the harmful set in place of --data's own, as align's")
    b.add_argument("--impls", default="reference,fast,sft,fast-sft",
                   help="comma list of reference, fast, fast-merged, fast-unmerged, fast-graphs (CUDA), "
                        "fast-padded (packing off), fast-unfused (fused ops off), sft (the reference engine's "
                        "SFT step), fast-sft (the fast engine's)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    b.add_argument("--json", action="store_true", help="print one JSON document on stdout (the table goes to stderr)")
    b.add_argument("--output", default=None, metavar="FILE.json", help="also write the JSON document here (atomically)")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of ms/step (needs matplotlib)")

    m = sub.add_parser("memory", help="estimate a step's peak GPU memory for align's flags, without loading the model",
                       description="The peak memory of one align step on the GPU (weights, LoRA state, activations, "
                                   "logits), estimated from the model's config alone, beside what --gradient-"
                                   "checkpointing and --quant nf4 would change. Takes align's command line as it is "
                                   "(its flags for the run alone, such as --output and --save-every, are accepted and "
                                   "not shown here).")
    _add_align_args(m, for_memory=True, device_default="cuda; the estimate needs no GPU")
    m.add_argument("--json", action="store_true", help="print one JSON document (bytes per part) instead")

    from . import attack, evaluate, experiment  # the defence pipeline: each module declares its own flags
    for module in (attack, evaluate, experiment):
        module.add_parser(sub)
    return parser


EXIT_NONFINITE = 3  # the exit code of a run stopped for its non-finite updates
OUT_OF_MEMORY = 4  # the exit code of a run that ran out of device memory
CAPTURE_INVALIDATED = 5  # the exit code of a run whose CUDA graph capture CUDA itself rejected (graphs.py)


def run_reporting(fn, *args) -> int:
    """Run fn(*args) and return its exit code; a user error becomes one line on stderr and exit code 2, an output
    that cannot be written partway one line and exit code 1, too many non-finite updates one line and exit code
    3, running out of device memory one line and exit code 4, a CUDA graph capture that CUDA rejected one line and
    exit code 5, Ctrl-C exit code 130, SIGTERM 143 (all after the command's cleanup). Every subcommand runs through
    here."""
    import torch

    from .data import DataError
    from .graphs import CaptureInvalidated
    from .models import ModelError

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    stdout = sys.stdout
    if stdout is not None:  # (None: started with stdout closed, where print writes nothing)
        sys.stdout = _CheckedStdout(stdout)
    try:
        code = fn(*args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a reader that has gone (`| head`) is found here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        _stdout_to_null()  # stdout's reader stopped reading: what is left is not wanted, and no traceback
        return 128 + signal.SIGPIPE
    except (UsageError, DataError, ModelError) as e:
        print(f"booster-fast: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OutputError as e:
        if isinstance(e, StdoutError):
            _stdout_to_null()
        print(f"booster-fast: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the system cannot even look up (Python 3.11's Path.exists raises for it)
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"booster-fast: error: a file name too long for this system: {e.filename}", file=sys.stderr)
        return 2
    except NonFiniteAbort as e:
        print(f"booster-fast: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except torch.cuda.OutOfMemoryError as e:  # a configuration too big for the GPU, found at its first step or
        # at a long batch hours in: one line with the ways to need less, not a traceback
        first = reason(e)
        print(f"booster-fast: error: out of GPU memory ({first.split('. Tried')[0].rstrip('.')}): a smaller "
              f"--batch-size or --max-length, --quant nf4 or --gradient-checkpointing (where the command has them) "
              f"need less", file=sys.stderr)
        return OUT_OF_MEMORY
    except CaptureInvalidated as e:  # fatal even under --graphs auto (graphs.CaptureInvalidated says why)
        print(f"booster-fast: error: {reason(e)}", file=sys.stderr)
        return CAPTURE_INVALIDATED
    except Terminated:
        print("booster-fast: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("booster-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stdout_to_null():
    """Point stdout's file descriptor at /dev/null: what its buffer still holds (stdout buffered, as it is under
    `> file` or a pipe) is flushed there at the interpreter's exit, instead of failing once more after the one
    error line ("Exception ignored ... OSError", exit code 120)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


class _CheckedStdout:
    """stdout, whose failed writes other than to a closed pipe (a full disk under `> file`) are a one-line
    OutputError instead of a traceback; everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def _checked(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:  # (run_reporting: a reader that has gone)
            raise
        except OSError as e:
            raise StdoutError(f"cannot write to standard output: {e.strerror or e}") from None

    def write(self, text):
        return self._checked(self._stream.write, text)

    def flush(self):
        return self._checked(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it), as opposed to another pipe
    or socket of the command's."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no stdout, no fd, no poll on this system
        return False


def main(argv=None) -> int:
    # our own progress lines at INFO; every other library at WARNING (httpx, for one, logs each request of a
    # model or data download at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("booster_fast").setLevel(logging.INFO)
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.command in ("attack", "eval", "experiment"):  # own defaults; one-line errors, exit 2
        from . import attack, evaluate, experiment
        return {"attack": attack, "eval": evaluate, "experiment": experiment}[args.command].main(args)
    size_defaults(args)
    if args.command == "align":
        return run_reporting(_align, args)
    if args.command == "memory":
        return run_reporting(_memory, args)
    return run_reporting(_bench, args)


def parse(argv: list[str]) -> argparse.Namespace:
    """A command line as the commands take it: parsed, the flags given noted for --resume, local paths absolute."""
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", None):  # --resume compares the flags given with the run's, at whatever value
        args.given_flags = given_flags(args.command, argv)
    from .models import absolute_local_path

    if args.command in ("align", "attack") and args.output:  # a run directory by its own name ("." included)
        args.output = os.path.abspath(args.output)
    for flag in ("model", "base_model"):  # a local model directory is recorded absolute
        if getattr(args, flag, None):
            setattr(args, flag, absolute_local_path(getattr(args, flag)))
    if args.command in ("align", "memory", "attack", "eval"):  # so are local data files: a resume, or an eval of
        # an attack run (which reads the run's data), may start in another directory
        from .data import DATA_SET_NAMES

        for flag in ("data", "harmful_data", "harmful", "benign", "prompts"):
            value = getattr(args, flag, None)
            if value and value not in DATA_SET_NAMES:  # a name, even where a folder of that name is at hand
                setattr(args, flag, absolute_local_path(value))
    return args


def size_defaults(args):
    """The defaults of --batch-size and --max-length, which depend on the model (align, memory and bench)."""
    tiny = args.model == "tiny"
    if args.batch_size is None:
        args.batch_size = 8 if tiny else 10
    if args.max_length is None:
        args.max_length = (BENCH_TINY_LENGTH if args.command == "bench" else 128) if tiny else 256


def _on_cpu(args) -> bool:
    import torch

    return (args.device or "").startswith("cpu") or (args.device is None and not torch.cuda.is_available())


def _align(args) -> int:
    from .align import run_align
    from .compute import flush_denormals

    with flush_denormals("cpu" if _on_cpu(args) else "cuda"):  # long CPU runs otherwise slow down 6-10x
        return run_align(args)


def _memory(args) -> int:
    from .run_args import apply_resume, check_common_args, check_run_args, config_from_args
    from .memory import for_args

    if args.resume is not None:  # the run's own flags, finished or not
        apply_resume(args, finished_ok=True)
    check_common_args(args)
    check_run_args(args, config_from_args(args, args.impl))  # align's checks: an estimate for a run align takes
    print(for_args(args))
    return 0


def _bench(args) -> int:
    from .compute import flush_denormals
    from .bench import run_bench

    with flush_denormals("cpu" if _on_cpu(args) else "cuda"):  # as align runs: the bench times align's step
        return run_bench(args)
