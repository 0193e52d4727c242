"""The elastic worker pool on a multi-node Ray cluster on loopback: a 0-CPU head
and two 1-CPU worker nodes with one logical GPU each (the workers compute on
the CPU; conftest.GpuClusters). A test that only runs on it leaves it to the
next (the pool's own checks: slow loading, a shard that kills its worker, two
maps); one that removes nodes leaves what is left to a test that takes any
cluster; one that adds nodes shuts it down (its processes stopped) after it."""

import dataclasses

import numpy as np
import pytest
from helpers import assert_same_totals, build_config, killed_run, load_script, run_tiny

from raygrad import constants as names
from raygrad import engine
from raygrad.cluster import pool as pool_module
from raygrad.cluster import scheduler
from raygrad.cluster.pool import RemoteWorker, WorkerPool, WorkerTimeout
from raygrad.errors import RaygradError
from raygrad.store.reducer import Reducer
from raygrad.store.zarr_store import ResultStore


@pytest.fixture
def cluster_ray(gpu_clusters):
    """The `ray` module, this process connected to the loopback cluster (two GPU nodes) as a library
    caller's may be, for a test that runs on the cluster without changing it: the next test finds it up."""
    from conftest import connect_to

    cluster, nodes = gpu_clusters.get()
    ray = connect_to(cluster.address)
    try:
        yield ray
    finally:
        ray.shutdown()
    assert cluster.worker_nodes == set(nodes), "a test that removes or adds nodes asks for shrinking_gpu_cluster"


@pytest.fixture
def shrinking_gpu_cluster(gpu_clusters):
    """(cluster, its two GPU nodes) for a test that removes nodes: the next test that takes any
    cluster gets the nodes left."""
    import ray

    cluster, nodes = gpu_clusters.get()
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        left = [node for node in nodes if node in cluster.worker_nodes]
        if left:
            gpu_clusters.up = cluster, left
        else:
            gpu_clusters.close()


@pytest.fixture
def any_gpu_cluster(gpu_clusters):
    """(cluster, its GPU nodes, one or more) for a test that removes and adds nodes: shut down after it."""
    try:
        yield gpu_clusters.get(nodes=None)
    finally:
        gpu_clusters.close()


def assert_same_counts_and_close_sums(got, expected):
    np.testing.assert_array_equal(got.tokens, expected.tokens)  # a lost or repeated shard moves the counts
    assert got.loss_tokens == expected.loss_tokens
    for name in expected.sums:
        scale = np.abs(expected.sums[name]).max()
        np.testing.assert_allclose(got.sums[name], expected.sums[name], rtol=0, atol=1e-5 * scale, err_msg=name)


class SlowWorker(RemoteWorker):
    """A worker whose shards take a second: the other worker is up and busy when a node is removed."""

    def run(self, shard, *args):
        import time

        time.sleep(1.0)
        return super().run(shard, *args)


class SlowLoadingWorker(RemoteWorker):
    """Loads for 12 s, longer than --worker-timeout 10, as a large model being downloaded does on a
    cluster: a timeout counted from the pool's start or the placement would end the run while it
    loads (the pool looks every second). The timeout leaves a slow machine 10 s to start the actor's
    process: being placed."""

    def ready(self):
        import time

        time.sleep(12.0)
        return super().ready()


class ReadyWithoutLoading(RemoteWorker):
    """A worker that says it is ready without loading the model: where what is checked is the pool,
    each actor then costs a Ray worker, not a model load."""

    def ready(self):
        return {"device": "cpu", "load_seconds": 0.0, "sae_groups": None}


class DiesOnShardZero(ReadyWithoutLoading):
    """A worker whose process dies on shard 0 every time, as one out of host memory on a long text would.
    What is checked is how the pool counts its deaths, so each of its three processes is ready without
    loading the model."""

    def run(self, shard, *args):
        if shard == 0:
            import os

            os._exit(1)
        return super().run(shard, *args)


class AnswersWithoutComputing(ReadyWithoutLoading):
    """A worker that answers each shard with an empty result, folded as the head's SendOrder says (a
    call that only sends: shard None): what is checked is which shards the pool hands out and gets
    back, and to which actors, not what a shard computes."""

    def run(self, shard, source, ref, ticket, after, order=None):
        from raygrad.compute.folding import SendOrder
        from raygrad.store.partial import Partial, ShardResult

        computed = None if shard is None else ShardResult(shard, Partial.zeros(0, {}), 0.0, 0.0)
        return self._fold.take(computed, order or SendOrder(self._fold.fold or 0, True))


def remembered_pools(monkeypatch) -> list:
    pools, real_enter = [], WorkerPool.__enter__

    def remember(self):
        pools.append(self)
        return real_enter(self)

    monkeypatch.setattr(WorkerPool, "__enter__", remember)
    return pools


def test_gpu_workers_across_nodes_equal_in_process(two_ray_workers, in_process_totals):
    """Two workers, one on each GPU node (conftest.two_ray_workers): every array equals an in-process
    run's, examples included. (One worker on a private local Ray: test_local_ray.py.)"""
    from conftest import TWO_WORKERS

    local = in_process_totals(**TWO_WORKERS)
    assert_same_totals(local, two_ray_workers.totals)
    assert set(two_ray_workers.totals.examples) == set(local.examples) and local.examples
    store = ResultStore.open(two_ray_workers.run_dir / names.STORE_NAME)
    assert store.attrs["plan"]["workers"] == 2
    assert store.attrs["timing"]["worker_devices"] == ["cpu"]  # a logical GPU: each worker resolved the CPU
    assert two_ray_workers.ray_left_running  # a Ray the caller had initialized is left to it


def test_a_worker_loading_longer_than_the_timeout_is_waited_for(tiny_llama, texts_file, tmp_path, monkeypatch,
                                                               cluster_ray, in_process_totals):
    """--worker-timeout counts only while no worker is placed: not while one loads its model."""
    import sys

    from ray import cloudpickle

    local = in_process_totals()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pool_module, "RemoteWorker", SlowLoadingWorker)
    monkeypatch.setattr(scheduler, "POLL_SECONDS", 1.0)  # the pool looks at the clock every second
    try:
        _, remote = run_tiny(tiny_llama, texts_file, tmp_path / "ray", workers=1, worker_timeout=10)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert_same_totals(remote, local)


def test_a_shard_that_keeps_killing_its_worker_stops_the_run(tiny_llama, texts_file, tmp_path, monkeypatch,
                                                             cluster_ray):
    """Ray restarts a dead worker, and the pool queues its shard again; a shard that kills every worker
    would loop forever. After 3 losses the run stops with one line naming the shard, resumable."""
    import sys

    from ray import cloudpickle

    replaced = []

    def replace_once_at_most(self, lost):  # without the limit the pool replaces dead workers forever
        replaced.append(lost)
        assert len(replaced) < 2, "the pool kept replacing workers that die on the same shard"
        real_replace(self, lost)

    real_replace = WorkerPool.replace_actor
    monkeypatch.setattr(WorkerPool, "replace_actor", replace_once_at_most)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pool_module, "RemoteWorker", DiesOnShardZero)
    said = []
    config = build_config(tiny_llama, texts_file, tmp_path, workers=1, shard_size=1, num_samples=3)
    try:
        with pytest.raises(RaygradError, match=r"^shard 0 \(1 texts, rows \d+-\d+, about \d+ target tokens\) lost its "
                                               r"worker 3 "
                                               r"times \(last: .*\); a worker that dies on the same shard"):
            engine.run(config, echo=said.append, progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (run_dir,) = tmp_path.iterdir()
    assert said[-1].endswith(f"continue with: raygrad run --resume {run_dir}")
    assert sum(line.startswith("worker lost during shard 0") for line in said) == 2


def test_the_pool_maps_twice_with_the_same_workers(tiny_llama, texts_file, tmp_path, monkeypatch, cluster_ray):
    """Workers that came up for one map serve the next (a library caller may map in parts)."""
    import sys

    from ray import cloudpickle
    from transformers import AutoTokenizer

    from raygrad.cluster.pool import actor_name
    from raygrad.dataset.formats import describe_source
    from raygrad.dataset.shards import plan_shards
    from raygrad.plan import make_plan

    config = build_config(tiny_llama, texts_file, tmp_path, workers=1, worker_timeout=30)
    source = describe_source(str(texts_file))
    shards = plan_shards(source, 2, AutoTokenizer.from_pretrained(tiny_llama), 24, shard_texts=1).shards
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pool_module, "RemoteWorker", AnswersWithoutComputing)
    try:
        with WorkerPool(config) as pool:
            plan = make_plan(config, 2).placed(config, pool.workers, pool.device)
            pool.start_workers(plan, config.seed)
            first = [shard for result in pool.map([(0, source, shards[0])]) for shard in result.shards]
            actors = [actor_name(actor) for actor in pool.actors]
            second = [shard for result in pool.map([(1, source, shards[1])]) for shard in result.shards]
            assert [actor_name(actor) for actor in pool.actors] == actors and len(actors) == 1
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert first == [0] and second == [1]


def test_a_busy_worker_node_lost_mid_run_costs_nothing(shrinking_gpu_cluster, tiny_llama, texts_file, tmp_path,
                                                       monkeypatch, in_process_totals):
    cluster, nodes = shrinking_gpu_cluster
    local = in_process_totals(shard_size=1)
    pools, removed, real_add = remembered_pools(monkeypatch), [], Reducer.add

    def add_then_lose_a_node(self, result):
        real_add(self, result)
        pool = pools[-1]
        if not removed and pool.busy:  # after a shard: the node of a worker computing another one
            node_id = pool.worker_nodes[next(iter(pool.busy))]
            node = next(n for n in nodes if n.node_id == node_id)
            cluster.remove_node(node)
            removed.append(node)

    monkeypatch.setattr(Reducer, "add", add_then_lose_a_node)
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pool_module, "RemoteWorker", SlowWorker)
    said = []
    config = build_config(tiny_llama, texts_file, tmp_path / "ray", workers=2, gpus_per_worker=1,
                          address=cluster.address, shard_size=1)
    try:
        run_dir = engine.run(config, echo=said.append, progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert removed
    assert any(line.startswith("worker lost during shard") for line in said), said
    remote, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_counts_and_close_sums(remote, local)


def test_all_workers_lost_stops_then_resumes_on_a_new_node(any_gpu_cluster, tiny_llama, texts_file, tmp_path,
                                                           monkeypatch, in_process_totals):
    """One worker on the GPU nodes the test before left (or on one new node); every node goes, and
    no worker can be placed. --worker-timeout counts while no worker is placed, the first placement
    too (a Ray worker process starting can take over 8 s on the loaded 2-core machine: the run then
    stopped with 0 shards saved before any node was removed, as seen once): the run starts with 300 s
    and gets 8 once the nodes are gone."""
    cluster, nodes = any_gpu_cluster
    local = in_process_totals(shard_size=1)
    real_add, lost = Reducer.add, []
    pools = remembered_pools(monkeypatch)

    def add_then_lose_every_node(self, result):
        real_add(self, result)
        if not lost:
            for node in nodes:
                cluster.remove_node(node)
            lost.append(True)
            pools[-1].config = dataclasses.replace(pools[-1].config, worker_timeout=8)

    monkeypatch.setattr(Reducer, "add", add_then_lose_every_node)
    said = []
    config = build_config(tiny_llama, texts_file, tmp_path / "ray", workers=1, gpus_per_worker=1,
                          address=cluster.address, shard_size=1, worker_timeout=300, checkpoint_seconds=0)
    with pytest.raises(WorkerTimeout, match="--worker-timeout 8: no worker was placed in that time; asked for 1 x"):
        engine.run(config, echo=said.append, progress=False)
    (run_dir,) = (tmp_path / "ray").iterdir()
    assert said[-1].endswith(f"continue with: raygrad run --resume {run_dir}")
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert 1 <= done.sum() < len(done)

    monkeypatch.setattr(Reducer, "add", real_add)
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    engine.resume(run_dir, echo=lambda _: None, progress=False,
                  execution={"address": cluster.address, "workers": 1, "worker_timeout": 300})
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_counts_and_close_sums(resumed, local)


@pytest.mark.parametrize("call", ["wait", "get"])
def test_a_signal_inside_a_ray_call_raises_its_own_exception(cluster_ray, call):
    """A SIGTERM while this process waits in ray.wait or ray.get: the CLI's handler raises inside Ray's
    Cython code, which Python reported as `SystemError: <cyfunction CoreWorker.wait ...> returned a
    result with an exception set`; ray_runtime's calls raise the handler's Terminated itself."""
    import os
    import signal
    import threading

    from raygrad.cluster import runtime as ray_runtime
    from raygrad.errors import Terminated, raise_terminated

    def sleep(seconds):  # defined here: pickled by value (workers cannot import this test module)
        import time

        time.sleep(seconds)

    slow = cluster_ray.remote(num_cpus=0)(sleep).remote(1.5)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(Terminated):
            if call == "wait":
                ray_runtime.wait([slow], timeout=3.0)
            else:
                ray_runtime.get(slow)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)


SECRETS = {"HF_TOKEN": "hf_canary", "AWS_ACCESS_KEY_ID": "AKIACANARY", "AWS_SECRET_ACCESS_KEY": "canary-secret",
           "AWS_SESSION_TOKEN": "canary-session"}


@pytest.mark.parametrize("endpoint, forwarded", [("https://hub.example.org", True),
                                                 ("https://user:hf_canary@hub.example.org", False)])
def test_a_joined_cluster_gets_settings_not_credentials(monkeypatch, caplog, endpoint, forwarded):
    """--address: the runtime_env (which Ray logs and shows) carries the hub endpoint, offline switch and
    cache directory, never a credential; each node reads its own. An endpoint URL holding a password is
    a credential too, and stays with a warning that does not repeat it."""
    from types import SimpleNamespace

    from raygrad.cluster import runtime as ray_runtime
    from raygrad.config import RunConfig

    settings = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1", "RAYGRAD_CACHE": "/srv/cache"}
    for name, value in {**SECRETS, **settings}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ray_runtime, "wait_reachable", lambda address, timeout: None)
    joined = []
    fake_ray = SimpleNamespace(init=lambda **options: joined.append(options))
    assert ray_runtime.start_or_join(RunConfig(address="head:6379"), fake_ray) is None
    (options,) = joined
    if not forwarded:
        del settings["HF_ENDPOINT"]
    assert options["runtime_env"]["env_vars"] == settings
    assert options["runtime_env"]["py_modules"]  # workers import this raygrad
    assert "hf_canary" not in caplog.text and ("HF_ENDPOINT holds a user" in caplog.text) == (not forwarded)
    assert ray_runtime.local_runtime_env()["env_vars"].keys() == {"PYTHONPATH"}  # a local Ray's inherit the rest


def test_resume_refuses_an_option_that_changes_what_is_computed(tiny_llama, texts_file, tmp_path):
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path, shard_size=2), dies_at_call=2)  # on shard 1
    with pytest.raises(RaygradError, match="--layers would change what the run computes"):
        engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"layers": "0"})
    engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0, "worker_timeout": 5})
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()


def test_a_model_dispatched_by_accelerate_with_offload_gives_the_same_sums(tiny_llama, tmp_path):
    """Layers 1 and 2 offloaded to disk (accelerate's hooks load their weights at each forward):
    the same sums as the model loaded plainly."""
    import torch
    from tiny import SAMPLE_TEXTS

    from raygrad.compute.batch import Aggregation
    from raygrad.compute.batching import BatchSizer
    from raygrad.compute.worker import ShardComputer
    from raygrad.model.loading import execution_device, input_device, load_model_and_tokenizer, resolve_hook_sites

    cpu = torch.device("cpu")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    sums = []
    for placement in (None, {"device_map": device_map, "offload_folder": str(tmp_path / "offload")}):
        model, tokenizer = load_model_and_tokenizer(str(tiny_llama), cpu, torch.float64, placement)
        paths = [site.path for site in resolve_hook_sites(model, [0, 1, 2], "mlp_out")]
        if placement:
            assert hasattr(model.get_submodule("model.layers.1"), "_hf_hook")  # accelerate's offload hook
            assert input_device(model, cpu) == cpu and execution_device(model, paths[2], cpu) == cpu
        computer = ShardComputer(model, tokenizer, [model.get_submodule(p) for p in paths], {"grad": 32},
                                 Aggregation(), BatchSizer("texts", batch_size=3), 24, cpu)
        sums.append(computer.compute([t for t in SAMPLE_TEXTS if len(t) > 50]))
    plain, offloaded = sums
    assert offloaded.loss_tokens == plain.loss_tokens
    for name in plain.sums:
        np.testing.assert_allclose(offloaded.sums[name], plain.sums[name], rtol=1e-12, err_msg=name)


def test_workers_asked_for_scale_an_autoscaling_cluster_up_from_zero(tiny_llama, texts_file, tmp_path,
                                                                       monkeypatch, in_process_totals, gpu_clusters):
    """Ray's fake_multinode autoscaler, GPU node type with min_workers 0: the pending worker actor
    makes it start a node, and the run equals an in-process one."""
    gpu_clusters.close()  # a cluster an earlier test left up would share the machine with this one
    demo = load_script("scripts/cluster_demo.py", monkeypatch)
    for name, value in demo.LOOPBACK_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")  # the autoscaler looks every second (5 by default)
    local = in_process_totals(shard_size=1)
    with demo.fake_autoscaling_cluster(tmp_path / "cluster") as address:
        assert demo.worker_nodes(address) == 0  # nothing runs until raygrad asks
        _, remote = run_tiny(tiny_llama, texts_file, tmp_path / "ray", workers=1, gpus_per_worker=1,
                             address=address, shard_size=1, worker_timeout=240)
        assert demo.worker_nodes(address) >= 1
    assert_same_counts_and_close_sums(remote, local)
