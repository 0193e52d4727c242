import copy
import logging
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray on loopback only, one auth mode for every cluster of the session: Ray reads these once, at
# import, so a test that set them later would talk to a head with another mode and hang.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One compute thread per process (torch's, and its subprocesses' and Ray workers'): the suite runs in
# parallel processes on a small machine, where a second thread per process only spins waiting for a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch reads it when imported
if "torch" in sys.modules:  # imported before this file (by a plugin): too late for the setting
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Nothing here imports torch or transformers at import time: pytest-xdist's controller process loads
# this file before it starts its workers, and would spend seconds of a core importing them for nothing.


@pytest.fixture(autouse=True)
def seeded():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory) -> Path:
    from tiny import SAMPLE_TEXTS

    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(SAMPLE_TEXTS) + "\n")
    return path


@pytest.fixture(scope="session")
def in_process_totals(tiny_llama, texts_file, tmp_path_factory):
    """totals(**overrides) -> the totals Partial of helpers.run_tiny(tiny_llama, texts_file, ...,
    workers=0, **overrides): the baseline many tests compare with, run once per set of overrides
    in the session. Each call returns a copy, so a test may change what it gets."""
    from helpers import run_tiny

    done = {}

    def totals(**overrides):
        overrides.setdefault("workers", 0)
        assert overrides["workers"] == 0, "an in-process baseline"
        key = tuple(sorted(overrides.items()))
        if key not in done:
            done[key] = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("in-process"), **overrides)[1]
        return copy.deepcopy(done[key])

    return totals


def connect_to(address: str):
    """-> the `ray` module, this process connected to the loopback Ray cluster at `address` as a
    library caller's may be (a run in this process then uses it, and leaves it connected), its
    workers given what raygrad's own local Ray gives them."""
    import ray

    from raygrad.cluster.runtime import local_runtime_env

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, runtime_env=local_runtime_env())
    return ray


# The options of the one run on two Ray workers that several modules compare with their in-process
# references (helpers.run_tiny's, and these): the gradients and values of layers 0 and 2 with their
# top-8 examples and a 2-probe Hessian estimate, 2 texts a batch, 2 a shard (3 shards for 2 workers).
TWO_WORKERS = dict(layers="0,2", num_samples=6, max_length=12, batch_size=2, shard_size=2,
                   aggregate_by=("gradients", "values", "hessian"), hessian_probes=2, top_examples=8)


# --- a loopback Ray cluster with GPU nodes (test_cluster.py, and the one run on two Ray workers)


class GpuClusters:
    """One loopback cluster at a time, a 0-CPU head and 1-CPU nodes with one logical GPU each:
    started when a test asks and none is up, shut down after a test that changes it (a start costs a
    head and two nodes: seconds each on a small machine)."""

    def __init__(self):
        self.up = None  # (cluster, its worker nodes)

    def get(self, nodes: int | None = 2):
        """(cluster, its worker nodes): the one up if it has `nodes` GPU nodes (None: any number), else a
        new one (of one node for None)."""
        if self.up is not None and nodes is not None and len(self.up[1]) != nodes:
            self.close()
        if self.up is None:
            nodes = 1 if nodes is None else nodes
            from ray.cluster_utils import Cluster

            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
                patch.setenv("RAY_AUTH_MODE", "disabled")
                cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
                nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(nodes)]
                cluster.wait_for_nodes()
            self.up = cluster, nodes
        return self.up

    def close(self):
        import ray

        ray.shutdown()
        if self.up is not None:
            self.up[0].shutdown()
            self.up = None


@pytest.fixture(scope="session")
def gpu_clusters():
    clusters = GpuClusters()
    try:
        yield clusters
    finally:
        clusters.close()


class TwoWorkersRun(NamedTuple):
    run_dir: Path
    totals: object  # raygrad.store.partial.Partial
    ray_left_running: bool  # after the run: the pool used the Ray this process had initialized, and left it


@pytest.fixture(scope="session")
def two_ray_workers(tiny_llama, texts_file, tmp_path_factory, gpu_clusters) -> TwoWorkersRun:
    """helpers.run_tiny(..., workers=2, **TWO_WORKERS) on the loopback cluster's two GPU nodes, a
    worker on each, from a process already connected to the cluster (as a library caller's may be):
    two worker actors cost seconds each on a small machine, so one run serves every test that
    compares Ray workers with an in-process run of its own (sums, Hessian estimate, examples) and
    test_cluster's workers across nodes. Its tests share a pytest worker with test_cluster's
    (pytest_collection_modifyitems), which finds the cluster up. (--address: test_cluster's others.)"""
    import ray
    from helpers import run_tiny

    cluster, _ = gpu_clusters.get()
    connect_to(cluster.address)
    try:
        run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("two-ray-workers"), workers=2,
                                   gpus_per_worker=1, **TWO_WORKERS)
        return TwoWorkersRun(run_dir, totals, ray.is_initialized())
    finally:
        ray.shutdown()


@pytest.hookimpl(wrapper=True)  # a wrapper: before pytest-xdist's hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Under pytest-xdist's --dist loadgroup (make test), tests that share what is costly to set up
    share a pytest worker, which then sets it up once: the loopback cluster's (a test that leaves the
    cluster as it was passes it on; two_ray_workers' tests among them), and a module's tests that
    share a module-scoped fixture (a run made for several tests)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "gpu_clusters" in fixtures:
            item.add_marker(pytest.mark.xdist_group("gpu-cluster"))
        elif _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    return (yield)


def _uses_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(definition.scope == "module" for definitions in info.name2fixturedefs.values()
                                    for definition in definitions)
