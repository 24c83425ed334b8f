"""Run one command as a subprocess and sample its whole process tree.

Peak RSS is the largest sum of RSS over the root and every descendant, polled every ~50 ms
(shared pages, such as Ray's object store, are counted once per process that maps them, so
this over-counts for Ray). CPU time is the larger of (a) the sum of the last CPU times seen
for every process in the tree and (b) the ``RUSAGE_CHILDREN`` delta of this process, which
also covers short-lived processes the poller missed once they were reaped.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


@dataclass
class Measurement:
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int  # the whole process tree (shared pages counted once per process)
    cpu_seconds: float
    cpu_util: float  # cpu_seconds / wall / cores
    max_processes: int
    timed_out: bool
    stderr_tail: str
    peak_rss_driver_bytes: int = 0  # the command's own process (for the engine: the Ray driver)
    peak_rss_raylet_bytes: int = 0  # Ray's raylet, which holds the plasma object store

    def to_dict(self) -> dict:
        return asdict(self)


def _tree(root: psutil.Process, known: dict[tuple[int, float], psutil.Process]) -> list[psutil.Process]:
    """Root, its descendants, and processes seen before that are still alive (re-parented)."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            known.setdefault((proc.pid, proc.create_time()), proc)
        except psutil.NoSuchProcess:
            pass
    return [p for p in known.values() if p.is_running()]


def run_measured(
    command: list[str],
    *,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: float = 3600,
    log_path: Path | None = None,
    cores: int | None = None,
) -> Measurement:
    cores = cores or os.cpu_count() or 1
    log.debug("running %s", " ".join(command))
    rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log_path = log_path or Path(os.devnull)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    known: dict[tuple[int, float], psutil.Process] = {}
    cpu_seen: dict[tuple[int, float], float] = {}
    peak_rss = peak_driver = peak_raylet = 0
    max_procs = 0
    timed_out = False
    with open(log_path, "wb") as log_file:
        start = time.perf_counter()
        popen = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log_file, stderr=log_file, start_new_session=True
        )
        root = psutil.Process(popen.pid)
        while popen.poll() is None:
            rss = raylet = 0
            procs = _tree(root, known)
            for proc in procs:
                try:
                    with proc.oneshot():
                        proc_rss = proc.memory_info().rss
                        rss += proc_rss
                        if proc.pid == root.pid:
                            peak_driver = max(peak_driver, proc_rss)
                        elif proc.name() == "raylet":
                            raylet += proc_rss
                        times = proc.cpu_times()
                    cpu_seen[(proc.pid, proc.create_time())] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak_rss = max(peak_rss, rss)
            peak_raylet = max(peak_raylet, raylet)
            max_procs = max(max_procs, len(procs))
            if time.perf_counter() - start > timeout:
                timed_out = True
                _kill_tree(popen, known)
                break
            time.sleep(POLL_SECONDS)
        popen.wait()
        wall = time.perf_counter() - start
    _kill_tree(popen, known)  # leftovers (daemons) of this command only
    rusage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rusage_cpu = (
        rusage_after.ru_utime - rusage_before.ru_utime + rusage_after.ru_stime - rusage_before.ru_stime
    )
    cpu = max(rusage_cpu, sum(cpu_seen.values()))
    tail = ""
    if log_path != Path(os.devnull):
        tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    return Measurement(
        returncode=popen.returncode,
        wall_seconds=wall,
        peak_rss_bytes=peak_rss,
        cpu_seconds=cpu,
        cpu_util=cpu / wall / cores if wall else 0.0,
        max_processes=max_procs,
        timed_out=timed_out,
        stderr_tail=tail,
        peak_rss_driver_bytes=peak_driver,
        peak_rss_raylet_bytes=peak_raylet,
    )


def _kill_tree(popen: subprocess.Popen, known: dict[tuple[int, float], psutil.Process]) -> None:
    """Stop what this command started: its session, then any tracked straggler."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in known.values():
        try:
            if proc.is_running():
                proc.kill()
        except psutil.NoSuchProcess:
            pass
