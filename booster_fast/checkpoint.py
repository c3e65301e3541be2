"""The run directory on disk: atomic checkpoints, exact resume, and a run that is complete or visibly not.

    OUTPUT/
      .incomplete                 present from the start of training until the final files are in place
      run_config.json             the flags of the run (`--resume` reads them back)
      metrics.jsonl               one line per step, appended at log intervals and fsynced at each checkpoint
      checkpoints/step-000040/    the newest `--keep-checkpoints` K, each complete or absent:
        adapter_model.safetensors, adapter_config.json   the LoRA weights (peft's format: a usable adapter)
        optimizer.pt              Booster.state_dict(): the optimizer state (torch.save; read weights_only=True)
        rng.pt                    torch CPU / CUDA, Python and NumPy RNG states (same)
        trainer_state.json        step, skipped count and streak, each BatchStream's position (one for SFT),
                                  metrics.jsonl byte offset, the run's total steps
      adapter_model.safetensors, adapter_config.json, tokenizer files   the final adapter (when complete)

Atomicity. A checkpoint is written into `checkpoints/.tmp-step-000040-PID`, every file and the directory are
fsynced, then it is renamed to `step-000040` and the parent fsynced: a `step-*` directory is complete by
construction, and a killed write leaves only a `.tmp-*` directory that the next resume deletes. The run
directory itself first appears by the rename of a sibling temporary directory that already holds
`.incomplete` and `run_config.json`. Finishing moves the final files in, then removes `.incomplete` (the
commit point). Weights are read back with safetensors and training state with `torch.load(weights_only=True)`,
so a checkpoint cannot run code.

Exactness. The LoRA parameters of the fast engine are views of its flat buffer W (the optimizer's only
parameter), so loading the adapter in place restores W; with the optimizer state, the data-stream positions
and the RNG states restored, a resumed run continues with bit-identical updates on the CPU.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from .atomic import fsync_dir, fsync_file, save_adapter, umask, write_text_atomic
from .cli import UsageError
from .config import is_integer
from .errors import described

log = logging.getLogger("booster_fast")

MARKER = ".incomplete"
CHECKPOINTS = "checkpoints"
CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(UsageError):
    """A run or checkpoint that cannot be resumed (one line, exit code 2)."""


# ------------------------------------------------------------------------------------------------
# durable files
# ------------------------------------------------------------------------------------------------
def fsync_tree(root: Path):
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU and every CUDA device, if CUDA is in use), Python and NumPy RNG states, as plain tensors and
    builtins (so that torch.load(weights_only=True) reads them back)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            log.warning("resume: %d CUDA RNG states saved but %d devices here; CUDA RNGs not restored",
                        len(saved), torch.cuda.device_count())
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def load_newest(run: Path, model, booster, streams: dict, steps: int,
                set_aside: bool = True) -> tuple[dict | None, Path | None]:
    """(trainer_state, path) of the newest checkpoint that loads, or (None, None) when the run has none. A newer
    one that does not load (a disk fault, a hand edit: checkpoints are written atomically) is skipped and, once an
    older one has loaded, named in one warning and renamed `step-N.unreadable` (kept for inspection) so that the
    run can write step N again; `set_aside` False leaves the renaming to another process (rank 0). When none
    loads, the newest one's error is raised, counting the others, and nothing is renamed or logged; so too when
    the one that loads lies past the run's `steps` (a checkpoint of another run)."""
    unreadable = []  # (path, its CheckpointError), newest first
    for _, path in reversed(list_checkpoints(run)):
        try:
            state = load_checkpoint(path, model, booster, streams)
        except CheckpointError as e:
            unreadable.append((path, e))
            continue
        if state["step"] > steps:
            raise CheckpointError(f"cannot resume: {path} is of step {state['step']}, past the run's {steps} steps "
                                  f"(a checkpoint of another run?)")
        for bad, error in unreadable:  # said only now: when none loads, the error is the one line
            why = str(error).removeprefix("cannot resume: ")
            kept = f"; it is kept as {keep_aside(bad, 'unreadable').name}" if set_aside else ""
            log.warning("resuming from %s, as %s does not load (%s)%s", path.name, bad.name, why, kept)
        return state, path
    if unreadable:
        newest, older = unreadable[0][1], len(unreadable) - 1
        raise CheckpointError(f"{newest}" + ("" if not older else f" (and the {older} older checkpoint"
                                             f"{'s do' if older > 1 else ' does'} not load either)"))
    return None, None


def keep_aside(path: Path, tag: str) -> Path:
    """Rename `path` to NAME.TAG (NAME.TAG-1, -2, ... when that name is taken) and return the new path: what a
    resume cannot use is kept for inspection rather than deleted."""
    kept, n = path.with_name(f"{path.name}.{tag}"), 1
    while kept.exists() or kept.is_symlink():  # set aside before (the same step unreadable again, say)
        kept, n = path.with_name(f"{path.name}.{tag}-{n}"), n + 1
    path.rename(kept)
    return kept


def remove_partial(run: Path):
    """Delete what a killed process left half-written: checkpoint and final-file temporaries."""
    root = Path(run) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)
    for p in Path(run).glob(".final-tmp*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run: Path, step: int, model, booster, streams: dict, trainer_state: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically (temporary directory, fsync, rename), then keep the newest `keep`."""
    root = Path(run) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    final, old = root / name, None
    try:
        save_adapter(model, tmp)
        torch.save(booster.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"format": FORMAT, "step": step, **trainer_state,
                 "streams": {k: s.state_dict() for k, s in streams.items()}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        fsync_tree(tmp)
        if final.exists():  # the same step saved again: set the old copy aside until the new one is in place
            old = root / f".old-{name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():  # the new copy did not land: the old one back
            old.rename(final)
        raise
    for _, stale in list_checkpoints(run)[:-keep]:  # set aside first: a kill mid-delete leaves no half checkpoint
        aside = root / f".old-{stale.name}-{os.getpid()}"
        stale.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(root)
    return final


def _load_training_state(path: Path, device) -> dict:
    """torch.load with weights_only=True: tensors and builtins only, never arbitrary pickled objects."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume: {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError (refused globals), truncated or corrupt files
        raise CheckpointError(f"cannot resume: {path} is not a plain tensor checkpoint "
                              f"({_load_failure(e)})") from None


def _load_failure(e: Exception) -> str:
    """Why torch.load refused a file, in one sentence: the unpickler's own reason where weights_only refused it
    (torch's message around it advises loading the file without weights_only, which would run its code)."""
    text = str(e)
    mark = "WeightsUnpickler error:"
    if mark in text:
        detail = next((line.strip() for line in text.split(mark, 1)[1].splitlines() if line.strip()), "")
        return f"{type(e).__name__}: {detail.split('. ')[0].rstrip('.')[:200]}" if detail else type(e).__name__
    return described(e, 200).split(". ")[0].rstrip(".")


def _is_count(value) -> bool:
    return is_integer(value) and value >= 0


def _trainer_state_fault(state, streams: dict) -> str | None:
    """What in a trainer_state.json this run cannot use (a hand edit, a damaged disk), or None: the fields the
    resume reads, each of the type save_checkpoint wrote."""
    if not isinstance(state, dict):
        return f"holds {type(state).__name__}, not a JSON object"
    for key in ("step", "metrics_bytes", "skipped", "skipped_in_a_row"):
        if key == "skipped_in_a_row" and key not in state:  # absent from checkpoints of older versions
            continue
        if not _is_count(state.get(key)):
            return f"{key} is {json.dumps(state.get(key))}, not a count" if key in state else f"no {key}"
    saved = state.get("streams")
    if not isinstance(saved, dict):
        return f"streams is {json.dumps(saved)}, not a JSON object" if "streams" in state else "no streams"
    for key in streams:
        if not isinstance(saved.get(key), dict):
            return f"no {key} stream" if key not in saved else f"the {key} stream is not a JSON object"
        for field in ("epoch", "position"):
            if not _is_count(saved[key].get(field)):
                return f"the {key} stream's {field} is {json.dumps(saved[key].get(field))}, not a count"
    return None


def load_checkpoint(path: Path, model, booster, streams: dict) -> dict:
    """Restore LoRA weights (in place, so the fast engine's flat W too), optimizer, streams and RNGs from `path`;
    returns its trainer_state."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume: {path / 'trainer_state.json'} is unreadable ({e})") from None
    if isinstance(state, dict) and state.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume: {path} has checkpoint format {state.get('format')!r}, "
                              f"this version reads {FORMAT}")
    fault = _trainer_state_fault(state, streams)  # checked before anything is loaded into the run
    named = _STEP_DIR.match(path.name)
    if fault is None and named and int(named.group(1)) != state["step"]:
        fault = f"step is {state['step']}, but the checkpoint is named {path.name}"
    if fault:
        raise CheckpointError(f"cannot resume: {path / 'trainer_state.json'} is unreadable ({fault})")
    device = booster.engine.device
    try:
        adapter = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot resume: {path / 'adapter_model.safetensors'} is unreadable ({e})") from None
    mine = get_peft_model_state_dict(model)
    if adapter.keys() != mine.keys() or any(adapter[k].shape != mine[k].shape for k in mine):
        raise CheckpointError(f"cannot resume: the adapter in {path} does not fit this model's LoRA layers")
    set_peft_model_state_dict(model, adapter)  # in-place copies into the parameters (views of W for fast)
    loaded = get_peft_model_state_dict(model)
    if not all(torch.equal(loaded[k], adapter[k]) for k in adapter):
        raise CheckpointError(f"cannot resume: the adapter in {path} did not load into the LoRA weights")
    saved = _load_training_state(path / "optimizer.pt", device)  # its own CheckpointError when unreadable
    try:
        if not isinstance(saved, dict):
            raise TypeError(f"{type(saved).__name__}, not a dict")
        booster.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # whatever shape the file has
        raise CheckpointError(f"cannot resume: the optimizer state in {path} does not fit "
                              f"({type(e).__name__}: {e})") from None
    for key, stream in streams.items():
        stream.load_state_dict(state["streams"][key])
    rng = _load_training_state(path / "rng.pt", "cpu")
    try:  # (torch refuses a state of the wrong size or dtype with a RuntimeError)
        if not isinstance(rng, dict):
            raise TypeError(f"{type(rng).__name__}, not a dict")
        set_rng_state(rng)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume: the RNG states in {path / 'rng.pt'} do not fit "
                              f"({type(e).__name__}: {e})") from None
    return state


# ------------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------------
class RunDir:
    """A run directory that exists from the start of training, marked `.incomplete` until it is finished.

    `create` makes a new one (after every input check passed); `reopen` takes an interrupted one back. Until
    `commit` (the first checkpoint), a new run can still be `abandon`ed without a trace: its directory and the
    parents made for it are removed and a run it replaced under --overwrite is put back.
    """

    def __init__(self, path: Path, committed: bool, created: list[Path] | None = None, replaced: Path | None = None):
        self.path, self.committed = Path(path), committed
        self._created, self._replaced = created or [], replaced

    @classmethod
    def create(cls, path: Path, config: dict) -> RunDir:
        path = Path(path)
        created, parent = [], path.absolute().parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        replaced = None
        try:
            for d in reversed(created):
                d.mkdir()
            tmp = path.absolute().parent / f".{path.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            tmp.chmod(0o777 & ~umask())
            (tmp / MARKER).write_text("this run has not finished; continue it with: booster-fast align --resume "
                                      f"{path}\n")
            (tmp / CONFIG).write_text(_config_text(config))
            (tmp / METRICS).write_bytes(b"")
            fsync_tree(tmp)
            if path.exists():  # --overwrite: the old run stays aside until the new one has a checkpoint
                replaced = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(replaced)
            tmp.rename(path)
            fsync_dir(path.absolute().parent)
        except OSError as e:
            shutil.rmtree(path.absolute().parent / f".{path.name}.tmp-{os.getpid()}", ignore_errors=True)
            if replaced is not None and not path.exists():
                replaced.rename(path)
            _remove_dirs(created)
            raise UsageError(f"cannot write --output {path}: {e.strerror or e}") from None
        return cls(path, committed=False, created=created, replaced=replaced)

    @classmethod
    def reopen(cls, path: Path) -> RunDir:
        """The run to resume, cleaned of what a killed process left half-written. A run that `--overwrite` set
        aside when this one was created, and that a kill left there, goes: this run, the one meant to replace
        it, is being continued. A run without a checkpoint starts again from step 0, said in a warning; the
        metrics it had recorded are kept as metrics.jsonl.before-restart, since the restart rewrites the file."""
        run = cls(path, committed=True)
        remove_partial(run.path)
        for old in run.path.absolute().parent.glob(f".{run.path.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s: the run that --overwrite replaced with this one", old)
        if not list_checkpoints(run.path):  # killed before its first checkpoint, or its checkpoints were removed
            metrics, kept = run.path / METRICS, ""
            if metrics.is_file() and metrics.stat().st_size:
                kept = f"; the metrics recorded so far are kept as {keep_aside(metrics, 'before-restart').name}"
            log.warning("resume: %s holds no checkpoint, so the run starts again from step 0%s", run.path, kept)
        return run

    def record_changes(self, changed: dict):
        """Write the flags this resume changed (those a resume may change) into run_config.json, so that the next
        resume keeps them; called once the checkpoint has loaded, so that a failed resume changes nothing."""
        if changed:
            config = json.loads((self.path / CONFIG).read_text())
            write_text_atomic(self.path / CONFIG, _config_text({**config, **changed}), durable=True)

    def commit(self):
        """The run now has a checkpoint to resume from: it is no longer abandoned on failure."""
        if self.committed:
            return
        self.committed = True
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def abandon(self):
        if self.committed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self._replaced is not None:
            self._replaced.rename(self.path)
        _remove_dirs(self._created)

    def finish(self, model, tokenizer):
        """Move the final adapter and tokenizer into place, then remove `.incomplete` (the commit point)."""
        tmp = self.path / f".final-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_adapter(model, tmp, tokenizer)
            fsync_tree(tmp)
        except BaseException:  # a full disk, an interrupt: no half-saved adapter left in the run (still resumable)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for f in sorted(tmp.iterdir()):
            os.replace(f, self.path / f.name)
        tmp.rmdir()
        fsync_dir(self.path)
        (self.path / MARKER).unlink()
        fsync_dir(self.path)
        self.commit()


def _config_text(config: dict) -> str:
    return json.dumps(config, indent=2, default=str) + "\n"


def _remove_dirs(dirs: list[Path]):
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break
