"""A plugin module that kills its own process at a chosen moment, for resume tests of any strategy
(yours included): ``cl-bench run ... plugins=[cl_bench.kill_switch]`` with ``CL_BENCH_KILL_AT`` set to

* ``step:N``: SIGKILL just before the run's N-th optimizer step is counted (``Strategy.count_step``);
* ``scoring:R``: SIGKILL as score row R is about to be computed, i.e. after task R was learnt and
  before its summary and checkpoint are written.

``plugins`` is not part of a run's hash, so rerunning the command without it resumes the same run.
The moment is an event in the run, never a timer. See tests/test_resume_everywhere.py and
benchmarks/resume_identity.py.
"""
from __future__ import annotations

import os
import signal

from cl_bench import runner
from cl_bench.errors import UserError
from cl_bench.strategies.base import Strategy

where, _, at = os.environ.get("CL_BENCH_KILL_AT", "").partition(":")
if where not in ("step", "scoring") or not at.isdigit():
    raise UserError("plugins=[cl_bench.kill_switch] needs CL_BENCH_KILL_AT=step:N or scoring:R in the environment")
moment = int(at)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if where == "step":
    _count_step, _steps = Strategy.count_step, [0]

    def _counting(self, samples: int, *args) -> None:
        _steps[0] += 1
        if _steps[0] == moment:
            _die()
        _count_step(self, samples, *args)

    Strategy.count_step = _counting
else:
    _score_tasks = runner.score_tasks

    def _scoring(strategy, stream, row, *args, **kwargs):
        if row == moment:
            _die()
        return _score_tasks(strategy, stream, row, *args, **kwargs)

    runner.score_tasks = _scoring
