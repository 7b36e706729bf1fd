"""Sweeps: many models x targets (x grid points) as Ray jobs -> OUT/results.json -> an HTML + PNG report.

Ray and matplotlib are the optional `sweep` extra (pip install "optpipe[sweep]"); they are imported only when a
sweep runs or a report is drawn, so importing this package needs neither.
"""

from optpipe.sweep.errors import ClusterError, MissingExtraError, SweepInterrupted
from optpipe.sweep.jobs import SweepJob, plan_jobs, run_job
from optpipe.sweep.report import write_report
from optpipe.sweep.results import SweepResult, load_records
from optpipe.sweep.run import sweep

__all__ = ["ClusterError", "MissingExtraError", "SweepInterrupted", "SweepJob", "SweepResult", "load_records",
           "plan_jobs", "run_job", "sweep", "write_report"]
