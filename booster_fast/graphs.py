"""One CUDA graph per Booster step.

The fast step has static shapes (batches right-padded to one max_length, or packed to one of a few bucketed
lengths: packing.py), no host syncs, fixed buffer
addresses (W, B, G_h, G_f, the optimizer state) and a capturable fused AdamW, so the whole step — both passes,
the kernels, clipping and the update — can be captured once and replayed for every later batch of the same
shape (PyTorch's CUDA-graph notes: whole-network capture). `StepGraphs` does the bookkeeping:

- per shape signature (a list of micro-batches counts as its micro-batches' shapes), the first `WARMUP` steps
  run eagerly on a side stream (they are real training steps: they also initialise the optimizer state and the
  autograd caches), then the step is captured into static input tensors and replayed; each new batch is
  copied into the static inputs;
- the attention mask is dropped inside captured steps, so the passes run the mask-free causal attention of
  attention.py (exact with right padding: real tokens never attend to the pads after them and pads carry label
  −100; transformers' own mask building would read values back to the host). Right padding is checked on every
  CPU batch, and on CUDA batches during warm-up and capture (later it would be a host sync per step). A model
  that needs its mask (`keep_masks`: attention.probe_attention found the mask-free path inexact for it) keeps
  it, and its steps are captured only if they do not sync;
- a graph is keyed on the batch shapes and on the constants the capture bakes in (the optimizer's betas,
  weight decay, eps, and the step's knobs, fast.STEP_KNOBS: λ, α, the clip norm, ...; a changed one gets its
  own warm-up and capture); the learning rate is a device tensor that every replay reads, so a scheduler needs
  no new graph;
- the step's outputs are stacked into one static tensor inside the graph and cloned once after each replay;
- the last warm-up step runs under torch's sync debug mode ("warn"): a step that syncs with the host is found
  there, after a complete eager step, instead of by a capture that CUDA invalidates (which can leave the
  allocator and the current stream in a bad state). The capture restores the current stream whatever happens;
- all graphs share one private memory pool (replays never overlap, outputs are cloned at once), and at most
  MAX_GRAPHS are kept, the least recently replayed going first;
- a key met after the first capture (a new bucketed length of packed batches) warms up eagerly while the pool,
  which holds a step's working set, stays reserved: a second working set beside it. With POOL_WARMUP (off by
  default until the GPU suite has verified it) the warm-up's allocations go into that pool instead, as torch's
  compiled-graph trees warm up. Nothing of the warm-up may then outlive it there (a later replay writes over
  its blocks): its outputs are cloned out, and what else the step leaves behind (the optimizer's grad_scale and
  found_inf) is written anew before any read. A model that built state lazily on a longer input would break
  that rule: transformers' dynamic RoPE rebuilds inv_freq so, but its check reads the device every step, so
  such a model's steps are never captured (no graph, so no routed warm-up). The backward runs on autograd's own
  thread, whose allocations stay in the general pool (torch routes only the current thread's);
- a step that syncs with the host (found in the watched warm-up) runs eagerly for that key only: other shapes
  are still captured (a sliding-window model's batches with rows longer than the window build their windowed
  mask on the host; its packed batches do not). A step that fails inside the capture turns graphs off for the
  run. In both cases `graphs="auto"` logs one line with the reason and `graphs="on"` raises. A capture that
  CUDA itself invalidated is fatal in both modes (see CaptureInvalidated).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings

import torch

from .batches import check_right_padded, without_mask
from .errors import reason

log = logging.getLogger("booster_fast")
WARMUP = 2
# Packed batches come in a few bucketed lengths per batch kind (packing.BUCKETS), so a run meets a few dozen
# (harmful, alignment) length pairs at most, most of them rarely. The graphs share one memory pool, so a graph
# costs its captured kernel list, not activation memory.
MAX_GRAPHS = 32
SYNC_WARNING = "synchronizing CUDA operation"  # the text of torch's sync debug-mode warning
# Warm up keys met after the first capture inside the graphs' memory pool (the module docstring says what that
# saves and assumes). Read when a StepGraphs is built; benchmarks/gpu_checks.py's equivalence part checks it.
POOL_WARMUP = False
# torch's routing of the current thread's allocations to a private pool (what torch.cuda.use_mem_pool calls)
_POOL_ROUTING = ("_cuda_beginAllocateCurrentThreadToPool", "_cuda_endAllocateToPool", "_cuda_releasePool")


@contextlib.contextmanager
def _allocating_in(pool):
    """The current thread's CUDA allocations go to `pool` (an existing graph pool) inside."""
    device = torch.cuda.current_device()
    begin, end, release = (getattr(torch._C, name) for name in _POOL_ROUTING)
    begin(device, pool)
    try:
        yield
    finally:
        end(device, pool)
        release(device, pool)  # begin counted one more user of the pool


def _kind_name(kind) -> str:
    return kind[0] if isinstance(kind, tuple) else str(kind)


def _shapes(batches) -> str:
    return ", ".join("x".join(map(str, b["input_ids"].shape)) for b in batches if "input_ids" in b)


def _drop_oldest(d: dict, keep: int):
    """Forget the oldest entries of an insertion-ordered dict beyond `keep` (keys that never came back)."""
    while len(d) > keep:
        d.pop(next(iter(d)))


def _regroup(groups: tuple, flat: tuple) -> tuple:
    """The step's arguments from the flat batch list: a list of n micro-batches where groups says n, else one."""
    out, i = [], 0
    for n in groups:
        out.append(flat[i] if n is None else list(flat[i:i + n]))
        i += 1 if n is None else n
    return tuple(out)


def batch_signature(batch: dict) -> tuple:
    """What a captured graph assumes of one batch: each tensor's shape and dtype, each plain value itself."""
    return tuple((k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, v) for k, v in sorted(batch.items()))


class CaptureInvalidated(RuntimeError):
    """CUDA ended a capture in error. torch's capture_end (up to 2.11, the GPU suite's) raises before it hands the
    graph's memory pool back to the caching allocator, which then still believes a capture is under way: later
    frees and empty_cache() can fail inside the allocator (pytorch/pytorch PR 180395 ends the routing first). So
    this is fatal, with a clear message, even under graphs='auto': one line and exit code 5 from the CLI."""


class StepGraphs:
    def __init__(self, mode: str, keep_masks: bool = False):
        self.mode = mode
        self.keep_masks = keep_masks  # hand the step its batches' attention masks (see the module docstring)
        self.disabled: str | None = None  # why graphs are off for the whole run
        self.eager_keys: dict = {}  # key -> why steps of that key run eagerly (the step syncs); oldest first
        self._graphs: dict = {}  # key -> (static inputs, static output, output keys, graph); least recent first
        self._seen: dict = {}    # key -> eager steps so far, for keys not captured yet (oldest first)
        self._stream = None      # the side stream of warm-ups and captures (one, as PyTorch's recipe has it)
        self._pool = None        # one memory pool for all graphs: replays never overlap and outputs are cloned
        self.replays = 0         # steps run as a graph replay so far
        self.pool_warmups = 0    # warm-up steps whose allocations went to the graphs' pool
        self._pool_warmup = POOL_WARMUP  # (turned off for the run if routing fails)
        self.dropped = 0         # graphs dropped for a newer shape (more than MAX_GRAPHS shapes met)

    def reset(self):
        """Forget every captured graph (after tensors they captured were replaced, e.g. a loaded state)."""
        self._graphs.clear()
        self._pool = None  # the next capture starts a pool of its own: this one goes when its graphs do
        self._seen.clear()
        self.eager_keys.clear()

    @property
    def fallback(self) -> str | None:
        """Why some steps ran eagerly (graphs off for the run, or the keys whose step syncs), or None."""
        return self.disabled or ("; ".join(dict.fromkeys(self.eager_keys.values())) or None)

    def run(self, kind, fn, batches: tuple) -> dict[str, torch.Tensor]:
        """Run fn(*batches) — eagerly for warm-up, then as a captured graph replay. `kind` (hashable) names
        the step and every constant the capture bakes in; it is part of the graph key with the batch shapes.
        An argument may be a list of micro-batches (packed ones under gradient accumulation): the graph's
        static inputs are then one set per micro-batch."""
        groups = tuple(len(b) if isinstance(b, (list, tuple)) else None for b in batches)
        if any(n is not None for n in groups):
            step, fn = fn, lambda *flat: step(*_regroup(groups, flat))
            batches = tuple(m for b in batches for m in (b if isinstance(b, (list, tuple)) else (b,)))
        stripped = batches if self.keep_masks else tuple(without_mask(b) for b in batches)
        key = (kind, groups) + tuple(batch_signature(b) for b in stripped)
        entry = self._graphs.get(key)  # (none once graphs are off for the run)
        if not self.keep_masks:
            for b in batches:
                check_right_padded(b, sync_ok=entry is None)  # a sync: warm-up, capture and eager steps only
        batches = stripped
        if self.disabled is not None or key in self.eager_keys:  # eager, and mask-free like every fast step
            return fn(*batches)
        if entry is None:
            seen = self._seen.pop(key, 0)
            if seen < WARMUP:
                self._seen[key] = seen + 1
                _drop_oldest(self._seen, 4 * MAX_GRAPHS)
                out, sync = self._eager(fn, batches, watch=seen + 1 == WARMUP)
                if sync:
                    self._keep_eager(key, kind, batches, f"the step syncs with the host ({sync})")
                return out
            try:
                entry = self._capture(fn, batches)
            except CaptureInvalidated as e:
                raise CaptureInvalidated(f"CUDA graph capture was invalidated ({e}); CUDA memory cannot be trusted "
                                         "after that in this process: rerun with graphs='off' (--graphs off)") from e
            except Exception as e:  # noqa: BLE001 - a failure before CUDA saw anything: fall back (auto)
                if self.mode == "on":
                    raise
                self._give_up(f"capture failed ({reason(e)})")
                return fn(*batches)
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))  # the least recently replayed graph
                if not self.dropped:
                    log.warning("CUDA graphs: more than %d batch shapes met; the least recently replayed graph "
                                "goes, and its shape warms up and is captured again if it comes back (batches of "
                                "a few fixed widths avoid that)", MAX_GRAPHS)
                self.dropped += 1
            log.info("CUDA graphs: captured the %s step for batches of %s; later steps of that shape replay it",
                     _kind_name(kind), _shapes(batches))
        else:
            del self._graphs[key]  # re-inserted below: the dict's order is the order of last use
        self._graphs[key] = entry
        static_in, static_out, keys, graph = entry
        for dst, src in zip(static_in, batches):
            for k, v in src.items():
                if torch.is_tensor(v):  # plain values (a packed batch's max_seqlen) are part of the key
                    dst[k].copy_(v, non_blocking=True)
        graph.replay()
        self.replays += 1
        return dict(zip(keys, static_out.clone().unbind()))

    def _keep_eager(self, key, kind, batches, why: str):
        """Steps of this key run eagerly from now on; other keys are still captured. One warning per reason."""
        if self.mode == "on":
            raise RuntimeError(f"graphs='on': {why}")
        new_reason = why not in self.eager_keys.values()
        self.eager_keys[key] = why
        _drop_oldest(self.eager_keys, 4 * MAX_GRAPHS)
        (log.warning if new_reason else log.info)(
            "CUDA graphs: %s; the %s step for batches of %s runs eagerly (other shapes are still captured)",
            why, _kind_name(kind), _shapes(batches))

    def _give_up(self, why: str):
        if self.mode == "on":
            raise RuntimeError(f"graphs='on': {why}")
        self.disabled = why
        log.warning("CUDA graphs off: %s; running the fast step eagerly", why)

    def _side(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _eager(self, fn, batches, watch: bool):
        """One eager step on the side stream; with POOL_WARMUP, in the graphs' pool once a graph exists. With
        `watch`, under torch's sync debug mode "warn": returns (output, the first host-sync warning's text or
        None); other warnings are passed on."""
        if not (self._graphs and self._pool_warmup):
            return self._eager_step(fn, batches, watch)
        # host syncs, once per warm-up step: every replay is done with the pool's blocks before they are handed
        # out again, and the general pool's cached blocks go back to the driver (the allocator cannot free them
        # on its own while allocations are routed to a pool)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        with contextlib.ExitStack() as in_pool:
            try:
                in_pool.enter_context(_allocating_in(self._pool))
            except Exception as e:  # noqa: BLE001 - an allocator API that moved: warm up beside the pool instead
                self._pool_warmup = False
                log.warning("CUDA graphs: cannot warm up in the graphs' memory pool (%s); new shapes warm up "
                            "beside it, which needs about one step's activations more", reason(e))
                return self._eager_step(fn, batches, watch)
            out, sync = self._eager_step(fn, batches, watch)
        self.pool_warmups += 1
        # out of the pool (a later replay writes over the blocks it frees), on the caller's stream, which has
        # waited for the step: the clones are in the general pool
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}, sync

    def _eager_step(self, fn, batches, watch: bool):
        side = self._side()
        side.wait_stream(torch.cuda.current_stream())
        with warnings.catch_warnings(record=True) if watch else contextlib.nullcontext([]) as caught:
            if watch:
                warnings.simplefilter("always")
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.cuda.stream(side):
                    out = fn(*batches)
            finally:
                if watch:
                    torch.cuda.set_sync_debug_mode(previous)
                # also when the step raised: what it queued on the side stream may still use the caller's tensors
                torch.cuda.current_stream().wait_stream(side)
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
        for w in caught:
            if w not in syncs:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, (reason(syncs[0].message) if syncs else None)

    def _capture(self, fn, batches):
        static_in = tuple({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches)
        torch.cuda.synchronize()  # host sync: once per captured shape
        gc.collect()
        torch.cuda.empty_cache()  # the warm-ups' cached blocks: the graph's private pool cannot reuse them
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        keys: list[str] = []
        failed = None
        # Not `with torch.cuda.graph(...)`: its exit ends the capture before it restores the stream, so a capture
        # that CUDA invalidated would leave the capture stream current. Here the stream is restored regardless,
        # and the step's own error is kept apart from the one capture_end raises on top of it.
        with torch.cuda.stream(self._side()):
            graph.capture_begin(pool=self._pool)
            try:
                out = fn(*static_in)
                keys.extend(out)
                static_out = torch.stack([out[k].float().reshape(()) for k in keys])
            except Exception as e:  # noqa: BLE001 - re-raised below, once the capture is ended
                failed = e
            try:
                graph.capture_end()
            except Exception as e:  # noqa: BLE001
                raise CaptureInvalidated(reason(failed or e)) from (failed or e)
        if failed is not None:
            raise failed
        return static_in, static_out, keys, graph
