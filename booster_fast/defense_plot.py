"""The defence experiment's figure (`docs/defense_tiny.png`): the held-out harmful loss against the attack step per
method (each seed thin, their mean bold), the keyword harmful score likewise where the judge gave one, and the
post-attack harmful score and task accuracy per seed. Written atomically; needs matplotlib (the `plot` extra).
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

from .atomic import write_atomic
from .cli import UsageError

COLORS = {"sft": "tab:red", "booster": "tab:blue", "booster-vaccine": "tab:green"}


def need_matplotlib():
    """UsageError (one line, before any training) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the plot needs matplotlib: pip install 'booster-fast[plot]' (or pass --no-plot)")


def plot_defense(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiment import DEFAULT_METHODS, NAMES

    rows, methods = result["per_seed"], result.get("methods", DEFAULT_METHODS.split(","))  # older files: the default
    keyword = all(r[m]["keyword_harmful_score_curve"] for r in rows for m in methods)
    panels = 3 if keyword else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))

    def curves(ax, key, ylabel, title):
        for m in methods:
            cs = [r[m][key] for r in rows]
            for c in cs:
                ax.plot([s for s, _ in c], [v for _, v in c], color=COLORS[m], alpha=0.3, lw=1)
            steps = [s for s, _ in cs[0]]
            mean = [statistics.fmean(c[i][1] for c in cs) for i in range(len(steps))]
            ax.plot(steps, mean, color=COLORS[m], lw=2.2, marker="o", ms=3,
                    label=f"{NAMES[m]}-aligned (mean of {len(cs)} seed{'s' if len(cs) > 1 else ''})")
        ax.set_xlabel("attack step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    curves(axes[0], "harmful_loss_curve", "held-out harmful loss (token mean)", "Harmful loss under the attack")
    if keyword:
        probed = result.get("settings", {}).get("attack", {}).get("refusal_prompts")
        curves(axes[1], "keyword_harmful_score_curve",
               f"% of {probed or 'the'} held-out prompts not refused",
               "Keyword harmful score under the attack")
        axes[1].set_ylim(-3, 103)

    bx = axes[-1]
    seeds = result["seeds"]
    width = 0.4 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * 2 * width for i in range(len(seeds))]
        hs = [r[m]["after_attack"]["harmful_score"] for r in rows]
        acc = [r[m]["after_attack"]["accuracy"] for r in rows]
        bx.bar([x - width / 2 for x in xs], hs, width, color=COLORS[m], label=f"{NAMES[m]}: harmful score")
        bx.bar([x + width / 2 for x in xs], acc, width, color=COLORS[m], alpha=0.35, hatch="//",
               label=f"{NAMES[m]}: task accuracy")
    bx.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    bx.set_ylabel("% after the attack")
    bx.set_ylim(0, 125)
    bx.set_title(f"After the attack (judge: {result['judge']['name']})", fontsize=10)
    bx.legend(fontsize=7, loc="upper center", ncol=2)
    machine = result["machine"]  # (results written before the bench's machine record was used: cpu_count)
    where = machine.get("gpu") or f"{machine.get('cores', machine.get('cpu_count'))} CPU cores"
    chosen = "" if methods == DEFAULT_METHODS.split(",") else f" --methods {','.join(methods)}"
    tweaks = " ".join(f"--set {k}={json.dumps(v)}" for k, v in result.get("overrides", {}).items())
    fig.suptitle(f"booster-fast experiment defense --preset {result['preset']} --seeds {len(seeds)}{chosen}  ({where})"
                 + (f"\n{tweaks}" if tweaks else ""), fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
