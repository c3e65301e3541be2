"""How packing's bucket count trades filler against CUDA-graph shapes, on the built-in data.

    python benchmarks/bucket_sizes.py [--rows 10] [--max-length 256] [--steps 500] [--buckets 16,32,64]

For each bucket count: the filler (packed positions beyond the real tokens, as a share of the real tokens) and
the number of distinct graph keys (graphs.batch_signature of the packed harmful and alignment batches) that a
run of `--steps` updates meets. The last stdout line is one JSON document. CPU only, a few seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics

import booster_fast as bf
from booster_fast import packing
from booster_fast.data import BatchStream, encode_all, load_safety_data
from booster_fast.graphs import batch_signature


def measure(rows: int, length: int, steps: int, buckets: int) -> dict:
    _, tok = bf.load_model("tiny", device="cpu")
    align, harmful = load_safety_data("builtin", "train")
    streams = [BatchStream(encode_all(tok, data, length)[0], rows, length, tok.pad_token_id, seed)
               for data, seed in ((align, 43), (harmful, 44))]
    before, packing.BUCKETS = packing.BUCKETS, buckets
    try:
        step, keys, filler = packing.bucket_size(rows, length), set(), []
        for _ in range(steps):
            collated = [next(s) for s in streams]
            packed = [packing.pack(b) for b in collated]
            keys.add(tuple(batch_signature(p) for p in packed))
            real = sum(int(b["attention_mask"].sum()) for b in collated)
            filler.append(sum(p["input_ids"].shape[1] for p in packed) / real - 1)
    finally:
        packing.BUCKETS = before
    return {"buckets": buckets, "step": step, "filler_share_of_real": round(statistics.mean(filler), 4),
            "graph_keys": len(keys)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--buckets", default="16,32,64")
    args = p.parse_args(argv)
    results = [measure(args.rows, args.max_length, args.steps, int(b)) for b in args.buckets.split(",")]
    for r in results:
        print(f"{r['buckets']:>4} buckets: filler {r['filler_share_of_real']:.1%} of the real tokens, "
              f"{r['graph_keys']} graph keys")
    print(json.dumps({"rows": args.rows, "max_length": args.max_length, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
