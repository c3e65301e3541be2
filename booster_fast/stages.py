"""An experiment's stages, and what a rerun keeps of them.

Each stage (`booster-fast align / attack / eval`) is a command line, run in process through `cli.main`
(`run_stage`). Beside each stage's output a hidden record (`.{output}.stage.json`) keeps what made it: the command
line less --device (a run goes on, or is kept, on another device), the SHA-256 of every file that command line names
(data files, prompts) and of this package's sources, a local model directory's file names, sizes and times, whether
it finished, its seconds, and an id of the output it made, which the records of the stages reading it keep. Run again in
the same work directory, a chain of stages (for one method and seed: align, then the eval of the aligned run and the
attack, each reading the alignment, then the eval of the attacked run) keeps every stage whose record matches and whose
output is whole, unless a stage it reads runs again or was made again since it ran (by an experiment that stopped before
it): a stage that runs runs every stage that reads it, directly or not, and no other (a new eval setting leaves the
attack). An alignment this command line started that stopped after a checkpoint goes on with `align --resume`, once
align's own check (every flag, the data files' SHA-256) confirms that the run is this command line's; otherwise it
starts afresh in an emptied directory, so that align cannot put an older run back there. Models and data sets from the
Hugging Face hub count by the commit the cache holds of each (`hub_revisions`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger("booster_fast")


class StageFailed(RuntimeError):
    """A stage (align / attack / eval) exited non-zero; it has already printed its one-line reason."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def run_stage(argv: list[str]):
    """Run one `booster-fast` command line in this process; StageFailed with its exit code unless it exits 0.
    What the stage prints (eval's result line) goes to stderr with the log: the experiment's stdout is its own
    results."""
    from .cli import main as cli_main

    log.info("$ booster-fast %s", " ".join(argv))
    with contextlib.redirect_stdout(sys.stderr):
        rc = cli_main(argv)
    if rc != 0:  # the stage printed its one-line reason; the command line above says which stage it was
        raise StageFailed(rc)


class Chain:
    """One method's stages for one seed, in order: a stage can be kept from an earlier experiment only where no
    stage it reads ran again, or was made again since."""

    def __init__(self, rerun: bool):
        self.rerun = rerun
        self.ran, self.kept, self.resumed, self.seconds = [], [], [], {}
        self.made = {}  # stage -> the id of its output as this chain has it (recorded by the stages that read it)

    def _why_again(self, done, want: dict, ran_before: list[str]) -> str | None:
        """Why a stage that ran before (its record `done`) is not kept, where `want` is not it or `ran_before` (the
        stages it reads that ran again) is not empty; None without one."""
        if not isinstance(done, dict) or self.rerun:
            return None
        if ran_before:
            return f"the {' and '.join(ran_before)} stage it reads ran again"
        differs = [k for k in want if done.get(k) != want[k]]
        what = {"argv": "its command line differs", "inputs": "its input files changed",
                "code": "this package's code changed since it ran",
                "reads": f"the {' and '.join(want.get('reads', ()))} stage it reads was made again since it ran"}
        return ", ".join(what[k] for k in differs) or None

    def stage(self, name: str, argv: list[str], out: Path, hub: tuple[tuple[str, str], ...] = (),
              reads: tuple[str, ...] = ()):
        """Run one stage (`run_stage`), or keep `out` where the record beside it says it was made by this command
        line (--device aside), from inputs of the same content (`hub`: the (kind, repo) pairs it reads from the
        Hugging Face cache, by their cached revision; `reads`: the earlier stages of the chain whose outputs it
        reads, as they are now), by this code, and finished; an alignment that this command line started and that
        stopped after a checkpoint goes on with align --resume, once align's own check finds the run's settings and
        data are this command line's."""
        from .atomic import write_json_atomic

        record = out.parent / f".{out.name}.stage.json"
        want = {"argv": without_device(argv), "inputs": input_digests(argv, out) | hub_revisions(hub),
                "code": code_digest()}
        if reads:  # the outputs it reads, by the ids their records were given: one made again by an experiment
            want["reads"] = {stage: self.made.get(stage) for stage in reads}  # that stopped before this stage differs
        try:
            done = json.loads(record.read_text())
        except (OSError, ValueError):
            done = None
        ran_before = [stage for stage in reads if stage in self.ran]
        same = not (self.rerun or ran_before) and isinstance(done, dict) and {k: done.get(k) for k in want} == want
        whole = out.is_file() or ((out / "metrics.jsonl").is_file() and not (out / ".incomplete").exists())
        if same and done.get("finished") is True and whole:
            log.info("experiment: %s kept: it finished before with this command line (--rerun runs it again)", out)
            self.kept.append(name)
            self.made[name] = done.get("made")
            self.seconds[name] = done.get("seconds")
            return
        why_again = self._why_again(done, want, ran_before)
        if why_again:
            log.info("experiment: %s runs again: %s", out, why_again)
        elif same and not (argv[0] == "align" and (whole or (out / ".incomplete").exists())):
            log.info("experiment: %s runs again: it did not finish", out)
        self.ran.append(name)  # the stages that read this one read what it makes now
        run_argv = argv
        if same and argv[0] == "align" and (whole or (out / ".incomplete").exists()):
            # the stage's own run (a fresh alignment starts without the old directory, below), unfinished
            why = align_run_differs(argv, out, whole)
            if why:
                log.info("experiment: %s runs again from the start: %s", out, why)
            elif whole:  # finished since, by the align --resume that the stopped stage's line suggested
                log.info("experiment: %s kept: finished since with this command line's settings", out)
                self.kept.append(name)
                self.seconds[name] = None
                self.made[name] = uuid.uuid4().hex  # not the output its readers were made from
                write_json_atomic(record, {**want, "finished": True, "seconds": None, "made": self.made[name]})
                return
            else:
                log.info("experiment: %s was interrupted: it goes on from its newest checkpoint", out)
                run_argv = resume_argv(argv, out)
                self.resumed.append(name)
        if run_argv is argv:
            write_json_atomic(record, {**want, "finished": False})
            if argv[0] == "align" and out.is_dir():  # not kept by align when the new run stops before its first
                shutil.rmtree(out)  # checkpoint: what is here later is this stage's own run
        t0 = time.perf_counter()
        run_stage(run_argv)
        self.seconds[name] = round(time.perf_counter() - t0, 1)  # (a resumed alignment: since it went on)
        # a first run may have downloaded what it read from the hub: its revision now (the local files' digests
        # stay those from before the run, which it read; one edited meanwhile makes the next run differ)
        done_inputs = {**hub_revisions(hub), **want["inputs"]}
        self.made[name] = uuid.uuid4().hex
        write_json_atomic(record, {**want, "inputs": done_inputs, "finished": True, "seconds": self.seconds[name],
                                   "made": self.made[name]})


def without_device(argv: list[str]) -> list[str]:
    """A stage's command line less --device: a run goes on, or is kept, on another device."""
    i = argv.index("--device") if "--device" in argv else len(argv)
    return argv[:i] + argv[i + 2:]


def resume_argv(argv: list[str], out: Path) -> list[str]:
    """An align stage's command line as `align --resume out`: every flag kept, for align to check against the run."""
    return [a for a in argv if a != "--overwrite"] + ["--resume", str(out)]


def align_run_differs(argv: list[str], out: Path, finished: bool) -> str | None:
    """Why the align run in `out` is not the one `argv` makes (align --resume's own check: every flag given, and the
    data files' SHA-256), or None."""
    from .cli import UsageError, parse, size_defaults
    from .run_args import apply_resume

    args = parse(resume_argv(argv, out))
    size_defaults(args)
    try:
        apply_resume(args, finished_ok=finished)
    except UsageError as e:
        return str(e)
    return None


@functools.cache
def code_digest() -> str:
    """SHA-256 of this package's sources: a stage made by other code is not kept."""
    import hashlib

    digest, package = hashlib.sha256(), Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def input_digests(argv: list[str], out: Path) -> dict[str, str]:
    """{path: digest} of what a stage's command line names, its output aside: each file's SHA-256 (data files,
    prompts), and for a local model directory (--model) its listing's (listing_digest)."""
    from .run_args import file_sha256

    files = {value: file_sha256(value) for value in argv
             if Path(value).is_file() and Path(value).absolute() != out.absolute()}
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    return files | ({model: listing_digest(Path(model))} if model and Path(model).is_dir() else {})


def hub_revisions(repos) -> dict[str, str]:
    """{"<kind>s/<repo>": "hub:<commit>"} of each (kind, repo) pair ("model" or "dataset") whose main revision the
    Hugging Face cache holds, read from the cache's refs/main file (nothing downloaded, nothing hashed): a repo
    downloaded again at a newer commit makes the stage run again. One not in the cache is left out (the stage
    fetches it, or says it cannot)."""
    from huggingface_hub import constants

    out = {}
    for kind, repo in repos:
        ref = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}" / "refs" / "main"
        try:
            out[f"{kind}s/{repo}"] = "hub:" + ref.read_text().strip()
        except OSError:
            pass
    return out


def listing_digest(folder: Path) -> str:
    """SHA-256 of a folder's file names, sizes and modification times, not of their content: a 7B model's 13 GB
    would take minutes to hash at every rerun, while a replaced or rewritten file changes its size or time. Hidden
    files and folders (.git, .cache of a hub download) are left out: a fetch there changes no weight."""
    import hashlib

    from .cli import UsageError

    digest = hashlib.sha256()
    try:
        for path in sorted(p for p in folder.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
            st = path.stat()
            digest.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as e:
        raise UsageError(f"{folder}: cannot list ({e.strerror or e})") from None
    return "listing:" + digest.hexdigest()
