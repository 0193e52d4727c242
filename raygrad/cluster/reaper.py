"""Ends the local Ray processes a raygrad driver started, once the driver is gone by any means.

`ray.shutdown()` stops them when raygrad exits or is interrupted (Ctrl-C). A SIGKILLed driver
cannot: Ray's GCS and raylet notice and exit, but the agents the raylet started
(ray::DashboardAgent, ray::RuntimeEnvAgent) are adopted by PID 1 and stay. This script, started
by the driver in a session of its own (so a Ctrl-C in the terminal does not reach it), keeps a
list of the driver's descendants that are Ray's, and when the driver is gone ends those still
running. It imports nothing of raygrad; psutil is a dependency of its own (Ray vendors one only inside its package).

    python reaper.py DRIVER_PID
"""

from __future__ import annotations

import sys
import time

POLL_SECONDS = 1.0
# Between SIGTERM and SIGKILL. Once their raylet is gone, Ray 2.60's agents ignore SIGTERM (measured:
# still running 12 s after it), so a longer grace only delays their end.
GRACE_SECONDS = 2.0


def is_ray_process(process) -> bool:
    """Ray's processes: named ray::..., or run from Ray's package (gcs_server, raylet, monitors)."""
    try:
        return process.name().startswith("ray::") or any("/ray/" in part for part in process.cmdline())
    except Exception:  # gone, or not ours to read
        return False


def watch(driver_pid: int) -> None:
    import os

    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, psutil.Process] = {}  # psutil.Process keeps the start time: a reused pid is not ours
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != os.getpid() and child.pid not in known and is_ray_process(child):
                    known[child.pid] = child
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_SECONDS)
    left = [process for process in known.values() if process.is_running()]
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
