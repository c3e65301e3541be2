"""What one step dispatches at the depth of the big presets: aten ops, kernel launches and host syncs.

    python benchmarks/op_counts.py [--models llama-1b-shape,llama-7b-shape,llama-70b-shape] [--width 512]
                                   [--out benchmarks/results/op_counts.json]

The count of ops a step dispatches depends on the model's depth and structure, not on its width, so each preset
is built with its own layer count and head layout but narrow layers (`--width` hidden units, fp32, on the CPU),
and one step of each engine is counted (booster_fast.opcount) on random right-padded batches of 10 rows x 64
tokens, after a first step has created the optimizer state. Eager PyTorch pays host time for every op and a
GPU a launch for every kernel; CUDA graphs replay the fast step without either. The last stdout line is one JSON
document. CPU only, about a minute.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import booster_fast as bf
from booster_fast.atomic import write_text_atomic
from booster_fast.bench_data import random_batch
from booster_fast.models import PRESETS
from booster_fast.opcount import count_ops, host_resident_scalars

ENGINES = {"reference": dict(impl="reference"), "fast-unmerged": dict(merge_passes=False),
           "fast-merged": dict(merge_passes=True)}


def count(model_name: str, width: int, engine: str, rows: int = 10, length: int = 64, **overrides) -> dict:
    heads = PRESETS[model_name]["num_attention_heads"]
    ratio = PRESETS[model_name]["intermediate_size"] / PRESETS[model_name]["hidden_size"]
    model, tok = bf.load_model(model_name, dtype=torch.float32, device="cpu", hidden_size=width,
                               intermediate_size=int(ratio * width), **overrides)
    assert width % heads == 0, f"--width must be a multiple of {model_name}'s {heads} heads"
    torch.manual_seed(0)
    model = bf.add_lora(model, r=32, alpha=4, targets=("q_proj", "k_proj", "v_proj"))
    booster = bf.Booster(model, bf.BoosterConfig(**ENGINES[engine], fused_ops=False))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    pairs = [[booster.to_device(random_batch(rows, length, vocab, tok.pad_token_id, g), "cpu") for _ in "ah"]
             for _ in range(2)]
    booster.step(*pairs[0])  # creates the optimizer state: count a later step
    ops = count_ops(booster.step, *pairs[1], host_resident=host_resident_scalars(booster.optimizer))
    return {"aten_ops": ops["total"], "launches": ops["launches"], "host_syncs": sum(ops["host_syncs"].values()),
            "layers": model.config.num_hidden_layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-1b-shape,llama-7b-shape,llama-70b-shape")
    p.add_argument("--width", type=int, default=512, help="hidden size the presets are narrowed to")
    p.add_argument("--out", default=None, help="also write the JSON document here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {m: {e: count(m, args.width, e) for e in ENGINES} for m in args.models.split(",")}
    for m, r in results.items():
        print(m, ", ".join(f"{e}: {c['aten_ops']:,} ops, {c['launches']:,} launches, {c['host_syncs']} syncs"
                           for e, c in r.items()), file=sys.stderr)
    doc = {"what": "one Booster step (10+10 rows x 64 tokens, LoRA r 32 on q/k/v, fp32, CPU, fused ops off), "
                   f"presets narrowed to hidden size {args.width}", "torch": torch.__version__, "results": results}
    if args.out:
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
