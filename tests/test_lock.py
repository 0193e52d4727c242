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
from raygrad.analysis.compare import compare_runs
from raygrad.compute.worker import ShardRunner
from raygrad.errors import RaygradError
from raygrad.store import lock as lock_module
from raygrad.store.lock import run_lock
from raygrad.store.zarr_store import ResultStore

HOST = socket.gethostname()
# A process that takes RUN_DIR's lock as COMMAND would, says so, and holds it until its stdin closes.
HOLDER = """
import sys
from raygrad.store import lock
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
    with caplog.at_level(logging.WARNING, logger="raygrad.store.lock"):
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
    with caplog.at_level(logging.WARNING, logger="raygrad.store.lock"):
        with run_lock(tmp_path, "repair") as taken:
            mine = json.loads((tmp_path / names.LOCK_FILE).read_text())
    assert mine == taken.record
    assert (mine["pid"], mine["host"], mine["command"]) == (os.getpid(), HOST, "raygrad repair")
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
    with run_lock(tmp_path, "run") as held:
        record = held.record
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


# --- issue 24: a displaced holder stops; a planted lock file is never written through


def take_over_in_place(run_dir, host="node-elsewhere"):
    """What another host does where flock does not reach across hosts: it finds this process's record stale
    and rewrites the same file with its own (this process's flock, on its own host, does not stop it)."""
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    record = {"pid": 4242, "host": host, "command": "raygrad run --resume", "since": now, "heartbeat": now}
    with open(run_dir / names.LOCK_FILE, "r+") as handle:
        handle.write(json.dumps(record).ljust(lock_module.RECORD_BYTES) + "\n")
    return record


def displaced_message(record):
    return (f"its lock was taken over by pid 4242 on host {record['host']} since {record['since']} "
            f"({record['command']})")


def test_the_heartbeat_notices_a_takeover_and_every_write_in_the_run_directory_stops(tmp_path, monkeypatch, caplog):
    from raygrad.store.files import replacing

    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    outside = tmp_path / "elsewhere.txt"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="raygrad.store.lock"):
        with run_lock(run_dir, "run", "--output-dir") as held:
            lock_module.ensure_held(run_dir / "metadata.json")  # held: nothing happens
            record = take_over_in_place(run_dir)
            deadline = time.monotonic() + 10
            while held.taken_by is None and time.monotonic() < deadline:  # no write asks: the heartbeat sees it
                time.sleep(0.02)
            assert held.taken_by == record
            with pytest.raises(RaygradError) as stopped:
                with replacing(run_dir / "metadata.json") as handle:
                    handle.write(b"{}")
            with replacing(outside) as handle:  # a path outside the run directory is not its lock's
                handle.write(b"fine")
    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"--output-dir {run_dir}: {displaced_message(record)}")
    assert "the checkpoints it wrote stay valid" in message
    assert "taken over by pid 4242 on host node-elsewhere (raygrad run --resume" in caplog.text
    assert sorted(p.name for p in run_dir.iterdir()) == [names.LOCK_FILE]  # no metadata.json, no temporary
    assert json.loads((run_dir / names.LOCK_FILE).read_text()) == record  # left to its new holder
    assert outside.read_bytes() == b"fine"


def second_checkpoint_applied(store) -> bool:
    """Two shards done, read first, and then no redo file: the checkpoint that held them was applied
    whole (dropping the redo file is its last step). Looked at the other way round, a checkpoint
    committed between the two looks (its redo file read as done) was taken for applied, and a takeover
    landed while it was applied (its digests' record then refused): the run had saved one shard, not two."""
    return ResultStore.open(store).shards_done().sum() >= 2 and not (store / names.PENDING_CHECKPOINT).exists()


def test_a_displaced_run_stops_before_its_next_checkpoint_and_its_store_verifies(tiny_llama, texts_file, tmp_path,
                                                                                capsys, monkeypatch):
    """The takeover lands while the third of four shards computes; the first two are checkpointed. The run
    writes nothing more (no checkpoint, no finalize, no export), says who took it over, and what it wrote
    before still verifies."""
    out_dir = tmp_path / "out"
    real_run, calls, seen = ShardRunner.run, [], {}

    def taken_over_at_the_third(self, shard, *args):
        calls.append(shard)
        if len(calls) == 3:
            (run_dir,) = out_dir.iterdir()
            store = run_dir / names.STORE_NAME
            deadline = time.monotonic() + 60  # the second shard's checkpoint lands (it is written off-thread)
            while time.monotonic() < deadline and not second_checkpoint_applied(store):
                time.sleep(0.02)
            seen["before"] = tree_digest(store)
            seen["record"] = take_over_in_place(run_dir)
        return real_run(self, shard, *args)

    monkeypatch.setattr(ShardRunner, "run", taken_over_at_the_third)
    from helpers import tiny_args

    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, out_dir, "--shard-size", "1",
                                       "--checkpoint-seconds", "0"), capsys, monkeypatch)
    (run_dir,) = out_dir.iterdir()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --output-dir {run_dir}: {displaced_message(seen['record'])}"), lines[0]
    # not a run to resume from here: the stop line says whose it is now, and no resume hint
    assert out.strip().splitlines()[-1] == ("stopped  after 2 of 4 shards saved by this process; the run goes on "
                                            "in the process that took its lock over")
    store = run_dir / names.STORE_NAME
    assert tree_digest(store) == seen["before"]  # not one byte written after the takeover
    _, done = ResultStore.open(store).totals()  # verifies every digest
    assert done.tolist() == [True, True, False, False]
    assert not (run_dir / names.METADATA_JSON).exists()
    assert json.loads((run_dir / names.LOCK_FILE).read_text()) == seen["record"]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("command", [["export"], ["repair"]])
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_unchanged(link, command, undisturbed, tmp_path,
                                                                           capsys, monkeypatch):
    run_dir, _ = undisturbed
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock_path = run_dir / names.LOCK_FILE
    (lock_path.symlink_to if link == "symlink" else lock_path.hardlink_to)(victim)
    try:
        before = tree_digest(run_dir)
        capsys.readouterr()  # what loading printed so far
        code, _, err = run_cli([*command, str(run_dir)], capsys, monkeypatch)
        assert tree_digest(run_dir) == before
    finally:
        lock_path.unlink()
    assert victim.read_text() == "precious\n"
    what = "a symbolic link" if link == "symlink" else "a hard link (2 names for one file)"
    assert code == 2 and err.strip().splitlines() == [
        f"error: RUN_DIR {run_dir}: its lock file {lock_path} is {what}; raygrad writes its lock record only "
        "into a file of its own: remove it, then run the command again"], err
