"""The private local Ray a `--workers N` run starts on this machine, seen from outside: one real
`raygrad run --workers 2` in its own process (a Ray start and a worker cost seconds on a small
machine), with canary credentials in its environment, looked at while its pool is up, stopped by
SIGTERM after three checkpoints (a scheduler ending the job: ray.init would put its own handler in,
one that exits at once), and looked at after it ends (every file Ray and the run wrote). Each test
reads one part of it. The run measures SAE features, and the rest of it is resumed in this process,
so its sums are also the check that a worker actor loads and applies SAEs as this process does (two
Ray workers' MLP sums: test_cluster). Its SAEs are dictionary_learning directories: a worker loads
every format through the same registry, and this one needs no sae-lens import (sae-lens directories:
test_saes, test_sae_engine)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import assert_same_totals, many_texts_run_args, run_tiny, signal_after_checkpoints, write_many_texts
from sae_factory import write_dictionary_learning_dir

from raygrad import constants as names
from raygrad import engine
from raygrad.store.zarr_store import ResultStore

# Credentials in the driver's environment (made up): its workers must see them, and no file may hold them.
CANARIES = {"HF_TOKEN": "hf_canary_5f0c9e2b7a41", "AWS_ACCESS_KEY_ID": "AKIACANARY7Q3ZK2M",
            "AWS_SECRET_ACCESS_KEY": "canary-secret-9d8e7f6a5b4c", "AWS_SESSION_TOKEN": "canary-session-1a2b3c4d5e6f"}
SAE_LAYERS = (0, 2)

# `raygrad run` as its console script runs it (raygrad.cli:main), with the pool's exit looked through:
# by then its actors have run shards, and the SIGTERM is being handled.
LOCAL_RAY_RUN = """
import hashlib, json, os, sys
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as in a user's shell (the tests' conftest sets it)
import psutil
import ray
from raygrad import cli
from raygrad.cluster import pool

seen_file, probed, seen, real_exit = sys.argv[1], sys.argv[2].split(","), {}, pool.WorkerPool.__exit__

def exit_after_looking(self, *exc):
    seen["nodes"] = [node["NodeManagerAddress"] for node in ray.nodes()]
    listening = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:  # a short-lived helper may end between the listing and the reading
            listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    seen["listening"] = sorted(listening)
    # Each worker actor's environment, as digests: the values themselves travel nowhere.
    seen["worker env"] = ray.get([actor.__ray_call__.remote(lambda _, names: {
        name: hashlib.sha256(os.environ[name].encode()).hexdigest() if name in os.environ else None
        for name in names}, probed) for actor in self.actors])
    seen["session dir"] = ray._private.worker._global_node.get_session_dir_path()
    seen["worker PYTHONPATH"] = ray.get([actor.__ray_call__.remote(lambda _: os.environ.get("PYTHONPATH"))
                                         for actor in self.actors])
    seen["driver PYTHONPATH"] = os.environ.get("PYTHONPATH")
    return real_exit(self, *exc)

pool.WorkerPool.__exit__ = exit_after_looking
pythonpath_before = os.environ.get("PYTHONPATH")
from raygrad.cluster import runtime
real_kill = runtime._kill_autoscaler_monitor

def kill_and_look():
    processes = ray._private.worker._global_node.all_processes
    real_kill()
    seen["monitor ended, gcs up"] = ([info.process.poll() is not None for info in processes["monitor"]],
                                     [info.process.poll() is None for info in processes["gcs_server"]])

runtime._kill_autoscaler_monitor = kill_and_look
sys.argv = ["raygrad", *sys.argv[3:]]
try:
    cli.main()
finally:
    seen["ray initialized after"] = ray.is_initialized()
    seen["setting after"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    seen["PYTHONPATH before"] = pythonpath_before
    with open(seen_file, "w") as handle:
        json.dump(seen, handle)
"""


class LocalRayRun(NamedTuple):
    returncode: int
    out: str
    err: str
    seen: dict  # what the run saw at its pool's exit (LOCAL_RAY_RUN)
    run_dir: Path
    saved: list  # the shards done when it ended, one flag each
    followed: str  # the address a plain ray.init() would have followed
    expected: object  # the totals Partial of the same run undisturbed in this process
    files_seen: int  # the files searched for the canaries: Ray's temp directory's (its session's) and the run's
    canaries_found: list  # (file, variable) where a file held a canary's value


@pytest.fixture(scope="module")
def local_ray_run(tiny_llama, tmp_path_factory) -> LocalRayRun:
    """Run as a user would: Ray's default token authentication, credentials set (CANARIES), and a stale
    `ray_current_cluster` pointer (which `ray start` leaves in Ray's temp directory; a dead address
    there made a plain ray.init() hang) in a private RAY_TMPDIR (short: Ray's socket paths must fit
    107 bytes), which keeps the test off the machine's own. 48 texts, a shard each: the run is still
    going when its third checkpoint is seen."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private.services import canonicalize_bootstrap_address

    root = tmp_path_factory.mktemp("local-ray")
    dataset = write_many_texts(root / "many.txt")
    for layer in SAE_LAYERS:
        write_dictionary_learning_dir(root / "saes" / f"sae_{layer}", 32, 64, submodule_name=f"mlp_out_layer_{layer}",
                                      seed=layer)
    sae = dict(target="sae", sae_path=str(root / "saes" / "sae_{layer}"), layers=",".join(map(str, SAE_LAYERS)))
    # Checkpointed at the end only: the sums do not depend on when a run checkpoints.
    _, expected = run_tiny(tiny_llama, dataset, root / "undisturbed", num_samples=48, shard_size=1,
                           checkpoint_seconds=3600, **sae)
    private = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token auth on
    env.update(RAY_TMPDIR=str(private), HF_HUB_OFFLINE="1", **CANARIES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(private))
        pointer = Path(get_default_ray_temp_dir()) / "ray_current_cluster"
        assert pointer.parent.parent == private
        pointer.parent.mkdir(parents=True)
        pointer.write_text("127.0.0.1:1")  # nothing listens there
        followed = canonicalize_bootstrap_address(None)
    args = many_texts_run_args(tiny_llama, dataset, root / "out", 2, "--target", "sae", "--sae-path", sae["sae_path"],
                               "--layers", sae["layers"])
    try:
        process = subprocess.Popen([sys.executable, "-c", LOCAL_RAY_RUN, str(root / "seen.json"),
                                    ",".join([*CANARIES, "HF_HUB_OFFLINE"]), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out, err = signal_after_checkpoints(process, root / "out", signal.SIGTERM)
        searched = [*files_under(private), *files_under(root / "out")]
        found = [(str(path), name) for path in searched for name, value in CANARIES.items()
                 if value.encode() in path.read_bytes()]
        found += [(stream, name) for stream, text in (("stdout", out), ("stderr", err))
                  for name, value in CANARIES.items() if value in text]
    finally:
        shutil.rmtree(private, ignore_errors=True)
    (run_dir,) = (root / "out").iterdir()
    _, saved = ResultStore.open(run_dir / names.STORE_NAME).totals()
    return LocalRayRun(process.returncode, out, err, json.loads((root / "seen.json").read_text()), run_dir,
                       saved.tolist(), followed, expected, len(searched), found)


def files_under(root: Path) -> list[Path]:
    """Every regular file under `root` (Ray's sockets and the session_latest link left out)."""
    return [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()]


def test_a_local_ray_listens_on_loopback_only(local_ray_run):
    """Ray on Linux swaps 127.0.0.1 for the machine's address and listens on every
    interface unless told otherwise; a private run must be reachable from this machine only."""
    seen = local_ray_run.seen
    assert seen["nodes"] == ["127.0.0.1"]
    assert seen["listening"] and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert seen["setting after"] is None  # put back: a later --address run joins its cluster as usual


def test_sigterm_stops_a_local_ray_run_like_ctrl_c(local_ray_run):
    """raygrad's SIGTERM handler outlives ray.init: finished shards saved, the resume command said,
    exit 143, one line on stderr."""
    run = local_ray_run
    assert run.returncode == 128 + signal.SIGTERM, (run.returncode, run.err[-2000:])
    assert f"(Terminated: SIGTERM); continue with: raygrad run --resume {run.run_dir}" in run.out, run.out
    assert 3 <= sum(run.saved) < len(run.saved)


def test_a_local_ray_run_prints_no_ray_notices(local_ray_run):
    """Ray's start-up lines (token authentication, "Started a local Ray instance") said nothing a user
    could act on; a run with a local Ray prints only raygrad's own lines."""
    run = local_ray_run
    assert run.err.strip() == "terminated (SIGTERM)", run.err  # raygrad's own last word, and nothing else
    # raygrad's own first words ("waiting": a worker slow to start)
    ours = {"model", "site", "layers", "sae", "features", "collect", "samples", "skipped", "shards", "workers",
            "memory", "pinned", "output", "waiting", "stopped"}
    assert all(line.split()[0] in ours for line in run.out.splitlines()), run.out


def test_a_local_ray_s_workers_inherit_the_checkout_on_their_path_and_its_monitor_ends_first(local_ray_run):
    """The raylet is started with PYTHONPATH naming this checkout (so the workers it starts ahead of time
    serve the actors, which need no runtime_env), and the driver's own PYTHONPATH is put back. At the
    end the autoscaler monitor is killed while the GCS is still up (stopped after it, the monitor held
    every local run's end for a second)."""
    seen = local_ray_run.seen
    checkout = str(Path(engine.__file__).resolve().parent.parent)
    assert [path.split(os.pathsep)[0] for path in seen["worker PYTHONPATH"]] == [checkout, checkout]
    assert seen["driver PYTHONPATH"] == seen["PYTHONPATH before"]
    assert seen["monitor ended, gcs up"] == [[True], [True]]


def test_a_local_ray_ignores_a_stale_cluster_pointer(local_ray_run):
    run = local_ray_run
    assert run.followed == "127.0.0.1:1"  # where a plain ray.init() would have gone
    assert not run.seen["ray initialized after"]  # the local Ray the run started was shut down


def test_a_sigtermed_local_ray_run_resumed_here_equals_one_undisturbed_here(local_ray_run):
    """The shards the worker actors finished and those this process finishes add up to the sums of
    a run in this process: the SAE features' and the site's (MLP output) beside them."""
    run = local_ray_run
    engine.resume(run.run_dir, echo=lambda _: None, progress=False,
                  execution={"workers": 0, "checkpoint_seconds": 3600})  # at the end only, as `expected`
    totals, done = ResultStore.open(run.run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(run.expected, totals, rtol=1e-12)
    assert set(totals.sums) == set(run.expected.sums) >= {"grad_sum", "site_grad_sum"}
    assert totals.sums["grad_sum"].shape == (len(SAE_LAYERS), 64)


def test_workers_see_the_drivers_credentials_and_no_file_holds_them(local_ray_run):
    """Both worker actors read gated hub models and buckets with the driver's credentials (and honour its
    HF_HUB_OFFLINE), which they inherit from the Ray processes the driver started: no canary is in any
    file of Ray's session (runtime_env_agent.log held HF_TOKEN when it went through runtime_env) or of
    the run directory, nor in what the run printed."""
    run = local_ray_run
    expected = {name: hashlib.sha256(value.encode()).hexdigest() for name, value in {**CANARIES,
                                                                                        "HF_HUB_OFFLINE": "1"}.items()}
    assert run.seen["worker env"] == [expected, expected]
    session = Path(run.seen["session dir"])
    assert session.parent.parent.name.startswith("rg") and session.name.startswith("session_")  # the private one
    assert run.files_seen > 20  # Ray's logs and the run's store, not an empty directory
    assert run.canaries_found == []


# `raygrad run` whose worker computes its first three shards, then takes a minute over each: once three
# are saved, the driver is waiting in ray.wait (POLL_SECONDS at a time) for the next.
STALLING_RAY_RUN = """
import sys, time
from raygrad import cli
from raygrad.cluster import pool

class StallsAfterThree(pool.RemoteWorker):
    def run(self, shard, *args):
        if shard >= 3:
            time.sleep(60)
        return super().run(shard, *args)

pool.RemoteWorker = StallsAfterThree  # defined in __main__: Ray sends the class itself to the worker
sys.argv = ["raygrad", *sys.argv[1:]]
cli.main()
"""


def test_a_sigterm_while_the_driver_waits_on_ray_stops_the_run(tiny_llama, tmp_path):
    """The SIGTERM lands while the driver waits in ray.wait, so the CLI's handler raises inside Ray's
    Cython code: the run stops as it does for a SIGTERM anywhere else, with the stop line, the resume
    hint and exit 143. It ended in `SystemError: <cyfunction CoreWorker.wait ...> returned a result
    with an exception set`, a traceback and exit 1 (with --top-examples, in 16 of 16 tries)."""
    dataset = write_many_texts(tmp_path / "many.txt")
    private = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))  # Ray's files, off the machine's own
    env = {**os.environ, "RAY_TMPDIR": str(private)}
    args = many_texts_run_args(tiny_llama, dataset, tmp_path / "out", 1, "--top-examples", "4")
    try:
        process = subprocess.Popen([sys.executable, "-c", STALLING_RAY_RUN, *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        out, err = signal_after_checkpoints(process, tmp_path / "out", signal.SIGTERM)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    (run_dir,) = (tmp_path / "out").iterdir()
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, err[-2000:])
    assert err.strip() == "terminated (SIGTERM)", err[-2000:]  # no traceback
    assert out.splitlines()[-1] == (f"stopped  after 3 of 48 shards saved (Terminated: SIGTERM); continue with: "
                                    f"raygrad run --resume {run_dir}"), out
