"""`booster-fast attack`: the harmful fine-tuning attack on an aligned run (the paper's fine-tuning stage).

The aligned model (a base model + its LoRA adapter) trains on with plain SFT + AdamW, on the LoRA the original
trains for the method it was aligned with (`--lora auto`): a Booster run keeps training its OWN LoRA (the
original's Booster scripts pass `--alternating single_lora`), an SFT run has its LoRA merged into the base and a
new LoRA of the same shape trained on top (the original's SFT and baseline scripts; `--lora continue|new`
chooses either for any run, and a plain peft adapter continues unless told). The training mix is the user's
benign task and harmful samples:
`n_harm = floor(p · samples)` harmful rows (as the original's int(); harmful prompt -> harmful answer) and
`samples − n_harm` benign rows, the first rows of each set in file order as the original takes them (`--rows
sample`: a sample of each drawn with the seed), shuffled with the seed. Defaults are the paper's attack setting:
1000 samples, p = 0.1, lr 1e-5, 20 epochs, batch 10, weight decay 0.1, clipping 1.0, constant lr.

--adapter takes a `booster-fast align` (or attack) run directory, whose run_config.json names the base model and
the settings, one of an align run's checkpoints (`RUN/checkpoints/step-000020`: the run's run_config.json applies), or
any peft LoRA adapter directory (`save_pretrained` of BoosterTrainer, the original code's output): the base is
then adapter_config.json's `base_model_name_or_path`, and the rest takes the defaults below (max length 256,
quant none, seed 43, a random-weight preset base built with load_model's default seed 0; harmful data builtin
on a preset base, else beavertails). `--base-model` (HF id, local directory or preset), `--quant` and
`--base-seed` (the init of a random-weight preset) override the base either way.

The harmful rows come from the safety data's ATTACK split by default, kept apart from the alignment rows as the
original keeps them: BeaverTails rows 1..4999 (the original's attack takes rows `0 < index < poison_num`; it
aligns on 5000..9999), or, for the built-in corpus, 2000 rows whose prompts are neither alignment (train) nor
held-out (test) prompts (distinct prompt strings; they share the corpus's category and activity templates with
the alignment prompts, where the test split's combinations are its own). `--harmful-split train` takes the
alignment's own rows instead (what this command did before). A local file has no attack split and is used
whole, which the log and run_config.json say (`harmful_split`, `harmful_source`, `harmful_disjoint_from_alignment`).

Every `--eval-every` steps (and before the first step and after the last) the token-mean loss of the HELD-OUT
harmful set (the safety data's test split: prompts never seen in training, with harmful answers; a local file has
no test split and is used whole, which the log and `heldout_is_train` in run_config.json say) is written to
metrics.jsonl:
the curve the paper's claim is about ("Booster slows the drop of the harmful loss under attack"). The output
is a run directory like align's: adapter, tokenizer, run_config.json, metrics.jsonl, written under a temporary
name and renamed when complete (an interrupted or failed attack leaves nothing). An update whose loss or gradient
is not finite is skipped on the device, counted in metrics.jsonl (`skipped`), and more than `--max-skipped` of
them, or 10 in a row, end the attack with exit code 3: a stalled attack would otherwise read as
a defence that held. Data difference from the original: its harmful rows are poison_num − 1 (an off-by-one of
its `<`: rows 1..99 at p = 0.1 of 1000), ours floor(p · samples) (rows 1..100).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from .adapters import DEFAULT_MAX_LENGTH, DEFAULT_SEED, add_base_args, config_int, default_harmful_data, \
    read_run_config, resolve_base

log = logging.getLogger("booster_fast")

HARMFUL_SPLITS = ("attack", "train")
LORA_MODES = ("auto", "continue", "new")
ROW_CHOICES = ("first", "sample")
MERGED_DIR = "merged"  # in a --lora new run: the adapters merged into its base, in order


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def add_parser(sub):
    from .cli import seed_value

    p = sub.add_parser("attack", help="harmful fine-tuning attack on an aligned run (benign task + poison)",
                       description=__doc__.splitlines()[0],
                       epilog="exit codes: 0 done; 1 the attacked adapter could not be written (one line); 2 bad "
                              "input (one line on stderr, nothing written); 3 more than --max-skipped non-finite "
                              "updates, or 10 in a row; 4 out of GPU memory (one line); 130 / 143 stopped by SIGINT "
                              "/ SIGTERM. Whatever stops it, --output gets the whole run or nothing")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="an aligned run directory (booster-fast align) or any peft LoRA adapter directory")
    add_base_args(p)
    p.add_argument("--lora", default="auto", choices=LORA_MODES,
                   help="continue: train the aligned LoRA on; new: merge it into the base and train a new LoRA of "
                        "its shape (the original's attack of its SFT baseline); auto (default): new for an SFT run, "
                        "continue otherwise")
    p.add_argument("--benign", default="builtin", help="builtin | sst2 | agnews | gsm8k | PATH (.json/.jsonl)")
    p.add_argument("--harmful", default=None,
                   help="harmful samples: builtin | beavertails | PATH (default: the aligned run's --data, an attack "
                        "run's own harmful rows; without run_config.json builtin on a preset base, else beavertails)")
    p.add_argument("--harmful-split", default="attack", choices=HARMFUL_SPLITS,
                   help="attack: rows kept apart from the alignment's (BeaverTails rows 1-4999 as the original; "
                        "built-in: prompts in neither train nor test); train: the alignment's own rows. A file is "
                        "used whole either way")
    p.add_argument("--rows", default="first", choices=ROW_CHOICES,
                   help="first (default): the first rows of the benign task's train split and of the harmful rows, "
                        "in file order, as the original takes them; sample: a sample of each drawn with --seed")
    p.add_argument("--poison-ratio", type=float, default=0.1, help="share of harmful samples p (paper: 0.1)")
    p.add_argument("--samples", type=int, default=1000, help="fine-tuning samples in all (paper: 1000)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help="passes over the samples (default 20, the paper's)")
    g.add_argument("--steps", type=int, default=None, help="number of updates instead of --epochs")
    p.add_argument("--batch-size", type=int, default=10, help="rows per update (paper: 10)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip to this global norm; 0 disables")
    p.add_argument("--max-skipped", type=int, default=None, metavar="N",
                   help="updates with a NaN/inf loss or gradient are skipped and counted; stop with exit code 3 "
                        "once more than N are (default 100), or 10 in a row")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per row (default: the aligned run's, else {DEFAULT_MAX_LENGTH} as the paper)")
    p.add_argument("--eval-every", type=int, default=10, metavar="N", help="held-out harmful loss every N steps")
    p.add_argument("--eval-rows", type=int, default=None, help="cap the held-out harmful rows (default: all)")
    p.add_argument("--refusal-prompts", type=int, default=0, metavar="K",
                   help="also log, at every eval, the share of the first K held-out harmful prompts whose greedy "
                        "answer does not refuse (the offline keyword proxy of `eval --judge refusal`); 0: off")
    p.add_argument("--refusal-max-new-tokens", type=int, default=32, help="answer length for --refusal-prompts")
    p.add_argument("--seed", type=seed_value, default=None,
                   help=f"data mix and order (default: the aligned run's seed, else {DEFAULT_SEED})")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--output", required=True, metavar="DIR", help="attacked run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    return p


def main(args) -> int:
    from .cli import run_reporting

    return run_reporting(run_attack, args)


def new_output_dir(path: str, overwrite: bool) -> Path:
    """A temporary directory beside `path`, after checking that `path` may receive a run (see `publish_dir`)."""
    from .cli import UsageError
    from .run_args import check_output

    check_output(path, overwrite, resumable=False)
    out = Path(path)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    except OSError as e:
        raise UsageError(f"cannot write --output {path}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def publish_dir(tmp: Path, out: Path):
    """Move the finished run into place, replacing an old one only once the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# the attack
# ------------------------------------------------------------------------------------------------------------
def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def poison_mix(benign: list, harmful: list, samples: int, ratio: float, seed: int, first: bool = False
               ) -> tuple[list, int]:
    """`samples` rows: floor(ratio·samples) harmful (as the original's int(); a hair of slack absorbs float error
    such as 0.29·100 = 28.999...) + the rest benign, each the first rows of its set in order (`first`, as the
    original takes them) or drawn without replacement with the seed, then shuffled together with the seed.
    Returns (rows, number of harmful rows)."""
    from .data import DataError

    n_harm = math.floor(ratio * samples + 1e-9)
    n_benign = samples - n_harm
    if n_benign > len(benign):
        raise DataError(f"the benign set has {_counted(len(benign), 'row')}; {n_benign} are needed "
                        f"(--samples {samples}, --poison-ratio {ratio})")
    if n_harm > len(harmful):
        raise DataError(f"the harmful set has {_counted(len(harmful), 'row')}; {n_harm} are needed "
                        f"(--samples {samples}, --poison-ratio {ratio})")
    rng = random.Random(f"booster_fast.attack:{seed}")
    if first:
        rows = list(benign[:n_benign]) + list(harmful[:n_harm])
    else:
        rows = rng.sample(list(benign), n_benign) + rng.sample(list(harmful), n_harm)
    rng.shuffle(rows)
    return rows, n_harm


def heldout_loss(model, batches: list[dict], device):
    """Token-mean loss over all held-out rows (one device scalar; summed per batch, divided once)."""
    import torch

    from .batches import to_device
    from .losses import label_count, loss_sum
    from .compute import Autocast

    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad(), Autocast(model, device)():
        for b in batches:
            b = to_device(b, device)
            total += loss_sum(model, b).float()
            count += label_count(b)
    model.train(was_training)
    return total / count.clamp(min=1)


def check_attack_args(args):
    """The attack's flags on their own (one-line UsageError); experiment checks them too, before its alignment."""
    from .cli import UsageError

    if not 0 <= args.poison_ratio <= 1:
        raise UsageError(f"--poison-ratio must lie in [0, 1], got {args.poison_ratio}")
    for flag in ("samples", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_size > args.samples:
        raise UsageError(f"--batch-size {args.batch_size} is larger than --samples {args.samples}")
    if not 0 < args.lr < math.inf:
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.epochs is not None and not 0 < args.epochs < math.inf:
        raise UsageError(f"--epochs must be a finite number > 0, got {args.epochs}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    if args.max_skipped is not None and args.max_skipped < 0:
        raise UsageError(f"--max-skipped must be >= 0, got {args.max_skipped}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.eval_rows is not None and args.eval_rows < 1:
        raise UsageError(f"--eval-rows must be >= 1, got {args.eval_rows}")
    if args.refusal_prompts < 0 or args.refusal_max_new_tokens < 1:
        raise UsageError("--refusal-prompts must be >= 0 and --refusal-max-new-tokens >= 1")
    if not 0 <= args.weight_decay < math.inf or not 0 <= args.max_grad_norm < math.inf:
        raise UsageError("--weight-decay and --max-grad-norm must be finite numbers >= 0")


def harmful_rows_source(src: str, split: str, harmful_file: str | None) -> tuple[str, str, bool]:
    """(split actually used, one-line description, disjoint from the alignment rows?) of the attack's harmful rows."""
    from .data import BEAVERTAILS_ROWS, BEAVERTAILS_REPO

    if harmful_file is not None or src not in ("builtin", "beavertails"):
        return ("whole file", f"{harmful_file or src}, used whole (a file has no attack split: its rows may be the "
                              "alignment's own)", False)
    if src == "builtin":
        if split == "attack":
            return split, "built-in corpus, attack split: prompts that are neither train nor test prompts", True
        return split, "built-in corpus, train split: the alignment's own prompts", False
    lo, hi = BEAVERTAILS_ROWS[split]
    if split == "attack":
        a_lo, a_hi = BEAVERTAILS_ROWS["train"]
        return split, (f"{BEAVERTAILS_REPO} rows {lo}-{hi - 1} (where the original's attack rows, "
                       f"0 < index < poison_num, lie), apart from the alignment rows {a_lo}-{a_hi - 1}"), True
    return split, f"{BEAVERTAILS_REPO} rows {lo}-{hi - 1}: the alignment's own rows", False


def lora_mode(asked: str, run_cfg: dict) -> str:
    """continue or new: `asked`, or for auto what the original's attack does after this run's alignment (a new LoRA
    on the merged model after SFT; Booster's own LoRA otherwise, and for an attack run or a plain adapter)."""
    if asked != "auto":
        return asked
    return "new" if run_cfg.get("command") != "attack" and run_cfg.get("method") == "sft" else "continue"


def fresh_lora(aligned, seed: int):
    """The aligned peft model with its LoRA merged into the base and a new LoRA of the same rank, alpha, targets
    and dropout on top, initialised from `seed`. An adapter with more to its shape than those (DoRA, rsLoRA,
    per-module ranks, a regex of targets) is refused: the new LoRA would not be of its kind."""
    import torch

    from .cli import UsageError
    from .lora import add_lora

    lcfg = aligned.peft_config[aligned.active_adapter]
    extra = [name for name, on in (("DoRA", getattr(lcfg, "use_dora", False)),
                                   ("rsLoRA", getattr(lcfg, "use_rslora", False)),
                                   ("per-module ranks", getattr(lcfg, "rank_pattern", None)),
                                   ("per-module alphas", getattr(lcfg, "alpha_pattern", None)),
                                   ("a regex of target modules", isinstance(lcfg.target_modules, str)
                                    and lcfg.target_modules != "all-linear")) if on]
    if extra:
        raise UsageError(f"attack --lora new: the adapter uses {', '.join(extra)}, which the new LoRA (rank, alpha, "
                         "targets, dropout) would not copy; pass --lora continue")
    targets = lcfg.target_modules if isinstance(lcfg.target_modules, str) else sorted(lcfg.target_modules)
    merged = aligned.merge_and_unload()
    torch.manual_seed(seed)
    return add_lora(merged, r=lcfg.r, alpha=lcfg.lora_alpha, targets=targets, dropout=lcfg.lora_dropout)


def keep_merged(adapter: str, base: dict, out: Path) -> dict:
    """Copy the adapters a `--lora new` attack merged into its base (the ones `adapter` merged before, then
    `adapter` itself) into out/merged/0, 1, ...: the attacked run rebuilds from its own directory, whatever
    happens to the aligned run later. Returns the base record naming them."""
    from .adapters import ADAPTER_WEIGHTS

    sources = [Path(adapter) / m for m in base.get("merged", [])] + [Path(adapter)]
    names = [f"{MERGED_DIR}/{i}" for i in range(len(sources))]
    for src, name in zip(sources, names):
        (out / name).mkdir(parents=True)
        for f in ("adapter_config.json", *ADAPTER_WEIGHTS):
            if (src / f).is_file():
                shutil.copyfile(src / f, out / name / f)
    return {**base, "merged": names}


def run_attack(args) -> int:
    from .cli import UsageError
    from .compute import flush_denormals
    from .run_args import check_output, resolve_device

    check_attack_args(args)
    check_output(args.output, args.overwrite, resumable=False,  # before minutes of loading; again when it is made
                 inputs={"--adapter": args.adapter, "--benign": args.benign, "--harmful": args.harmful})
    run_cfg = read_run_config(args.adapter)
    base, base_from = resolve_base(args, run_cfg)
    seed = config_int(run_cfg, "seed", DEFAULT_SEED) if args.seed is None else args.seed
    harmful_file = run_cfg.get("harmful_data") if args.harmful is None else None
    if args.harmful is None and run_cfg.get("command") == "attack":  # an attack run again: its own harmful rows
        args.harmful = run_cfg.get("harmful")
    harmful_src = args.harmful or run_cfg.get("data") or default_harmful_data(base["model"])
    max_length = args.max_length or config_int(run_cfg, "max_length", DEFAULT_MAX_LENGTH)
    if max_length < 1:
        raise UsageError(f"run_config.json: max_length must be >= 1, got {max_length}")
    device = resolve_device(args.device)
    with flush_denormals(device):
        return _attack(args, run_cfg, base, base_from, seed, harmful_src, harmful_file, max_length, device)


def _attack(args, run_cfg, base, base_from, seed, harmful_src, harmful_file, max_length, device) -> int:
    import torch
    from .progress import plain_line, progress_bar

    from . import Booster, BoosterConfig
    from .adapters import load_adapter
    from .align import SkipTally, metrics_line
    from .atomic import save_adapter, writes
    from .cli import NonFiniteAbort
    from .data import BatchStream, check_max_length, collate, encode_all, load_benign, load_harmful_file, \
        load_safety_data
    from .models import check_positions
    from .run_args import DEFAULT_MAX_SKIPPED

    # ---- data first (fails fast, before a model is loaded), then the model, then the output directory ----------
    benign = load_benign(args.benign, "train")
    harmful_split, harmful_source, disjoint = harmful_rows_source(harmful_src, args.harmful_split, harmful_file)
    if args.harmful not in (None, "builtin", "beavertails"):
        # --harmful names a file of harmful rows of either kind, used whole (a run's own instruction --data is its
        # alignment set, whose harmful rows were --harmful-data: load_safety_data below says so)
        harmful_pool = load_harmful_file(args.harmful)
        harmful_test = list(harmful_pool)
    else:
        _, harmful_pool = load_safety_data(harmful_src, args.harmful_split, harmful_data=harmful_file)
        _, harmful_test = load_safety_data(harmful_src, "test", harmful_data=harmful_file)
    # a file has no attack or test split: it is used whole (also as --harmful-data beside builtin or beavertails
    # prompts), for the attack's rows and for the 'held-out' loss alike
    heldout_is_train = harmful_split == "whole file"
    rows, n_harm = poison_mix(benign, harmful_pool, args.samples, args.poison_ratio, seed,
                              first=getattr(args, "rows", "first") == "first")
    probe = [(e.instruction, e.input) for e in harmful_test[: args.refusal_prompts]]
    if args.eval_rows is not None:
        harmful_test = harmful_test[: args.eval_rows]
    lora = lora_mode(getattr(args, "lora", "auto"), run_cfg)
    model, tok, _ = load_adapter(args.adapter, device, trainable=lora == "continue", base=base, cfg=run_cfg,
                                 trust_remote_code=getattr(args, "trust_remote_code", False))
    if lora == "new":
        model = fresh_lora(model, seed)
    check_max_length(tok, max_length)
    beyond = check_positions(model, max_length)
    if probe:  # its answers must fit a learned position table (GPT-2-like), checked before any step
        from .evaluate import check_answer_room

        check_answer_room(model, tok, [("--refusal-max-new-tokens", probe, args.refusal_max_new_tokens,
                                        "refusal-probe")])
    encoded, n_trunc = encode_all(tok, rows, max_length)
    test_enc, _ = encode_all(tok, harmful_test, max_length)
    stream = BatchStream(encoded, args.batch_size, max_length, tok.pad_token_id, seed)
    # held-out batches padded to their own longest row, not to max_length: no loss is taken on pads
    test_batches = [collate(chunk, max(len(r["input_ids"]) for r in chunk), tok.pad_token_id)
                    for chunk in (test_enc[i:i + 50] for i in range(0, len(test_enc), 50))]
    steps = args.steps if args.steps is not None else max(1, math.ceil((args.epochs or 20) * stream.batches_per_epoch))
    cfg = BoosterConfig(lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    booster = Booster(model, cfg)  # plain SFT steps (sft_step): AdamW, clipping, no Booster term
    booster.check_length(max_length)
    if beyond:  # (said once every input has been checked: an error is then the only line)
        log.warning(beyond)
    if heldout_is_train:
        log.warning("attack: %s is used whole: the attack trains on its rows, which may be the alignment's own (a "
                    "file has no attack split), and the 'held-out' harmful loss is measured on them too (the "
                    "built-in and BeaverTails sets have both splits)", harmful_file or harmful_src)
    else:
        log.info("attack: harmful rows from %s", harmful_source)
    log.info("attack: %s", "a new LoRA on the aligned model, its own LoRA merged into the base (--lora new)"
             if lora == "new" else "the aligned LoRA trains on (--lora continue)")
    out = Path(args.output)
    tmp = new_output_dir(args.output, args.overwrite)
    ok = False
    try:
        if lora == "new":
            base = keep_merged(args.adapter, base, tmp)
        config = {"command": "attack", "adapter": str(Path(args.adapter).absolute()), "base": base,
                  "base_from": base_from, "aligned_with": run_cfg.get("method") or run_cfg.get("aligned_with"),
                  "attacked_before": run_cfg.get("command") == "attack", "lora": lora, "benign": args.benign,
                  "harmful": harmful_src,
                  "harmful_data": harmful_file, "harmful_split": harmful_split, "harmful_source": harmful_source,
                  "harmful_disjoint_from_alignment": disjoint, "rows": getattr(args, "rows", "first"),
                  "poison_ratio": args.poison_ratio,
                  "samples": args.samples,
                  "n_harmful": n_harm, "n_benign": args.samples - n_harm, "lr": args.lr, "epochs": args.epochs,
                  "steps": steps, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
                  "max_grad_norm": args.max_grad_norm, "max_length": max_length, "seed": seed,
                  "eval_every": args.eval_every, "eval_rows": len(test_enc), "truncated_rows": n_trunc,
                  "heldout_is_train": heldout_is_train,
                  "refusal_prompts": len(probe), "refusal_max_new_tokens": args.refusal_max_new_tokens,
                  "device": str(device), "model": base["model"], "quant": base["quant"]}
        (tmp / "run_config.json").write_text(json.dumps(config, indent=2) + "\n")
        log.info("attack: %s on %s, %s of %d rows (%d harmful of %d samples), lr %g; held-out harmful "
                 "loss over %d rows every %d steps", args.adapter, device, _counted(steps, "step"), args.batch_size,
                 n_harm, args.samples, args.lr, len(test_enc), args.eval_every)
        max_skipped = DEFAULT_MAX_SKIPPED if args.max_skipped is None else args.max_skipped
        skips = SkipTally()
        with open(tmp / "metrics.jsonl", "w") as metrics:
            def record(step, pending, t_last):
                """Write one metrics line: the held-out harmful loss now and the mean training loss, step time
                and skipped updates since the last one; stop (exit 3) past --max-skipped."""
                # .tolist() is a host sync, once per eval interval: the step time is taken after it
                trained = torch.stack(pending).tolist() if pending else []
                dt = (time.perf_counter() - t_last) / len(trained) if trained else None
                h = heldout_loss(model, test_batches, device).item()  # host sync: the held-out loss, once
                losses = [loss for loss, skip in trained if not skip]
                rec = {"step": step, "harmful_loss": h,
                       "train_loss": sum(losses) / len(losses) if losses else None, "step_time_s": dt,
                       "skipped": sum(round(skip) for _, skip in trained)}
                skips.add(skip for _, skip in trained)
                if probe:  # keyword proxy of the harmful score along the attack (greedy answers, no refusal phrase)
                    from .evaluate import generate
                    from .judges import RefusalJudge

                    answers = generate(model, tok, probe, args.refusal_max_new_tokens, 64, device, desc=None)
                    flags = RefusalJudge().flags([q for q, _ in probe], answers)
                    rec["keyword_harmful_score"] = 100.0 * sum(flags) / len(flags)
                metrics.write(metrics_line(rec))
                metrics.flush()
                why = skips.too_many(steps, max_skipped)
                if why:
                    raise NonFiniteAbort(f"{skips.total} attack updates skipped by step {step} because the loss "
                                         f"or gradient was NaN/inf ({why}; a smaller --lr?); nothing was saved")
                return rec

            rec = record(0, [], None)
            pending, t_last = [], time.perf_counter()
            with progress_bar(steps, "attack") as bar:  # closed before an error's line
                for step in range(1, steps + 1):
                    out_t = booster.sft_step(booster.to_device(next(stream), device))
                    pending.append(torch.stack([out_t["loss"].detach().float(), out_t["skipped"].float()]))
                    if step % args.eval_every == 0 or step == steps:
                        rec = record(step, pending, t_last)
                        post = {"loss": "-" if rec["train_loss"] is None else f"{rec['train_loss']:.3f}",
                                "held-out harmful": f"{rec['harmful_loss']:.3f}",
                                **({"skipped": skips.total} if skips.total else {})}
                        bar.set_postfix(post, refresh=False)  # (a dict keeps its order; the update draws it)
                        bar.update(len(pending))
                        if bar.disable:  # stderr kept in a file: a plain line per interval instead of the bar
                            per_step = (time.perf_counter() - t_last) / len(pending)  # (the held-out loss too)
                            log.info(plain_line("attack", step, steps, post, per_step))
                        pending, t_last = [], time.perf_counter()
        with writes(f"the attacked adapter to {out}"):  # a full disk after the whole attack: one line
            save_adapter(model, tmp, tok)
            publish_dir(tmp, out)
        ok = True
        log.info("saved the attacked adapter and metrics to %s (held-out harmful loss %.4f at step %d)",
                 out, rec["harmful_loss"], steps)
        if skips.total:
            log.warning("attack: %d of %d updates were skipped as non-finite (metrics.jsonl: skipped); a smaller "
                        "--lr?", skips.total, steps)
        return 0
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
