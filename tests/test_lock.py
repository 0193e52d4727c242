"""Issue 15: one writer per run directory. A second resume, a repair or an export of a run another
command writes is one line naming the holder (pid, host, since) and changes nothing; a holder that
was SIGKILLed leaves a lock that is taken over; another host's record counts while its heartbeat is
fresh; and `repair` of a comparison is one line."""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest
from helpers import assert_same_totals, build_config, killed_run, run_cli, run_tiny, tree_digest

from raygrad import constants as names
from raygrad import engine
from raygrad import lock as lock_module
from raygrad.compare import compare_runs
from raygrad.errors import RaygradError
from raygrad.lock import run_lock
from raygrad.store import ResultStore
from raygrad.worker import ShardRunner

HOST = socket.gethostname()
# A process that takes RUN_DIR's lock as COMMAND would, says so, and holds it until its stdin closes.
HOLDER = """
import sys
from raygrad import lock
lock.HEARTBEAT_SECONDS = 3600  # its record stays as written while a test compares files
with lock.run_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def undisturbed(tiny_llama, texts_file, tmp_path_factory):
    """A complete run, shard by shard, and its totals."""
    return run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("undisturbed"), shard_size=1)


@contextlib.contextmanager
def held_by_another_process(run_dir, command="run --resume"):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), command], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n", "the holder never took the lock"
        yield process
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_in_use(err, where, pid, command):
    """One line naming the holder: pid, host, and since when (ISO time, a moment ago)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: in use by pid {pid} on host {HOST} since "), err
    since = lines[0].split(" since ")[1].split(" ")[0]
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(since)).total_seconds()) < 600, since
    assert f"(raygrad {command}); wait for it to end" in lines[0]


def killed(tiny_llama, texts_file, out_dir):
    """A run interrupted at its third shard: two of six saved."""
    run_dir = killed_run(build_config(tiny_llama, texts_file, out_dir, shard_size=1), dies_at_call=3)
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert 0 < done.sum() < len(done)
    return run_dir


def test_a_second_resume_while_one_runs_is_one_line_and_changes_nothing(tiny_llama, texts_file, tmp_path,
                                                                        undisturbed, capsys, monkeypatch):
    run_dir = killed(tiny_llama, texts_file, tmp_path)
    # The first resume, in a thread of this process, stops inside its first shard until let go.
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 3600)
    real_run, inside, go_on, failed = ShardRunner.run, threading.Event(), threading.Event(), []

    def waits(self, *args, **kwargs):
        inside.set()
        assert go_on.wait(120)
        return real_run(self, *args, **kwargs)

    def first_resume():
        try:
            engine.resume(run_dir, echo=lambda _: None, progress=False)
        except BaseException as err:  # reported below, in the test's thread
            failed.append(err)

    monkeypatch.setattr(ShardRunner, "run", waits)
    first = threading.Thread(target=first_resume)
    first.start()
    try:
        assert inside.wait(120), failed
        before = tree_digest(run_dir)
        assert names.LOCK_FILE in before
        capsys.readouterr()  # what loading printed so far
        code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
        assert tree_digest(run_dir) == before
    finally:
        go_on.set()
        first.join(120)
    assert code == 2
    assert_in_use(err, f"--resume {run_dir}", os.getpid(), "run --resume")
    assert not failed, failed
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, undisturbed[1])
    assert not (run_dir / names.LOCK_FILE).exists()  # the first resume, done, removed its lock


def test_the_lock_of_a_sigkilled_holder_is_taken_over(tiny_llama, texts_file, tmp_path, undisturbed, caplog):
    run_dir = killed(tiny_llama, texts_file, tmp_path)
    with held_by_another_process(run_dir) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        assert holder.returncode == -signal.SIGKILL
    left = json.loads((run_dir / names.LOCK_FILE).read_text())  # no finally ran: its record stays
    assert (left["pid"], left["host"], left["command"]) == (holder.pid, HOST, "raygrad run --resume")
    with caplog.at_level(logging.WARNING, logger="raygrad.lock"):
        engine.resume(run_dir, echo=lambda _: None, progress=False)
    assert f"taking over the lock of pid {holder.pid} on host {HOST}" in caplog.text
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, undisturbed[1])
    assert not (run_dir / names.LOCK_FILE).exists()


@pytest.mark.parametrize("command", [["repair"], ["export"], ["export", "--power", "2"]])
def test_repair_or_export_of_a_run_being_written_is_one_line(command, undisturbed, capsys, monkeypatch):
    run_dir, _ = undisturbed
    with held_by_another_process(run_dir) as holder:
        before = tree_digest(run_dir)
        capsys.readouterr()  # what loading printed so far
        code, _, err = run_cli([*command, str(run_dir)], capsys, monkeypatch)
        assert tree_digest(run_dir) == before
    assert code == 2
    assert_in_use(err, f"RUN_DIR {run_dir}", holder.pid, "run --resume")
    assert not (run_dir / names.LOCK_FILE).exists()  # the holder ended and removed it


def test_repair_of_a_comparison_is_one_line_and_changes_nothing(tiny_llama, texts_file, tmp_path, undisturbed,
                                                                capsys, monkeypatch):
    other, _ = run_tiny(tiny_llama, texts_file, tmp_path / "b", num_samples=3, max_length=16)
    comparison, _ = compare_runs(undisturbed[0], other, tmp_path / "cmp")
    before = tree_digest(comparison)
    capsys.readouterr()  # what loading printed so far
    code, _, err = run_cli(["repair", str(comparison)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: RUN_DIR {comparison}: a comparison (raygrad compare), not a run; nothing "
                               "to repair")
    assert tree_digest(comparison) == before  # no lock file left either


# --- another host: its record counts while its heartbeat is fresh


def write_record(run_dir, host, heartbeat_age_s):
    beat = datetime.now().astimezone() - timedelta(seconds=heartbeat_age_s)
    record = {"pid": 4242, "host": host, "command": "raygrad run --resume",
              "since": (beat - timedelta(hours=3)).isoformat(timespec="seconds"),
              "heartbeat": beat.isoformat(timespec="seconds")}
    (run_dir / names.LOCK_FILE).write_text(json.dumps(record))
    return record


def test_another_hosts_fresh_record_is_honoured_and_a_stale_one_taken_over(tmp_path, caplog):
    """On NFS flock may not reach the other host, so the flock here succeeds: the record decides."""
    record = write_record(tmp_path, "node-elsewhere", heartbeat_age_s=lock_module.STALE_SECONDS - 60)
    before = tree_digest(tmp_path)
    with pytest.raises(RaygradError) as refused:
        with run_lock(tmp_path, "repair"):
            pass
    message = str(refused.value)
    assert message.startswith(f"RUN_DIR {tmp_path}: in use by pid 4242 on host node-elsewhere since "
                              f"{record['since']} (raygrad run --resume); wait for it to end; if it is gone, its "
                              f"lock is taken over 10 minutes after its last heartbeat ({record['heartbeat']})")
    assert "\n" not in message and tree_digest(tmp_path) == before

    write_record(tmp_path, "node-elsewhere", heartbeat_age_s=lock_module.STALE_SECONDS + 60)
    with caplog.at_level(logging.WARNING, logger="raygrad.lock"):
        with run_lock(tmp_path, "repair") as taken:
            mine = json.loads((tmp_path / names.LOCK_FILE).read_text())
    assert mine == taken and (mine["pid"], mine["host"], mine["command"]) == (os.getpid(), HOST, "raygrad repair")
    assert "taking over the lock of pid 4242 on host node-elsewhere" in caplog.text
    assert not (tmp_path / names.LOCK_FILE).exists()


def test_another_hosts_fresh_record_refuses_repair_of_a_run(undisturbed, capsys, monkeypatch):
    run_dir, _ = undisturbed
    try:
        write_record(run_dir, "node-elsewhere", heartbeat_age_s=5)
        before = tree_digest(run_dir)
        capsys.readouterr()  # what loading printed so far
        code, _, err = run_cli(["repair", str(run_dir)], capsys, monkeypatch)
        assert tree_digest(run_dir) == before
    finally:
        (run_dir / names.LOCK_FILE).unlink()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: RUN_DIR {run_dir}: in use by pid 4242 on host node-elsewhere since " in err


def test_a_holder_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    """So a driver that runs for hours is never taken for gone by another host."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    path = tmp_path / names.LOCK_FILE
    with run_lock(tmp_path, "run") as record:
        stale = (datetime.now().astimezone() - timedelta(hours=1)).isoformat(timespec="seconds")
        record_now = json.loads(path.read_text())
        with open(path, "r+") as handle:  # as if the heartbeats had stopped an hour ago
            handle.write(json.dumps({**record_now, "heartbeat": stale}).ljust(lock_module.RECORD_BYTES))
        deadline = time.monotonic() + 10
        while json.loads(path.read_text())["heartbeat"] == stale and time.monotonic() < deadline:
            time.sleep(0.05)
        refreshed = json.loads(path.read_text())
    assert refreshed["heartbeat"] != stale and lock_module._age(refreshed) < 5
    assert (refreshed["pid"], refreshed["since"]) == (os.getpid(), record["since"])
