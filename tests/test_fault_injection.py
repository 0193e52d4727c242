"""A kill at any step of a checkpoint, or between a shard's arrival and its checkpoint, then a
resume: the float64 sums equal an undisturbed run's exactly (in-process, so the arithmetic is the
same; shards are added in order either way). Checkpoints are written by the reducer's writer
thread: a SIGKILL there stops it writing, a SIGINT lands in the main thread meanwhile."""

import threading

import numpy as np
import pytest
from helpers import build_config, many_texts_run_args, run_tiny, signal_after_checkpoints, write_many_texts

from raygrad import constants as names
from raygrad import engine
from raygrad.store import checkpoint as store_module
from raygrad.store.reducer import Reducer
from raygrad.store.zarr_store import ResultStore


class Killed(BaseException):
    """SIGKILL, in process: raised at the step, and every later write to the store is refused."""


# step -> (object, attribute) whose call is the instant of the signal
STEPS = {
    "shard arrived, before its checkpoint": (Reducer, "checkpoint"),
    "before staging": (store_module, "_stage"),
    "after staging, before the commit rename": (store_module, "_commit"),
    "after the commit rename": (store_module, "_apply_pending"),
    "mid-apply (one array written)": (store_module, "_write_array"),
    "after apply, before the redo file is dropped": (store_module, "_drop_redo"),
}
KILL_AT_CALL = {"mid-apply (one array written)": 2}  # the second array of that checkpoint
CHECKPOINT_TO_HIT = 3  # shards 0 and 1 are checkpointed; the signal lands in shard 2's


@pytest.fixture(scope="module")
def undisturbed(in_process_totals):
    return in_process_totals(shard_size=1)


@pytest.mark.parametrize("signal", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("step", list(STEPS))
def test_kill_at_each_checkpoint_step_then_resume_is_exact(tiny_llama, texts_file, tmp_path, monkeypatch,
                                                           undisturbed, step, signal):
    owner, attribute = STEPS[step]
    real_step, real_checkpoint = getattr(owner, attribute), Reducer.checkpoint
    checkpoints, calls, fired, pending = [], [], [], []

    def land():
        fired.append(signal)
        if signal == "SIGINT" and threading.current_thread() is not threading.main_thread():
            # A signal lands in the main thread; the checkpoint writer goes on. The main thread takes
            # it at its next shard (below): _thread.interrupt_main() would let it land anywhere, a
            # finalizer included, where Python prints and drops it (it did in the full suite).
            pending.append(signal)
            return
        raise Killed if signal == "SIGKILL" else KeyboardInterrupt  # in the writer: it writes nothing more

    def counting_checkpoint(self):
        if fired == ["SIGKILL"]:
            raise Killed  # a killed process writes nothing more
        if pending:
            pending.clear()
            raise KeyboardInterrupt
        # One snapshot per shard, each written before the next is handed over (the writer would
        # otherwise fold a waiting snapshot into a newer one): the third is the same in every run.
        self.writer.wait()
        checkpoints.append(1)
        if owner is Reducer and len(checkpoints) == CHECKPOINT_TO_HIT:
            land()
        return real_checkpoint(self)

    def at_step(*args, **kwargs):
        if len(checkpoints) == CHECKPOINT_TO_HIT and not fired:
            calls.append(1)
            if len(calls) == KILL_AT_CALL.get(step, 1):
                land()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Reducer, "checkpoint", counting_checkpoint)
    if owner is not Reducer:
        monkeypatch.setattr(owner, attribute, at_step)
    config = build_config(tiny_llama, texts_file, tmp_path, shard_size=1, checkpoint_seconds=0)
    with pytest.raises((Killed, KeyboardInterrupt)):
        engine.run(config, echo=lambda _: None, progress=False)
    assert fired == [signal], "the signal never landed"
    monkeypatch.undo()  # as a new process: nothing patched

    (run_dir,) = tmp_path.iterdir()
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    # A signal reaches the main thread while the writer finishes its checkpoint: a shard or two
    # more may be added and kept by then.
    assert 2 <= done.sum() < len(done)
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    for name, expected in undisturbed.sums.items():
        np.testing.assert_array_equal(resumed.sums[name], expected, err_msg=name)
    np.testing.assert_array_equal(resumed.tokens, undisturbed.tokens)
    assert resumed.loss_sum == undisturbed.loss_sum and resumed.loss_tokens == undisturbed.loss_tokens


@pytest.fixture(scope="module")
def many_texts(tiny_llama, tmp_path_factory):
    """(dataset, totals of an undisturbed in-process run): 48 texts, a shard each (console_run)."""
    root = tmp_path_factory.mktemp("many")
    dataset = write_many_texts(root / "many.txt")
    # Checkpointed at the end only: the sums do not depend on when a run checkpoints.
    _, expected = run_tiny(tiny_llama, dataset, root / "undisturbed", shard_size=1, num_samples=48,
                           checkpoint_seconds=3600)
    return dataset, expected


def console_run(tiny_llama, dataset, out_dir, workers: int, **popen):
    """A `raygrad run` of the 48 texts, a shard each, in its own process (the console script)."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(sys.executable).parent / "raygrad")
    return subprocess.Popen([script, *many_texts_run_args(tiny_llama, dataset, out_dir, workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def resume_here_equals_undisturbed(run_dir, expected):
    """A run stopped after at least 3 of its shards, resumed in this process, equals an undisturbed run
    here (another process: equal to float64 rounding)."""
    from helpers import assert_same_totals

    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert 3 <= done.sum() < len(done)
    # In this process, whatever the stopped run used, and checkpointed at the end only, as `expected`.
    engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0, "checkpoint_seconds": 3600})
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, expected, rtol=1e-12)


def test_sigterm_to_the_console_script_then_resume_gives_the_undisturbed_sums(tiny_llama, tmp_path, many_texts):
    """SIGTERM (a scheduler ending the job) stops like Ctrl-C: finished shards saved, the resume
    command said, exit 143. (To a run on a local Ray, whose ray.init would put its own handler in,
    one that exits at once: test_local_ray.)"""
    import signal

    dataset, expected = many_texts
    process = console_run(tiny_llama, dataset, tmp_path / "stopped", workers=0)
    out, err = signal_after_checkpoints(process, tmp_path / "stopped", signal.SIGTERM)
    (run_dir,) = (tmp_path / "stopped").iterdir()
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in err, err[-2000:]
    assert f"(Terminated: SIGTERM); continue with: raygrad run --resume {run_dir}" in out, out
    resume_here_equals_undisturbed(run_dir, expected)


def test_a_sigkilled_ray_run_leaves_no_ray_process_then_resumes_to_the_undisturbed_sums(tiny_llama, tmp_path,
                                                                                       many_texts):
    """SIGKILL to a run on its private local Ray, mid-run: ray.shutdown() cannot run in a SIGKILLed
    driver; Ray's GCS and raylet exit by themselves, but its agents were left to PID 1 until
    raygrad's reaper (raygrad/cluster/reaper.py) ended them. The checkpoints it wrote are whole."""
    import os
    import signal
    import time

    import psutil

    dataset, expected = many_texts
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # a cluster of its own
    driver = console_run(tiny_llama, dataset, tmp_path / "killed", workers=1, env=env)
    ray_processes: dict[psutil.Process, str] = {}  # process -> its name, read while it was alive

    def ray_descendants() -> dict[psutil.Process, str]:
        found = {}
        for process in psutil.Process(driver.pid).children(recursive=True):
            try:  # a process may end between the listing and the reading (Ray's short-lived helpers do)
                name, command = process.name(), " ".join(process.cmdline())
            except psutil.NoSuchProcess:
                continue
            if name.startswith("ray::") or "/ray/" in command:
                found[process] = name
        return found

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        ray_processes = ray_descendants()
        if any(name.startswith("ray::RemoteWorker") for name in ray_processes.values()):  # its worker is up
            break
        time.sleep(0.2)
    # The worker loads the model before its first shard: the reaper (it looks every second) has seen
    # every Ray process by the third checkpoint.
    signal_after_checkpoints(driver, tmp_path / "killed", signal.SIGKILL)
    assert driver.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert set(ray_processes.values()) >= {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    _, alive = psutil.wait_procs(list(ray_processes), timeout=30)
    left = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append((process.pid, ray_processes[process]))
        except psutil.NoSuchProcess:  # ended after wait_procs looked
            pass
    assert not left
    (run_dir,) = (tmp_path / "killed").iterdir()
    resume_here_equals_undisturbed(run_dir, expected)
