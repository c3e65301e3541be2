"""The bench's entries: their names (`--impls`), the BoosterConfig each one runs, the fast-engine flags each one
follows or pins, and the SFT step each Booster entry is measured against (bench.py's docstring describes them)."""
from __future__ import annotations

import dataclasses

from .cli import UsageError
from .run_args import config_from_args

IMPLS = ("reference", "fast", "fast-merged", "fast-unmerged", "fast-graphs", "fast-padded", "fast-unfused", "sft",
         "fast-sft")


def parse_impls(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in IMPLS]
    if not names or bad:
        raise UsageError(f"--impls: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                         f"choose from {', '.join(IMPLS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--impls lists an implementation twice: {text}")
    return names


PINNED = {"fast-merged": dict(merge_passes=True, graphs="off"), "fast-unmerged": dict(merge_passes=False, graphs="off"),
          "fast-graphs": dict(graphs="on"), "fast-padded": dict(packing=False), "fast-unfused": dict(fused_ops=False)}
ONE_PASS = ("fast-sft",)  # an SFT step has no passes to merge: --merge-passes is not followed there
KNOBS = ("merge_passes", "packing", "fused_ops", "graphs")  # the fast engine's flags, which entries follow or pin


def impl_config(name: str, args):
    """BoosterConfig of one entry. sft runs the reference engine's plain step (torch AdamW, per-tensor clipping),
    fast-sft the fast engine's with fast's settings; fast-merged/-unmerged pin the merge and stay eager; fast-padded
    pins packing off; fast-unfused the fused model ops (PINNED); fast follows --merge-passes, --packing, --fused-ops
    and --graphs."""
    cfg = config_from_args(args, "reference" if name in ("reference", "sft") else "fast")  # fast-sft: fast
    return dataclasses.replace(cfg, **PINNED.get(name, {}))


def check_knobs_followed(names: list[str], args) -> None:
    """UsageError for a fast-engine flag given (not auto) that no listed entry follows: the reference entries
    run the original step, and an entry that pins the flag ignores it."""
    original = [n for n in names if n in ("reference", "sft")]
    for knob in KNOBS:
        value = getattr(args, knob, "auto")
        pinning = [n for n in names if knob in PINNED.get(n, {})]
        one_pass = [n for n in names if knob == "merge_passes" and n in ONE_PASS]
        if value == "auto" or set(names) - set(original + pinning + one_pass):  # an entry follows it
            continue
        why = [f"{' and '.join(original)} {'run' if len(original) > 1 else 'runs'} the original trainer's step"
               if original else "",
               f"{', '.join(pinning)} {'pin' if len(pinning) > 1 else 'pins'} it" if pinning else "",
               f"{', '.join(one_pass)} runs one pass" if one_pass else ""]
        raise UsageError(f"--{knob.replace('_', '-')} {value}: no entry of --impls follows it "
                         f"({'; '.join(w for w in why if w)})")


def sft_modes(impls) -> dict:
    """Per built entry, what decides how fast its SFT step would run: packing, fused model ops, CUDA graphs."""
    return {n: (getattr(b.engine, "pack", False), getattr(b.engine, "fused", False),
                getattr(b.engine, "graphs", None) is not None) for n, (b, _, _) in impls.items()}


def sft_baselines(name: str, modes: dict) -> tuple[str, ...]:
    """The SFT entries a Booster entry's step is measured against, first choice first: its own engine's SFT step
    (for a fast entry only where fast-sft packs, fuses and captures as it does: a padded, unfused or eager variant
    against a packed, fused, captured SFT step would not say what Booster costs), else the reference engine's."""
    if name == "reference" or "fast-sft" not in modes or modes.get(name) != modes["fast-sft"]:
        return ("sft",)
    return ("fast-sft", "sft")
