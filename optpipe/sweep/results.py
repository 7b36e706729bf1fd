"""OUT/results.json: one record per job, rewritten atomically as each job finishes; which records a rerun reuses."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optpipe.artifact import umask_mode
from optpipe.errors import OutputError
from optpipe.sweep.jobs import SweepJob

RESULTS = "results.json"


def load_records(out: Path) -> dict[str, dict[str, Any]]:
    """The records of earlier runs into OUT, by job name (empty when there are none)."""
    file = Path(out) / RESULTS
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
        records = data["results"]
        return {r["job"]: r for r in records}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{file} is not a sweep results file ({exc}); move it away or pick another -o") from exc


def write_records(out: Path, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write {"results": [...], "sweep": meta} to a temp file beside results.json, then rename it over: a reader
    (or Ctrl-C) sees the old file or the new one, never half of one."""
    out = Path(out)
    file = out / RESULTS
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS}.", suffix=".tmp", dir=out)
    try:
        os.fchmod(fd, umask_mode(directory=False))
        with os.fdopen(fd, "w") as fh:
            json.dump({"results": list(records.values()), "sweep": meta}, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


def reusable(record: dict[str, Any] | None, job: SweepJob) -> bool:
    """An earlier ok record of the same job (model, target, every override) whose artifact is still there.

    An artifact built on another host may live on that host's disk only; its record is trusted.
    """
    if not record or record.get("status") != "ok":
        return False
    if any(record.get(k) != v for k, v in job.identity().items()):
        return False
    artifact = Path(record.get("artifact", ""))
    return (artifact / "manifest.json").is_file() or record.get("host") != socket.gethostname()


def failed_record(job: SweepJob, error: str, **extra: Any) -> dict[str, Any]:
    return {**job.identity(), "status": "failed", "error": error, **extra}


@dataclass(frozen=True)
class SweepResult:
    """The records of this sweep's jobs, in plan order (results.json also keeps earlier jobs not in this one)."""

    out: Path
    records: tuple[dict[str, Any], ...]

    @property
    def results_file(self) -> Path:
        return self.out / RESULTS

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "ok"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def reused(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("reused")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0
