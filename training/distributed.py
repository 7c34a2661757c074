"""A training stage on N processes (DDP): the launcher that starts ``torchrun``, and the entry
point each rank runs (``python -m training.distributed JOB.json``).

Rank 0 runs the stage's lifecycle (lock, prepare, build, manifest); the other ranks wait until
rank 0 has prepared the directory, then run the same ``build`` with their writes discarded
(storage.atomic.discarding_writes): the loop wraps the models in DDP, the loader gives each rank
its rows, and rank 0 alone writes. Rank 0's reports (tables, pictures) travel as lines on its
stdout, which the launcher turns back into reports: a Prefect task that launched the ranks
publishes them as artifacts while the run goes on.

Multi-node: the same entry point under ``torchrun --nnodes M --nproc_per_node N
--rdzv-backend c10d --rdzv-endpoint HOST:PORT -m training.distributed JOB.json`` on every node,
with the tiers on a filesystem every node sees (the checkpoints rank 0 writes are what every
rank resumes from).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models import distributed
from storage.atomic import discarding_writes
from storage.report import Reporter
from storage.stage import (
    StageBusy,
    StageDir,
    StageIncomplete,
    StageSpec,
    run_stage,
    spec_from_json,
    spec_to_json,
)
from storage.tiers import Tiers

log = logging.getLogger(__name__)
REPORT_PREFIX = "IMAGESMITH-REPORT "
ERROR_PREFIX = "IMAGESMITH-ERROR "
# errors rank 0 hits that the launcher raises again as themselves: what a retry cannot mend, and a
# busy stage (exit code 75 in the CLI); anything else is a RuntimeError with the run's last lines
RAISED_AGAIN: dict[str, type[Exception]] = {"StageBusy": StageBusy, "ValueError": ValueError, "KeyError": KeyError,
                                            "FileNotFoundError": FileNotFoundError, "MemoryError": MemoryError,
                                            "StageIncomplete": StageIncomplete}


class LineReporter(Reporter):
    """Reports as JSON lines on stdout (rank 0 of a launched run), for the launcher to republish."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self._emit({"kind": "table", "key": key, "rows": rows, "description": description})

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self._emit({"kind": "markdown", "key": key, "text": text, "description": description})

    @staticmethod
    def _emit(event: dict[str, Any]) -> None:
        print(REPORT_PREFIX + json.dumps(event, default=str), flush=True)


def replay(line: str, report: Reporter) -> bool:
    """Republish a ``LineReporter`` line through ``report``; False for any other line."""
    at = line.find(REPORT_PREFIX)  # torchrun may prefix a rank's lines ("[rank0]:")
    if at < 0:
        return False
    event = json.loads(line[at + len(REPORT_PREFIX):])
    if event["kind"] == "table":
        report.table(event["key"], event["rows"], event["description"])
    else:
        report.markdown(event["key"], event["text"], event["description"])
    return True


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    if distributed.is_distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def run_rank(tiers: Tiers, spec: StageSpec, *, wait: bool = True) -> StageDir:
    """What every rank runs (inside a torchrun-launched process group)."""
    rank, _ = distributed.rank_and_world()
    stage = spec.stage_dir(tiers)
    if rank == 0:
        went = []

        def build(out: Path, report: Reporter):
            _broadcast("build")  # the directory is prepared: the other ranks may start
            went.append(True)
            return spec.build(out, report)

        try:
            run_stage(tiers, spec, LineReporter(), build=build, wait=wait)
        finally:
            if not went:  # complete already (or another run completed it): nothing to build
                _broadcast("skip")
        distributed.barrier()
        return stage
    if _broadcast(None) == "build":
        with discarding_writes():
            spec.build(stage.path, Reporter())
    distributed.barrier()
    return stage


def main(argv: list[str] | None = None) -> int:
    """``python -m training.distributed JOB.json`` (as torchrun starts it): JOB holds the spec and tiers."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    rank, world = distributed.setup()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s | rank {rank}/{world} | %(levelname)s | %(name)s - %(message)s")
    code = 0
    try:
        stage = run_rank(Tiers(fast=Path(job["fast"]), bulk=Path(job["bulk"])), spec_from_json(job["spec"]),
                         wait=job.get("wait", True))
        if rank == 0:
            log.info("stage %s complete on %d ranks", stage.path, world)
    except BaseException as e:  # noqa: BLE001  (reported here: the exit below skips Python's own report)
        traceback.print_exc()
        if rank == 0:  # the launcher raises the same kind of error (retries and exit codes depend on it)
            print(ERROR_PREFIX + json.dumps({"type": type(e).__name__, "message": str(e)}), flush=True)
        code = 1
    finally:
        distributed.teardown()
    # Leave without the interpreter's finalisation: gloo's worker threads can still be joinable
    # then, and destroying them aborts the process ("terminate called without an active
    # exception", seen here in 2 of 10 clean runs), which torchrun reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_distributed(tiers: Tiers, spec: StageSpec, nproc: int, *, report: Reporter | None = None,
                    log_line: Callable[[str], None] = log.info, wait: bool = True,
                    python: str = sys.executable) -> StageDir:
    """Run ``spec`` on ``nproc`` processes of this machine (``torchrun --standalone``); rank 0's
    lines go to ``log_line``, its reports to ``report``. A failure raises with the exit code and
    the last lines. A rerun resumes from the stage's last checkpoint, as a 1-process run does."""
    import torch

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"{nproc} training processes need {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    RAISED_AGAIN.setdefault("OutOfMemoryError", torch.OutOfMemoryError)
    stage = spec.stage_dir(tiers)
    if stage.is_complete:
        log.info("%s: %s is complete; nothing to do", spec.name, stage.path)
        return stage
    report = report or Reporter()
    with tempfile.TemporaryDirectory(prefix="imagesmith-ddp-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"spec": spec_to_json(spec), "fast": str(tiers.fast), "bulk": str(tiers.bulk),
                                   "wait": wait}))
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--local-ranks-filter=0", "-m", "training.distributed", str(job)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        log.info("%s: training on %d processes: %s", spec.name, nproc, " ".join(cmd))
        tail: deque[str] = deque(maxlen=30)
        error: dict[str, str] = {}
        # its own process group: stopping this run (a cancelled task) stops torchrun and every rank
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                at = line.find(ERROR_PREFIX)
                if at >= 0:
                    error.update(json.loads(line[at + len(ERROR_PREFIX):]))
                elif not replay(line, report):
                    tail.append(line)
                    log_line(line)
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0 and error.get("type") in RAISED_AGAIN:
        raise RAISED_AGAIN[error["type"]](error["message"])
    if code != 0 or not stage.is_complete:
        raise RuntimeError(f"{spec.name}: the {nproc}-process run failed (torchrun exit {code}); its last lines:\n"
                           + "\n".join(tail))
    return stage


if __name__ == "__main__":
    sys.exit(main())
