"""Train (or load) every model a domain run needs before anything is measured, in worker processes.

On a cold cache training is most of a run. These models are small: one process with two threads
keeps two cores only partly busy (a MobileNetV2-style epoch: 3.06 s on 2 threads, 4.19 s on 1;
two 1-thread processes side by side: 4.5-4.9 s each, so 1.25-1.35x the work per second), and
lowbit's C++ kernel compiles on one core. So the builders run in ``workers`` spawned processes
with an equal share of the threads (one job per model, or one per domain whose builders share
data they make: ``BUILD_TOGETHER``), the kernel compiles in the main process beside them, and
each result lands in the user cache. The run then measures serially in the main process, loading
every model from the cache: nothing timed ever shares the CPU with a worker.

A job that fails (a missing package or program) is not an error here: the main run builds that
task again and reports the reason in its row.

>>> jobs = [Job("lowbit.domains.classification", ("inception-mini",))]
>>> jobs[0].label
'lowbit.domains.classification: inception-mini'
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch

KERNEL = "lowbit C++ kernel"


@dataclass(frozen=True)
class Job:
    """The builders ``names`` of one domain module, run in order in one worker (they may share
    data a first builder makes and caches, such as the speech corpus)."""

    module: str
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.module}: {', '.join(self.names)}"


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_job(job: Job, quick: bool) -> tuple[str, float, str | None]:
    """``(label, seconds, error)`` of one job, in a worker process."""
    import warnings

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = importlib.import_module(job.module).BUILDERS
            for name in job.names:
                found[name](quick)
    except Exception as err:  # reported again, with its row, when the main run builds this task
        return job.label, time.perf_counter() - started, f"{type(err).__name__}: {err}".splitlines()[0]
    return job.label, time.perf_counter() - started, None


def _build_kernel() -> tuple[str, float, str | None]:
    from lowbit.backends import qcpu

    started = time.perf_counter()
    _module, why = qcpu._build()
    return KERNEL, time.perf_counter() - started, why


def prebuild(
    jobs: Sequence[Job], quick: bool, workers: int = 2, kernel: bool = True
) -> dict[str, float | None]:
    """Run ``jobs`` (and the kernel build) in ``workers`` spawned processes; seconds per job label.

    Jobs are submitted in the order given (put the longest first). A failed job gets ``None`` and
    is never raised: the main run rebuilds that task and reports why.
    """
    if not jobs and not kernel:
        return {}
    threads = max(1, torch.get_num_threads() // max(workers, 1))
    seconds: dict[str, float | None] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    with pool:
        futures = [pool.submit(_run_job, job, quick) for job in jobs]
        if kernel:  # here, beside the workers: the compiler uses one core, and this process loads it
            label, spent, error = _build_kernel()
            seconds[label] = None if error else spent
        for future in as_completed(futures):
            try:
                label, spent, error = future.result()
            except Exception:  # a worker that died (out of memory): the main run builds serially
                continue
            seconds[label] = None if error else spent
    return seconds
