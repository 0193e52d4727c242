"""The cluster workflow before paying for a cluster: a local autoscaling Ray
cluster (Ray's `fake_multinode` provider: a head with no CPUs, a GPU worker
node type that starts at zero nodes, every node a set of processes on this
machine bound to 127.0.0.1), `raygrad run --address ... --workers 2
--gpus-per-worker 1` against it, the nodes it scaled up, then everything
stopped by PID.

    python scripts/cluster_demo.py [raygrad run options...]   (make cluster-demo)

The GPUs are logical: the workers reserve them, the autoscaler starts nodes
for them, and the workers compute on the CPU (no CUDA here)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_PORT = 6379  # the fake provider's worker nodes join the head at this port, whatever is set

AUTOSCALING_CONFIG = {
    "cluster_name": "raygrad-fake",
    "max_workers": 3,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
        "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200_000_000},
                           "node_config": {}, "min_workers": 0, "max_workers": 3},
    },
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}

LOOPBACK_ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1, never the machine's own address
    "RAY_AUTH_MODE": "disabled",  # no token to mismatch between processes on loopback
}


def ray_executable() -> str:
    return str(Path(sys.executable).parent / "ray")


@contextlib.contextmanager
def fake_autoscaling_cluster(workdir: Path):
    """Starts the head (its autoscaler starts worker nodes on demand) and yields its address;
    stops the head and every process it started, by PID, and removes Ray's pointer to it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "autoscaling.json"  # JSON is YAML too
    config.write_text(json.dumps(AUTOSCALING_CONFIG))
    env = {**os.environ, **LOOPBACK_ENV}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-fake-", dir="/tmp"))
    head = subprocess.Popen(
        [ray_executable(), "start", "--head", f"--port={HEAD_PORT}", "--num-cpus=0", "--num-gpus=0",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         f"--autoscaling-config={config}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{HEAD_PORT}"
        _wait_for_head(address, env)
        yield address
    finally:
        _stop_tree(head.pid)
        head.wait(timeout=30)
        # `ray start` leaves a pointer to its cluster that a later ray.init() would follow.
        for pointer in (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster",
                        temp_dir / "ray_current_cluster"):
            pointer.unlink(missing_ok=True)


# Ray's GCS, raylets and agents take about 10 s to end on SIGTERM (measured on loopback); nothing of
# this throwaway cluster is worth the wait.
STOP_GRACE_SECONDS = 2.0


def _stop_tree(pid: int) -> None:
    """SIGTERM to a process and all its descendants (the head, the nodes its autoscaler
    started, their workers), then SIGKILL to whatever still runs after STOP_GRACE_SECONDS."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    processes = [*root.children(recursive=True), root]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE_SECONDS)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


def _wait_for_head(address: str, env: dict, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = subprocess.run([ray_executable(), "status", f"--address={address}"], env=env, capture_output=True,
                              text=True)
        if done.returncode == 0:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the fake cluster's head at {address} did not come up in {seconds:.0f} s")


def worker_nodes(address: str) -> int:
    """GPU worker nodes alive now."""
    import ray

    with _connected(address):
        return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0)


@contextlib.contextmanager
def _connected(address: str):
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(LOOPBACK_ENV)
        with fake_autoscaling_cluster(Path(tmp) / "cluster") as address:
            print(f"fake cluster at {address}: GPU worker nodes now: {worker_nodes(address)} (min_workers 0)")
            args = ["run", "--address", address, "--workers", "2", "--gpus-per-worker", "1",
                    "--model", "smollm2-135m", "--dataset", "stdlib-docs", "--num-samples", "16",
                    "--output-dir", str(Path(tmp) / "results"), *argv]
            print("raygrad " + " ".join(args), flush=True)
            done = subprocess.run([sys.executable, "-m", "raygrad.cli", *args])
            print(f"GPU worker nodes after the run: {worker_nodes(address)} (scaled up for the 2 workers)")
        print("fake cluster stopped")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
