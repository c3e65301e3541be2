"""One CUDA graph per Booster step.

The fast step has static shapes (batches right-padded to one max_length), no host syncs, fixed buffer
addresses (W, B, G_h, G_f, the optimizer state) and a capturable fused AdamW, so the whole step — both passes,
the kernels, clipping and the update — can be captured once and replayed for every later batch of the same
shape (PyTorch's CUDA-graph notes: whole-network capture). `StepGraphs` does the bookkeeping:

- per shape signature, the first `WARMUP` steps run eagerly on a side stream (they are real training steps:
  they also initialise the optimizer state and the autograd caches), then the step is captured into static
  input tensors and replayed; each new batch is copied into the static inputs;
- the attention mask is dropped inside captured steps, so the passes run the mask-free causal attention of
  attention.py (exact with right padding: real tokens never attend to the pads after them and pads carry label
  −100; transformers' own mask building would read values back to the host). Right padding is checked on every
  CPU batch, and on CUDA batches during warm-up and capture (later it would be a host sync per step);
- a graph is keyed on the batch shapes and on the constants the capture bakes in (the optimizer's learning
  rate, betas, weight decay, eps): a changed learning rate gets its own warm-up and capture;
- the step's outputs are stacked into one static tensor inside the graph and cloned once after each replay;
- if capture fails, `graphs="auto"` logs one line with the reason and runs eagerly from then on; `graphs="on"`
  raises.
"""
from __future__ import annotations

import logging

import torch

from .batches import check_right_padded

log = logging.getLogger("booster_fast")
WARMUP = 2


def _static_view(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "attention_mask"}


class StepGraphs:
    def __init__(self, mode: str):
        self.mode = mode
        self.disabled: str | None = None
        self._graphs: dict = {}
        self._seen: dict = {}

    def reset(self):
        """Forget every captured graph (after tensors they captured were replaced, e.g. a loaded state)."""
        self._graphs.clear()
        self._seen.clear()

    def run(self, kind, fn, batches: tuple[dict, ...]) -> dict[str, torch.Tensor]:
        """Run fn(*batches) — eagerly for warm-up, then as a captured graph replay. `kind` (hashable) names
        the step and every constant the capture bakes in; it is part of the graph key with the batch shapes."""
        if self.disabled is not None:
            return fn(*batches)
        stripped = tuple(_static_view(b) for b in batches)
        key = (kind,) + tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items())) for b in stripped)
        entry = self._graphs.get(key)
        for b in batches:
            check_right_padded(b, sync_ok=entry is None)  # a sync: warm-up and capture only
        batches = stripped
        if entry is None:
            if self._seen.get(key, 0) < WARMUP:
                self._seen[key] = self._seen.get(key, 0) + 1
                return self._side_stream(fn, batches)
            try:
                entry = self._graphs[key] = self._capture(fn, batches)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back (auto) or surfaces (on)
                if self.mode == "on":
                    raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.disabled = reason
                log.warning("CUDA graphs off: capture failed (%s); running the fast step eagerly", reason)
                torch.cuda.synchronize()  # host sync: once, after a failed capture
                return fn(*batches)
        static_in, static_out, keys, graph = entry
        for dst, src in zip(static_in, batches):
            for k, v in src.items():
                dst[k].copy_(v, non_blocking=True)
        graph.replay()
        return dict(zip(keys, static_out.clone().unbind()))

    @staticmethod
    def _side_stream(fn, batches):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn(*batches)
        torch.cuda.current_stream().wait_stream(side)
        return out

    @staticmethod
    def _capture(fn, batches):
        static_in = tuple({k: v.clone() for k, v in b.items()} for b in batches)
        torch.cuda.synchronize()  # host sync: once per captured shape
        graph = torch.cuda.CUDAGraph()
        keys: list[str] = []
        with torch.cuda.graph(graph):
            out = fn(*static_in)
            keys.extend(out)
            static_out = torch.stack([out[k].float().reshape(()) for k in keys])
        return static_in, static_out, keys, graph
