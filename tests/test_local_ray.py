"""The private local Ray a `--workers N` run starts on this machine, seen from outside: one real
`raygrad run --workers 1` in its own process (a Ray start and a worker cost seconds on a small
machine), looked at while its pool is up and after it ends. Each test reads one part of it. It
measures SAE features, so its sums are also the check that a worker actor loads and applies SAEs
as this process does (two Ray workers' MLP sums: test_engine)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import assert_same_totals
from sae_factory import write_sae_lens_dir

from raygrad import constants as names
from raygrad.store import ResultStore

HF_TOKEN = "hf_test_token_123"
SAE_LAYERS = (0, 2)

# `raygrad run` as its console script runs it (raygrad.cli:main), with the pool's exit looked through:
# by then its actor has run a shard.
LOCAL_RAY_RUN = """
import json, os, sys
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as in a user's shell (the tests' conftest sets it)
import psutil
import ray
from raygrad import cli, pool

seen_file, seen, real_exit = sys.argv[1], {}, pool.WorkerPool.__exit__

def exit_after_looking(self, *exc):
    seen["nodes"] = [node["NodeManagerAddress"] for node in ray.nodes()]
    listening = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:  # a short-lived helper may end between the listing and the reading
            listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    seen["listening"] = sorted(listening)
    seen["worker env"] = ray.get(ray.remote(num_cpus=0)(  # the worker actor holds the CPUs asked for
        lambda: (os.environ.get("HF_TOKEN"), os.environ.get("HF_HUB_OFFLINE"))).remote())
    return real_exit(self, *exc)

pool.WorkerPool.__exit__ = exit_after_looking
sys.argv = ["raygrad", *sys.argv[2:]]
try:
    cli.main()
finally:
    seen["ray initialized after"] = ray.is_initialized()
    seen["setting after"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    with open(seen_file, "w") as handle:
        json.dump(seen, handle)
"""


@pytest.fixture(scope="module")
def local_ray_run(tiny_llama, texts_file, tmp_path_factory):
    """-> (finished process, what it saw, its run directory, the address a plain ray.init() would
    have followed, its SAE options). Run as a user would: Ray's default token authentication, HF_TOKEN set, and a
    stale `ray_current_cluster` pointer (which `ray start` leaves in Ray's temp directory; a dead
    address there made a plain ray.init() hang) in a private RAY_TMPDIR (short: Ray's socket paths
    must fit 107 bytes), which keeps the test off the machine's own."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private.services import canonicalize_bootstrap_address

    root = tmp_path_factory.mktemp("local-ray")
    for layer in SAE_LAYERS:
        write_sae_lens_dir(root / "saes" / f"sae_{layer}", 32, 64, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    sae = dict(target="sae", sae_path=str(root / "saes" / "sae_{layer}"), layers=",".join(map(str, SAE_LAYERS)))
    private = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token auth on
    env.update(RAY_TMPDIR=str(private), HF_TOKEN=HF_TOKEN, HF_HUB_OFFLINE="1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(private))
        pointer = Path(get_default_ray_temp_dir()) / "ray_current_cluster"
        assert pointer.parent.parent == private
        pointer.parent.mkdir(parents=True)
        pointer.write_text("127.0.0.1:1")  # nothing listens there
        followed = canonicalize_bootstrap_address(None)
    # The options of helpers.build_config, so the sums equal in_process_totals(shard_size=2, **sae).
    args = ["run", "--model", str(tiny_llama), "--dataset", str(texts_file), "--num-samples", "6",
            "--batch-size", "3", "--max-length", "24", "--dtype", "float64", "--shard-size", "2",
            "--target", "sae", "--sae-path", sae["sae_path"], "--layers", sae["layers"],
            "--workers", "1", "--output-dir", str(root / "out"), "--no-progress"]
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_RAY_RUN, str(root / "seen.json"), *args],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (root / "out").iterdir()
    return done, json.loads((root / "seen.json").read_text()), run_dir, followed, sae


def test_a_local_ray_listens_on_loopback_only(local_ray_run):
    """Ray on Linux swaps 127.0.0.1 for the machine's address and listens on every
    interface unless told otherwise; a private run must be reachable from this machine only."""
    _, seen, _, _, _ = local_ray_run
    assert seen["nodes"] == ["127.0.0.1"]
    assert seen["listening"] and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert seen["setting after"] is None  # put back: a later --address run joins its cluster as usual


def test_a_local_ray_run_prints_no_ray_notices(local_ray_run):
    """Ray's start-up lines (token authentication, "Started a local Ray instance") said nothing a user
    could act on; a run with a local Ray prints only raygrad's own lines."""
    done, _, _, _, _ = local_ray_run
    assert done.stderr.strip() == "", done.stderr
    # raygrad's own first words ("waiting": a worker slow to start)
    ours = {"model", "site", "layers", "sae", "features", "collect", "samples", "skipped", "shards", "workers",
            "memory", "pinned", "output", "waiting", "done", "results"}
    assert all(line.split()[0] in ours for line in done.stdout.splitlines()), done.stdout


def test_a_local_ray_ignores_a_stale_cluster_pointer(local_ray_run, in_process_totals):
    _, seen, run_dir, followed, sae = local_ray_run
    assert followed == "127.0.0.1:1"  # where a plain ray.init() would have gone
    assert not seen["ray initialized after"]  # the local Ray the run started was shut down
    totals, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    local = in_process_totals(shard_size=2, **sae)
    assert_same_totals(local, totals)  # the SAE features' sums and the site's (MLP output) beside them
    assert set(totals.sums) == set(local.sums) >= {"grad_sum", "site_grad_sum"}
    assert totals.sums["grad_sum"].shape == (len(SAE_LAYERS), 64)


def test_the_driver_forwards_hub_credentials_to_its_workers(local_ray_run):
    """Workers read gated hub models with the driver's HF_TOKEN (and honour its HF_HUB_OFFLINE)."""
    _, seen, _, _, _ = local_ray_run
    assert seen["worker env"] == [HF_TOKEN, "1"]
