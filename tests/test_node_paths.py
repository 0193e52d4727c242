"""A local dataset path on a multi-node cluster (cluster/node_check.py): every node that may host a
worker must see the file the plan pinned, or the run stops before any compute with one line naming the
node and the path.

The real case is a loopback cluster whose third node cannot see the head's dataset directory: its
raylet runs in a mount namespace of its own (`unshare -m`) with a tmpfs mounted over that directory,
so its workers find nothing there while the driver and the other node read the file. Where
`unshare` is not permitted, those tests are skipped; the others check the same function without it
(a file that changed after planning, which no node then sees as planned)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_same_totals, run_cli, run_tiny, tiny_args

from raygrad import constants as names
from raygrad.cluster import node_check
from raygrad.cluster.pool import WorkerPool
from raygrad.dataset.formats import arrow_dataset, describe_source
from raygrad.errors import RaygradError
from raygrad.model.pins import pin_dataset

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def unshare_refusal() -> str | None:
    """Why a mount namespace cannot be made here (None: it can)."""
    if not shutil.which("unshare"):
        return "no unshare command"
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"unshare -m is not permitted here: {done.stderr.strip()}"


def ray_address_file() -> Path:
    from ray._private.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


# A Ray worker node, run as `python -c NAMESPACED_NODE GCS_ADDRESS` (in the blind node's namespace): started
# as ray.cluster_utils.Cluster.add_node starts one, then kept until SIGTERM, when its processes are stopped.
NAMESPACED_NODE = """
import signal, sys, threading
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1,
    object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0, include_log_monitor=False,
    node_manager_port=0)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
stopped.wait()
node.kill_all_processes(check_alive=False, allow_graceful=True)
"""


class SplitCluster:
    """A 0-CPU head and node `seeing` (1 CPU, 1 logical GPU); then, from `add_blind`, node `blind`: the
    same, its raylet started in its own mount namespace with `hidden` covered by an empty tmpfs."""

    def __init__(self, hidden: Path, log: Path):
        from ray.cluster_utils import Cluster

        self.hidden, self.log, self.blind, self.blind_process = hidden, log, None, None
        address_file = ray_address_file()
        self._address_file_before = address_file.read_text() if address_file.exists() else None
        with pytest.MonkeyPatch.context() as patch:
            for name, value in LOOPBACK.items():
                patch.setenv(name, value)
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            self.seeing = self.cluster.add_node(num_cpus=1, num_gpus=1).node_id
            self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def add_blind(self, timeout: float = 120) -> str:
        """Start the blind node and wait until it is alive -> its node id."""
        import ray

        # `ray start` refuses to join a cluster while Ray is kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
        # so the node is started as ray.cluster_utils.Cluster.add_node starts one, inside the namespace.
        command = f"mount -t tmpfs none '{self.hidden}' && exec '{sys.executable}' -c \"$0\" {self.address}"
        self.blind_process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", command, NAMESPACED_NODE],
            env={**os.environ, **LOOPBACK}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"))
        known = {self.cluster.head_node.node_id, self.seeing}
        connected = ray.is_initialized()  # a driver's run may be going on in this process: asked through it
        if not connected:
            ray.init(address=self.address, log_to_driver=False)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                others = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] not in known]
                if others:
                    self.blind = others[0]
                    return self.blind
                if self.blind_process.poll() is not None:
                    raise RuntimeError(f"the namespaced node ended: {self.log.read_text()[-2000:]}")
                time.sleep(0.5)
            raise TimeoutError("the namespaced node did not join")
        finally:
            if not connected:
                ray.shutdown()

    def close(self) -> None:
        import ray

        ray.shutdown()
        if self.blind_process is not None and self.blind_process.poll() is None:
            self.blind_process.send_signal(signal.SIGTERM)  # NAMESPACED_NODE stops its node's processes
            try:
                self.blind_process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.blind_process.kill()
                self.blind_process.wait()
        self.cluster.shutdown()
        address_file = ray_address_file()  # Cluster's head wrote its address there, for ray.init("auto")
        if address_file.exists() and address_file.read_text() == self.address:
            if self._address_file_before is None:
                address_file.unlink()
            else:
                address_file.write_text(self._address_file_before)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, texts_file, gpu_clusters):
    """(SplitCluster, hidden dataset file, visible dataset file): the same texts in a directory the blind
    node cannot see and in one every node sees; the blind node is not up until a test adds it."""
    refusal = unshare_refusal()
    if refusal:
        pytest.skip(refusal)
    gpu_clusters.close()  # one loopback cluster at a time on this machine
    hidden = tmp_path_factory.mktemp("hidden-from-one-node") / "texts.txt"
    shared = tmp_path_factory.mktemp("seen-by-every-node") / "texts.txt"
    for path in (hidden, shared):
        shutil.copyfile(texts_file, path)
    cluster = SplitCluster(hidden.parent, tmp_path_factory.mktemp("blind-node") / "stderr.txt")
    try:
        yield cluster, hidden, shared
    finally:
        cluster.close()


@pytest.fixture
def split_cluster(two_node_cluster):
    """two_node_cluster with its blind node up."""
    if two_node_cluster[0].blind is None:
        two_node_cluster[0].add_blind()
    return two_node_cluster


def counted_actors(monkeypatch) -> list:
    """The actors the pool asks for, as they are asked for."""
    asked, real = [], WorkerPool._add_actor

    def add_actor(self):
        asked.append(self)
        return real(self)

    monkeypatch.setattr(WorkerPool, "_add_actor", add_actor)
    return asked


def test_a_dataset_changed_since_planning_is_refused_on_a_node(gpu_clusters, tiny_llama, texts_file, tmp_path,
                                                               capsys, monkeypatch):
    """Without a namespace: the file is rewritten (same size, other texts) between planning and the
    check, so no node holds the planned file, as a node with an older copy would not."""
    cluster, nodes = gpu_clusters.get()
    dataset = tmp_path / "texts.txt"
    shutil.copyfile(texts_file, dataset)
    actors = counted_actors(monkeypatch)
    real_start = WorkerPool.start_workers

    def start_after_a_change(self, plan, seed):
        original = dataset.read_bytes()
        dataset.write_bytes(original.swapcase())
        return real_start(self, plan, seed)

    monkeypatch.setattr(WorkerPool, "start_workers", start_after_a_change)
    out = tmp_path / "out"
    code, _, stderr = run_cli([*tiny_args(tiny_llama, dataset, out, "--address", cluster.address,
                                          "--gpus-per-worker", "1"), "--workers", "2"], capsys, monkeypatch)
    assert code != 0
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: --dataset {dataset}: node 127.0.0.1 ")
    named = line.split("Ray node ")[1][:12]
    assert named in {node.node_id[:12] for node in nodes}  # a node that can host a worker (not the 0-CPU head)
    planned = pin_dataset(str(texts_file))["digest"]  # the copy's digest, as planned
    assert f"holds another file there (digest {pin_dataset(str(dataset))['digest']}; the plan's, made on the " \
           f"driver: {planned})" in line
    assert actors == [] and not list(out.rglob(names.STORE_NAME))


def test_a_worker_on_a_node_not_yet_checked_checks_itself(gpu_clusters, tmp_path):
    """A node that joins after the check (an autoscaler's): the worker there checks before it loads
    anything; one on a node that passed does not read the file again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raygrad.cluster.runtime import local_runtime_env

    cluster, nodes = gpu_clusters.get()
    dataset = tmp_path / "texts.txt"
    dataset.write_text("a text that is long enough to be used by a run of the tiny model\n" * 3)
    plan = SimpleNamespace(dataset_revision=pin_dataset(str(dataset)))
    dataset.write_text("another text, changed after planning, as long as the text planned.\n" * 3)
    node = nodes[0].node_id

    @ray.remote(num_cpus=0)
    def check(verified):
        node_check.check_this_node(plan, verified)

    ray.init(address=cluster.address, log_to_driver=False, runtime_env=local_runtime_env())
    try:
        on_node = check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        ray.get(on_node.remote(frozenset([node])))  # passed before: not read again
        with pytest.raises(ray.exceptions.RayTaskError) as refused:
            ray.get(on_node.remote(frozenset()))
    finally:
        ray.shutdown()
    assert isinstance(refused.value.cause, RaygradError)
    message = str(refused.value.cause)
    assert message.startswith(f"--dataset {dataset}: node 127.0.0.1 ")
    assert f"Ray node {node[:12]}" in message and "holds another file there" in message


def test_a_node_that_joins_after_the_check_is_checked_by_its_worker(two_node_cluster, tiny_llama, tmp_path,
                                                                   capsys, monkeypatch):
    """As an autoscaler adds a node: the run starts on the head and node `seeing` alone (the check passes),
    a worker is still pending when the blind node joins, and the worker placed there checks before it
    loads anything: the run stops with the one line naming that node."""
    cluster, hidden, _ = two_node_cluster
    if cluster.blind is not None:
        pytest.skip("the blind node is up already: this test adds it during a run")
    pools, real_start = [], WorkerPool.start_workers

    def start_then_add_a_node(self, plan, seed):
        real_start(self, plan, seed)  # the check, then two workers asked for: one pending (one GPU node)
        pools.append(self)
        cluster.add_blind()

    monkeypatch.setattr(WorkerPool, "start_workers", start_then_add_a_node)
    code, _, stderr = run_cli(
        [*tiny_args(tiny_llama, hidden, tmp_path / "out", "--address", cluster.address, "--gpus-per-worker", "1"),
         "--workers", "2"], capsys, monkeypatch)
    assert pools[0].verified_nodes == {cluster.seeing}  # the blind node was not up for the check
    assert code != 0
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: --dataset {hidden}: node 127.0.0.1 ")
    assert f"Ray node {cluster.blind[:12]}" in line and "has no such file" in line


def test_a_node_that_cannot_see_the_path_stops_the_run_before_compute(split_cluster, tiny_llama, tmp_path,
                                                                      capsys, monkeypatch):
    cluster, hidden, _ = split_cluster
    actors = counted_actors(monkeypatch)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        [*tiny_args(tiny_llama, hidden, out, "--address", cluster.address, "--gpus-per-worker", "1"),
         "--workers", "2"], capsys, monkeypatch)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"error: --dataset {hidden}: node 127.0.0.1 ")
    assert f"Ray node {cluster.blind[:12]}" in line  # the node that cannot see it, not the one that can
    assert cluster.seeing[:12] not in line
    assert "has no such file" in line
    assert "s3://" in line and "the same file at that path on every node" in line
    assert "Traceback" not in stderr
    assert actors == []  # no worker was asked for, so no shard computed
    assert not list(out.rglob(names.STORE_NAME)), "no store is written"
    assert hidden.read_text()  # the driver's own file is there all along


def test_the_same_file_on_every_node_passes_the_check_and_runs(split_cluster, tiny_llama, tmp_path, monkeypatch,
                                                               in_process_totals):
    cluster, _, shared = split_cluster
    pools, real_start = [], WorkerPool.start_workers

    def start_workers(self, plan, seed):
        pools.append(self)
        return real_start(self, plan, seed)

    monkeypatch.setattr(WorkerPool, "start_workers", start_workers)
    _, totals = run_tiny(tiny_llama, shared, tmp_path / "out", workers=2, gpus_per_worker=1,
                         address=cluster.address, shard_size=2)
    assert pools[0].verified_nodes == {cluster.seeing, cluster.blind}  # both checked; the 0-CPU head hosts none
    assert_same_totals(totals, in_process_totals())


def test_one_node_that_the_driver_runs_on_is_not_checked(tmp_path, monkeypatch):
    """A private local Ray (one node, this machine's): the driver read the file there to plan, so no
    task is sent, and that node's workers check nothing."""
    import ray

    from raygrad.cluster.runtime import bind_to_loopback, restore_cluster_setting

    dataset = tmp_path / "texts.txt"
    dataset.write_text("x" * 100)
    plan = SimpleNamespace(dataset_revision=pin_dataset(str(dataset)))

    def no_task():
        raise AssertionError("a task was sent")

    monkeypatch.setattr(node_check, "_remote_answer", no_task)
    setting = bind_to_loopback()
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False,
                 log_to_driver=False)
        try:
            verified = node_check.verified_nodes(plan, 0, 1, client=False)
            assert verified == {ray.get_runtime_context().get_node_id()}
            with pytest.raises(AssertionError, match="a task was sent"):  # through ray://: checked even so
                node_check.verified_nodes(plan, 0, 1, client=True)
        finally:
            ray.shutdown()
    finally:
        restore_cluster_setting(*setting)


def test_the_per_node_check_sees_a_changed_missing_or_other_file(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("first text\n" * 10)
    pin = pin_dataset(str(data))
    assert node_check.problem_here(pin) is None
    data.write_text("other text\n" * 10)  # same size, other content
    assert node_check.problem_here(pin).startswith("holds another file there (digest ")
    data.unlink()
    assert node_check.problem_here(pin) == "has no such file"
    data.mkdir()
    assert node_check.problem_here(pin) == "has no regular file there"

    directory = tmp_path / "dataset-dir"
    directory.mkdir()
    (directory / "a.txt").write_text("one")
    pin = pin_dataset(str(directory))
    assert node_check.problem_here(pin) is None
    (directory / "a.txt").write_text("two")
    assert node_check.problem_here(pin) == "holds other files there (a.txt differs)"
    shutil.rmtree(directory)
    assert node_check.problem_here(pin) == "has no such directory"
    # anything not a local path is not checked
    for dataset in ("stdlib-docs", "s3://bucket/texts.parquet"):
        assert node_check.local_dataset_pin(SimpleNamespace(dataset_revision=pin_dataset(dataset))) is None


def test_a_dataset_directory_missing_on_a_node_is_not_taken_for_a_hub_id(tmp_path):
    directory = tmp_path / "saved-dataset"
    directory.mkdir()
    (directory / "part.txt").write_text("a text long enough to be kept by the filter of the run, twice over.\n")
    source = describe_source(str(directory))
    assert source["kind"] == "datasets"
    shutil.rmtree(directory)  # as on a node where it is not
    with pytest.raises(RaygradError) as refused:
        arrow_dataset(source)
    message = str(refused.value)
    assert message.startswith(f"--dataset {directory}: no such directory on this node")
    assert "hub" not in message
