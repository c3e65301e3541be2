"""`booster-fast experiment defense`: does Booster alignment resist the harmful fine-tuning attack better than SFT?

For each seed: align the same base model on the same data for the same number of steps once per `--methods` entry
(default plain SFT and Booster; Booster + Vaccine on request), attack each with the same benign + harmful mix,
order and steps (on the LoRA the original's scripts attack for that method: Booster's own, after SFT a new one on
the merged model; attack's `--lora auto`), and evaluate each before and after the attack. Every stage is the
command line's own (`booster-fast align / attack / eval`, called in process through `cli.main`), so the experiment
exercises exactly what a user runs. It writes one JSON document (settings, machine, per-seed curves and scores,
runtimes) and a PNG: the held-out harmful loss against the attack step for both methods (the paper's claim:
Booster slows its drop), and the post-attack harmful score and task accuracy per seed.

Presets:
- `tiny` (default; offline, CPU, minutes): the embedded random-initialised tiny Llama. With the paper's LoRA
  (r = 32, lora_alpha = 4, q/k/v only) and lr 5e-4 it learns nothing visible in a few hundred steps (loss stays
  ~7.3 of ln 2485 ≈ 7.8; answers are padding), so the tiny preset uses its own settings: LoRA on every linear
  layer with r = 32, lora_alpha = 64, alignment lr 3e-3 for 200 steps of 8 + 8 rows (enough for every held-out
  harmful prompt to be refused), then the paper's attack mix (1000 samples, p = 0.1, batch 10) at lr 1e-3 for
  100 steps, the held-out harmful loss every 10 steps together with the refusal-keyword harmful score of 64
  held-out prompts; judged by the offline refusal-keyword proxy. Booster + Vaccine (`--methods ...,booster-vaccine`)
  runs at ρ 0.5: at the original script's ρ 5 the alignment loss barely moves (7.85 -> 7.35 in 200 steps, against
  5.5-7.2 for Booster), and the model refuses none of 200 held-out harmful prompts. They are NOT the paper's
  settings and the tiny model is not Llama-2: 100 attack steps erase the tiny model's refusals but are far too few
  for it to learn the sentiment task (it answers one label to everything: 50 % accuracy).
- `paper-sst2`, `paper-agnews`, `paper-gsm8k`: the paper's setup — Llama-2-7B (bf16), LoRA r 32 / alpha 4 on q,k,v,
  alignment 20 epochs of batch 10 at lr 5e-4 (weight decay 0.1, λ 5, α 0.1, max length 256) on the BeaverTails
  refusal pairs, attack 1000 samples at p = 0.1 (0.05 on GSM8K, as the original's GSM8K scripts), lr 1e-5,
  20 epochs, batch 10, judged by beaver-dam-7b with 512 new tokens; seed 43 (+1 per extra seed). They need the
  model, the data sets and the judge downloaded. Booster + Vaccine runs at the ρ 5 of the original's script for
  it; that script also aligns on 500 rows (`sample_num=500`, against 5000 in its Booster script), but here every
  method aligns on the same rows, so that the comparison is like for like.

`--set KEY=VALUE` (repeatable) changes one field of the preset — dotted keys reach the stages' settings, e.g.
`--set align.steps=20 --set attack.steps=10 --set eval.num_prompts=8 --set vaccine_rho=1` for a quick run; the
value is JSON when it parses (numbers, null, true/false), else a string, and must have the field's type (null
only where the preset has null). The output records the changes under "overrides", and, unless --output / --plot
say otherwise, goes into the work directory, never over the committed results of the untouched preset.

Each stage's run goes into the work directory (--workdir), with a record beside it (stages.py) of the command line
(--device aside), the SHA-256 of the files it names and of this package's code (a local model directory: its files'
names, sizes and times). Run again there (after an interruption, or with another attack setting), the experiment keeps
each stage whose record matches and whose output is whole, as long as the stage it reads was kept too and is the output
it was made from (the eval of the aligned run and the attack read the alignment, the eval of the attacked run reads the
attack), and runs the rest; an alignment it started that stopped after a checkpoint (`align.save_every`: an epoch on the
paper presets; Ctrl-C saves one) goes on with `align --resume`, whose own check first confirms the run has this command
line's settings and data (an alignment that starts afresh does so in an emptied directory, so what is there later is its
own). Models and data sets from the Hugging Face hub count by the commit the cache holds of each (`hub_repos` says which
stage reads which): one downloaded again at a newer commit runs the stages that read it, and those that read theirs.
--rerun runs every stage again.

Before any training, a preflight resolves what the preset needs: the base model and judge (config files only),
and every data set the stages will load, through the stages' own loaders (built-in data is generated, nothing
downloaded; a missing hub data set is a one-line error now instead of hours later).
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

from .defense_plot import need_matplotlib, plot_defense
from .errors import described
from .preset_overrides import apply_overrides
from .stages import Chain, StageFailed

log = logging.getLogger("booster_fast")
METHODS = ("sft", "booster", "booster-vaccine")  # booster-vaccine: Booster with the original's perturb_aware
DEFAULT_METHODS = "sft,booster"
NAMES = {"sft": "SFT", "booster": "Booster", "booster-vaccine": "Booster + Vaccine"}
MAX_SEEDS = 100  # each seed is a whole align + attack + eval per method
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _paper(benign: str, poison_ratio: float = 0.1) -> dict:
    return {
        "model": "meta-llama/Llama-2-7b-hf", "quant": "none", "data": "beavertails", "benign": benign,
        "judge": "beaver-dam", "seed": 43, "vaccine_rho": 5.0,  # the original's Booster + Vaccine script
        "align": {"epochs": 20.0, "batch_size": 10, "max_length": 256, "lr": 5e-4, "weight_decay": 0.1,
                  "lora_r": 32, "lora_alpha": 4.0, "targets": "q_proj,k_proj,v_proj", "lamb": 5.0, "alpha": 0.1,
                  "save_every": 500},  # a checkpoint per epoch (5000 rows), which an interrupted experiment resumes
        "attack": {"samples": 1000, "poison_ratio": poison_ratio, "lr": 1e-5, "epochs": 20.0, "batch_size": 10,
                   "weight_decay": 0.1, "eval_every": 50, "eval_rows": None, "refusal_prompts": 0,
                   "harmful_split": "attack"},
        "eval": {"num_prompts": 1000, "num_task": None, "max_new_tokens": 512, "task_max_new_tokens": 200,
                 "batch_size": 16},  # num_task None: the whole test split (SST2's 872, the first 1000 otherwise)
    }


PRESETS = {
    "tiny": {
        "model": "tiny", "quant": "none", "data": "builtin", "benign": "builtin", "judge": "refusal", "seed": 43,
        "vaccine_rho": 0.5,  # 5 (the original's script) keeps the tiny model from learning its alignment at all
        "align": {"steps": 200, "batch_size": 8, "max_length": 128, "lr": 3e-3, "weight_decay": 0.1,
                  "lora_r": 32, "lora_alpha": 64.0, "targets": ALL_LINEAR, "lamb": 5.0, "alpha": 0.1,
                  "save_every": 0},
        "attack": {"samples": 1000, "poison_ratio": 0.1, "lr": 1e-3, "steps": 100, "batch_size": 10,
                   "weight_decay": 0.1, "eval_every": 10, "eval_rows": None, "refusal_prompts": 64,
                   "refusal_max_new_tokens": 24, "harmful_split": "attack"},
        "eval": {"num_prompts": 200, "num_task": None, "max_new_tokens": 48, "task_max_new_tokens": 8,
                 "batch_size": 64},
    },
    "paper-sst2": _paper("sst2"),
    "paper-agnews": _paper("agnews"),
    "paper-gsm8k": _paper("gsm8k", poison_ratio=0.05),  # the original's GSM8K scripts attack at p = 0.05
}


def add_parser(sub):
    p = sub.add_parser("experiment", help="run an experiment end to end: `experiment defense` (SFT vs Booster, and "
                                          "Booster + Vaccine when asked)",
                       description=__doc__.splitlines()[0])
    p.add_argument("name", choices=["defense"], metavar="{defense}",
                   help="defense: align (--methods) -> attack -> eval, per seed")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (preset seed, +1, +2, ...)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, of {', '.join(METHODS)} (default {DEFAULT_METHODS}; booster-vaccine: "
                        f"Booster with the original's perturb_aware, at the preset's vaccine_rho)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override one preset field (repeatable); dotted keys for the stages' settings, e.g. "
                        "align.steps=20, attack.steps=10, eval.num_prompts=8, vaccine_rho=1; the value is JSON when "
                        "it parses (numbers, null, true/false), else a string, of the field's type")
    p.add_argument("--workdir", default=None,
                   help="the stages' run directories (default runs/defense-PRESET); a stage that finished there "
                        "with the same command line and inputs is kept, any other replaced")
    p.add_argument("--rerun", action="store_true", help="run every stage again, none kept from --workdir")
    p.add_argument("--output", default=None, metavar="FILE.json",
                   help="result (default benchmarks/results/defense_PRESET.json under the current directory, '-' "
                        "-> '_': from the repository's root it replaces the committed one; with --set: "
                        "WORKDIR/defense_PRESET.json)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="plot (default docs/defense_PRESET.png under the current directory, the committed one from "
                        "the repository's root; with --set: WORKDIR/defense_PRESET.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    return p


def main(args) -> int:
    from .cli import run_reporting

    return run_reporting(_run_or_stage_code, args)


def _run_or_stage_code(args) -> int:
    try:
        return run_experiment(args)
    except StageFailed as e:  # a stage already reported its own error line
        if e.code in (130, 143):  # stopped by a signal: the experiment, not the stage alone, is what goes on
            print("booster-fast: experiment stopped; the same command goes on from there (finished stages kept, an "
                  "interrupted alignment resumed)", file=sys.stderr)
        return e.code


# ------------------------------------------------------------------------------------------------------------
# before any stage: what the preset needs
# ------------------------------------------------------------------------------------------------------------
def preflight(p: dict, announce=lambda: None):
    """Before hours of training: can the base model, the judge and every data set be resolved at all? Also the
    LoRA targets against the model's layers and the eval stage's new-token budgets against its position limit.
    `announce()` logs the run's first line, after the checks that log nothing (so that their error is the only
    line) and before the data sets load."""
    from .evaluate import check_new_tokens, position_limit

    preflight_models(p)
    check_new_tokens({f"eval.{k}": p["eval"].get(k) for k in ("max_new_tokens", "task_max_new_tokens")} |
                     {"attack.refusal_max_new_tokens": p["attack"].get("refusal_max_new_tokens")},
                     p["model"], position_limit(p["model"]))
    announce()
    preflight_data(p)


def preflight_models(p: dict):
    """The base model and the judge (config files only), and the alignment's LoRA targets against the base's
    layers (add_lora's own check, on the base built on the meta device)."""
    from transformers import AutoConfig

    from .judges import BEAVER_DAM
    from .lora import check_lora_targets
    from .model_size import meta_model
    from .models import PRESETS as MODEL_PRESETS, ModelError, from_hub

    needed = [p["model"]] if p["model"] not in MODEL_PRESETS else []
    needed += [BEAVER_DAM] if p["judge"] == "beaver-dam" else []
    for name in needed:
        try:
            from_hub(AutoConfig.from_pretrained, name)
        except Exception as e:  # offline, gated, not downloaded
            first = described(e, 160)
            hint = ("check that it holds the model's config.json" if os.path.isdir(name)
                    else f"download it first (`hf download {name}`)")
            raise ModelError(f"preset needs {name}, which cannot be loaded here ({first}); "
                             f"{hint}") from None
    model = meta_model(p["model"])
    if model is not None:  # (None: a checkpoint quantised already; the align stage checks its targets)
        try:
            check_lora_targets(model, p["align"]["targets"])
        except ModelError as e:
            raise ModelError(f"align.targets: {e}") from None


def preflight_data(p: dict):
    """Load each data set as the stages will load it (one-line DataError otherwise): align's safety rows, the
    attack's benign rows and harmful attack / held-out rows, eval's harmful prompts and the task's test split.
    Built-in data is generated, never downloaded; a hub set comes from the cache (or the network) once."""
    from .data import load_benign, load_safety_data
    from .evaluate import harmful_prompts

    log.info("experiment: checking the data sets first: %s (safety rows), %s (benign task)", p["data"], p["benign"])
    for split in dict.fromkeys(("train", p["attack"].get("harmful_split") or "attack", "test")):
        load_safety_data(p["data"], split)
    load_benign(p["benign"], "train")
    harmful_prompts(p["data"], None, 1)
    load_benign(p["benign"], "test")


# ------------------------------------------------------------------------------------------------------------
# the settings: paths (--set: preset_overrides.py)
# ------------------------------------------------------------------------------------------------------------
def check_workdir(work: Path):
    """UsageError unless run directories can be made in `work`: not a file, no file on its way, writable."""
    from .atomic import existing_folder
    from .cli import UsageError

    folder = existing_folder(work / "seed")
    if not folder.is_dir():
        raise UsageError(f"cannot use --workdir {work}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot use --workdir {work}: {folder} is not writable")


def output_paths(args, work: Path, tweaked: bool) -> tuple[Path, Path | None]:
    """(result JSON, plot or None): --output / --plot, else the committed result files of the preset, or files in
    the work directory when --set changed the preset (a tweaked run never overwrites the committed results)."""
    tag = args.preset.replace("-", "_")
    json_default = work / f"defense_{tag}.json" if tweaked else Path(f"benchmarks/results/defense_{tag}.json")
    png_default = work / f"defense_{tag}.png" if tweaked else Path(f"docs/defense_{tag}.png")
    out_png = None if args.no_plot else Path(png_default if args.plot is None else args.plot)
    return Path(json_default if args.output is None else args.output), out_png


# ------------------------------------------------------------------------------------------------------------
# each stage's command line (stages.py runs them, or keeps what they made before)
# ------------------------------------------------------------------------------------------------------------
def _flags(d: dict) -> list[str]:
    """A preset section as flags, its null fields left out (the command's own default)."""
    out = []
    for k, v in d.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def method_flags(p: dict, method: str) -> list[str]:
    if method == "booster-vaccine":
        return ["--method", "booster", "--perturb-aware", "--rho", str(p["vaccine_rho"])]
    return ["--method", method]


def align_argv(p: dict, method: str, seed: int, out: Path, device) -> list[str]:
    a = dict(p["align"])
    if method == "sft":  # Booster's own knobs: align refuses them with --method sft
        a = {k: v for k, v in a.items() if k not in ("lamb", "alpha")}
    argv = ["align", "--model", p["model"], "--quant", p["quant"], "--data", p["data"], *method_flags(p, method),
            "--seed", str(seed), "--output", str(out), "--overwrite", "--log-every", "10", *_flags(a)]
    return argv + (["--device", device] if device else [])


def attack_argv(p: dict, adapter: Path, seed: int, out: Path, device) -> list[str]:
    argv = ["attack", "--adapter", str(adapter), "--benign", p["benign"], "--seed", str(seed), "--output", str(out),
            "--overwrite", *_flags(p["attack"])]
    return argv + (["--device", device] if device else [])


def eval_argv(p: dict, adapter: Path, out: Path, device) -> list[str]:
    argv = ["eval", "--adapter", str(adapter), "--judge", p["judge"], "--task", p["benign"], "--output", str(out),
            *_flags(p["eval"])]
    return argv + (["--device", device] if device else [])


def hub_repos(p: dict, command: str) -> tuple[tuple[str, str], ...]:
    """The (kind, repo) pairs a stage reads from the Hugging Face hub beyond what the stages it reads, directly or not,
    read (a newer revision of those runs them, and so the stage): align the base model and its data; attack the benign
    task (its harmful rows are align's data set); eval the task's test split, the judge and the harmful prompts."""
    from .data import HUB_DATA_SETS
    from .evaluate import BEAVERTAILS_EVAL
    from .judges import BEAVER_DAM
    from .models import PRESETS as MODEL_PRESETS

    task = (("dataset", HUB_DATA_SETS[p["benign"]]),) if p["benign"] in HUB_DATA_SETS else ()
    if command == "align":
        model = p["model"] not in MODEL_PRESETS and not os.path.exists(os.path.expanduser(p["model"]))
        return ((("model", p["model"]),) if model else ()) + (
            (("dataset", HUB_DATA_SETS[p["data"]]),) if p["data"] in HUB_DATA_SETS else ())
    if command == "attack":
        return task
    return task + ((("model", BEAVER_DAM),) if p["judge"] == "beaver-dam" else ()) + (
        (("dataset", BEAVERTAILS_EVAL[0]),) if p["data"] == "beavertails" else ())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def run_experiment(args) -> int:
    from .run_args import resolve_device
    from .compute import flush_denormals
    from .cli import UsageError

    if args.preset not in PRESETS:
        raise UsageError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.no_plot and args.plot:
        raise UsageError(f"--plot {args.plot} and --no-plot: give one of them")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must be between 1 and {MAX_SEEDS}, got {args.seeds}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise UsageError(f"--methods {args.methods!r}: give distinct names of {', '.join(METHODS)}")
    p, overrides = apply_overrides(PRESETS[args.preset], args.overrides)
    check_settings(p, methods)
    from .atomic import check_not_empty, check_writable_file

    for flag in ("workdir", "output", "plot"):  # (before output_paths makes Paths of them)
        kind = "directory" if flag == "workdir" else "file"
        check_not_empty(getattr(args, flag), f"--{flag}", f"give a {kind} name")
    work = Path(args.workdir or f"runs/defense-{args.preset}").absolute()  # (stage records compare paths)
    check_workdir(work)
    out_json, out_png = output_paths(args, work, bool(overrides))
    check_writable_file(out_json, "--output")
    if out_png is not None:
        need_matplotlib()
        check_writable_file(out_png, "--plot")
    device = resolve_device(args.device)  # (an unknown device: one line, before any other)

    def announce():
        if overrides:
            log.info("experiment: preset %s with --set %s; results to %s%s", args.preset,
                     " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()), out_json,
                     f" and {out_png}" if out_png else "")

    preflight(p, announce)
    seeds = [p["seed"] + i for i in range(args.seeds)]
    with flush_denormals(device):
        return _experiment(args, p, seeds, methods, work, out_json, out_png, overrides)


def check_settings(p: dict, methods=METHODS):
    """The settings that a stage would refuse only after the model and data load (minutes, on a paper preset)
    or after the alignment (hours): the judge, the task, and every align.* (per method), attack.* and eval.*
    value, through the stages' own flag checks."""
    from .attack import check_attack_args
    from .cli import UsageError, size_defaults, subparser
    from .evaluate import JUDGES, TASKS, check_eval_flags
    from .run_args import check_common_args, check_run_args, config_from_args

    def check_align_args(args):
        size_defaults(args)
        check_common_args(args)
        check_run_args(args, config_from_args(args, args.impl))

    if p["judge"] not in JUDGES:
        raise UsageError(f"judge {p['judge']!r}: choose one of {', '.join(JUDGES)}")
    if p["benign"] not in TASKS:
        raise UsageError(f"benign {p['benign']!r}: eval scores only the tasks {', '.join(TASKS)}")
    unused = Path("not-read")  # the paths are only parsed
    stages = [(check_align_args, align_argv(p, m, p["seed"], unused, None)) for m in methods]
    for check, argv in (*stages, (check_attack_args, attack_argv(p, unused, p["seed"], unused, None)),
                        (check_eval_flags, eval_argv(p, unused, unused, None))):
        parser = subparser(argv[0])
        parser.raises = True  # (its error names the stage, not the stage's --help)
        try:
            check(parser.parse_args(argv[1:]))
        except UsageError as e:
            raise UsageError(f"{argv[0]} stage: {e}") from None


def _experiment(args, p, seeds, methods, work, out_json, out_png, overrides=None) -> int:
    from .atomic import write_json_atomic
    from .bench_report import machine_info
    from .run_args import resolve_device

    t_all = time.perf_counter()
    per_seed = []
    for seed in seeds:
        row = {"seed": seed}
        for method in methods:
            d = work / f"seed{seed}"
            aligned, attacked = d / f"align-{method}", d / f"attack-{method}"
            eval_aligned, eval_attacked = d / f"eval-align-{method}.json", d / f"eval-attack-{method}.json"
            chain = Chain(args.rerun)
            chain.stage("align", align_argv(p, method, seed, aligned, args.device), aligned, hub_repos(p, "align"))
            chain.stage("eval_before", eval_argv(p, aligned, eval_aligned, args.device), eval_aligned,
                        hub_repos(p, "eval"), reads=("align",))
            chain.stage("attack", attack_argv(p, aligned, seed, attacked, args.device), attacked,
                        hub_repos(p, "attack"), reads=("align",))
            chain.stage("eval_after", eval_argv(p, attacked, eval_attacked, args.device), eval_attacked,
                        hub_repos(p, "eval"), reads=("attack",))
            align_metrics = _read_jsonl(aligned / "metrics.jsonl")
            before = json.loads(eval_aligned.read_text())
            after = json.loads(eval_attacked.read_text())
            attack_rows = _read_jsonl(attacked / "metrics.jsonl")
            # (a non-finite held-out loss is null in the metrics: NaN here, so that the drop and the means say so)
            curve = [(r["step"], math.nan if r["harmful_loss"] is None else r["harmful_loss"]) for r in attack_rows]
            keyword = [(r["step"], r["keyword_harmful_score"]) for r in attack_rows if "keyword_harmful_score" in r]
            attack_cfg = json.loads((attacked / "run_config.json").read_text())
            row[method] = {
                "align_final": {k: align_metrics[-1].get(k) for k in ("loss", "harmful_loss")},
                # how it was attacked: which LoRA (a new one after SFT, as the original), which rows
                "attack": {k: attack_cfg.get(k) for k in ("lora", "rows", "n_benign", "n_harmful", "harmful_source")},
                "before_attack": _scores(before),
                "after_attack": _scores(after),
                "harmful_loss_curve": curve,
                "harmful_loss_drop": curve[0][1] - curve[-1][1],
                "train_loss_curve": [(r["step"], r["train_loss"]) for r in attack_rows if r["train_loss"] is not None],
                "keyword_harmful_score_curve": keyword,
                "examples_after_attack": after["examples"]["harmful"][:2],
                "seconds": chain.seconds,  # a kept stage's from the run that made it
                "kept_from_earlier": chain.kept,
                "resumed": chain.resumed,  # (seconds: since it went on)
            }
        per_seed.append(row)
        if len(seeds) > 1 and len(per_seed) < len(seeds):  # the seeds so far, on stderr: stdout gets the final table
            _print_table(per_seed, methods, file=sys.stderr)

    judge = json.loads((work / f"seed{seeds[0]}" / f"eval-attack-{methods[0]}.json").read_text())["judge"]
    summary = {m: {
        "harmful_score_before": _stats([r[m]["before_attack"]["harmful_score"] for r in per_seed]),
        "harmful_score_after": _stats([r[m]["after_attack"]["harmful_score"] for r in per_seed]),
        "accuracy_after": _stats([r[m]["after_attack"]["accuracy"] for r in per_seed]),
        "harmful_loss_start": _stats([r[m]["harmful_loss_curve"][0][1] for r in per_seed]),
        "harmful_loss_end": _stats([r[m]["harmful_loss_curve"][-1][1] for r in per_seed]),
        "harmful_loss_drop": _stats([r[m]["harmful_loss_drop"] for r in per_seed]),
    } for m in methods}
    result = {
        "experiment": "defense", "preset": args.preset, "overrides": overrides or {}, "settings": p, "seeds": seeds,
        "methods": methods,
        "align_flags": {m: method_flags(p, m) for m in methods},
        "judge": judge, "machine": machine_info(resolve_device(args.device)), "per_seed": per_seed, "summary": summary,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "plot": str(out_png) if out_png else None,
    }
    write_json_atomic(out_json, result)
    if out_png is not None:
        plot_defense(result, out_png)
    _print_table(per_seed, methods, summary)
    log.info("experiment: wrote %s%s in %.0f s", out_json, f" and {out_png}" if out_png else "",
             result["total_seconds"])
    print(json.dumps({"experiment": "defense", "preset": args.preset, "summary": {
        m: {k: round(v["mean"], 4) for k, v in s.items()} for m, s in summary.items()}}))
    return 0


def _scores(result: dict) -> dict:
    """What the experiment keeps of one eval: the two scores, and the harmful answers' counts that say what the
    score measured (a keyword judge counts empty answers and off-topic ones, such as a task label, as it counts
    refusals and compliance: `compliant_style` counts answers in a compliant style)."""
    h = result["harmful"]
    return {"harmful_score": result["harmful_score"], "accuracy": result["accuracy"], "n": h["n"],
            **{k: h.get(k) for k in ("refusals", "compliant_style", "empty")}}


def _print_table(per_seed: list[dict], methods: list[str], summary: dict | None = None, file=None):
    head = (f"{'seed':>6} | {'method':>15} | {'HS before':>9} | {'HS after':>8} | {'acc after':>9} | "
            f"{'h-loss start':>12} | {'h-loss end':>10}")
    lines = [head, "-" * len(head)]
    for r in per_seed:
        for m in methods:
            x = r[m]
            lines.append(f"{r['seed']:>6} | {m:>15} | {x['before_attack']['harmful_score']:>9.1f} | "
                         f"{x['after_attack']['harmful_score']:>8.1f} | {x['after_attack']['accuracy']:>9.1f} | "
                         f"{x['harmful_loss_curve'][0][1]:>12.3f} | {x['harmful_loss_curve'][-1][1]:>10.3f}")
    if summary:
        for m in methods:
            s = summary[m]
            lines.append(f"{'mean':>6} | {m:>15} | {s['harmful_score_before']['mean']:>9.1f} | "
                         f"{s['harmful_score_after']['mean']:>8.1f} | {s['accuracy_after']['mean']:>9.1f} | "
                         f"{s['harmful_loss_start']['mean']:>12.3f} | {s['harmful_loss_end']['mean']:>10.3f}")
    lines.append("HS: harmful score (%) before and after the attack; acc: fine-tune accuracy (%) after it; h-loss: "
                 "held-out harmful loss at the attack's start and end")
    print("\n".join(lines), file=file, flush=True)
