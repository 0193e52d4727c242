"""A local dataset on a multi-node cluster: every node that will run a worker reads `--dataset` itself,
so before any shard is computed each one confirms it sees the file (or dataset directory) the plan
pinned, by the plan's own digest (model/pins.py: a file of up to 16 MiB hashed whole, a larger one by
its size and 16 sampled blocks, so checking a 100 GB file reads about 1 MiB of it).

Two checks, one rule:
- before the workers are asked for (`verified_nodes`, from pool.start_workers), one small Ray task
  on each live node that could host a worker, pinned there (NodeAffinitySchedulingStrategy);
- in each worker process, before it loads the model (`check_this_node`, from runtime.RemoteWorker),
  unless its node passed the first check: a node that joined later (an autoscaler's) or that did not
  answer in time is checked by its own workers before they are given a shard.
A node that does not see the planned file stops the run with one line naming the node and the path.
A dataset by URL, a hub id or the bundled corpus has nothing to check here (those pin themselves)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from pathlib import Path

from ..errors import RaygradError, first_line
from ..model.pins import directory_files, file_digest, what_changed

log = logging.getLogger(__name__)

CHECK_SECONDS = 120.0  # for the live nodes' answers; a node slower than this is checked by its own workers


def local_dataset_pin(plan) -> dict | None:
    """The plan's pin of a local dataset file or directory ({"kind": "local", "path", "digest"[, "files"]});
    None for anything else (a URL, a hub id, the bundled corpus, a plan from before pins)."""
    pin = getattr(plan, "dataset_revision", None) or {}
    return pin if pin.get("kind") == "local" and pin.get("path") else None


def problem_here(pin: dict) -> str | None:
    """Why this machine does not see the dataset `pin` names (missing, unreadable, or other content), as
    what a sentence says of the node ("has no such file"); None when it sees the planned one."""
    path = Path(pin["path"])
    directory = "files" in pin  # a dataset directory pins each file (pins._local_pin); a file, its digest
    try:
        if directory:
            if not path.is_dir():
                return "has no such directory" if not os.path.lexists(path) else "has no directory there"
            changed = what_changed(pin["files"], directory_files(path))
            return f"holds other files there ({changed})" if changed else None
        if not path.is_file():
            return "has no such file" if not os.path.lexists(path) else "has no regular file there"
        digest = file_digest(path)
    except OSError as err:
        return f"cannot read it ({err.strerror or first_line(err)})"
    if digest != pin["digest"]:
        return f"holds another file there (digest {digest}; the plan's, made on the driver: {pin['digest']})"
    return None


def refusal(pin: dict, node: dict, problem: str) -> str:
    """The one line that stops the run: the node, the path, what is wrong and what to do."""
    return (f"--dataset {pin['path']}: node {node['ip']} ({node['host']}, Ray node {node['node_id'][:12]}) "
            f"{problem}; a worker reads a local path on its own node: give the dataset as an object-store URI "
            "(s3://, gs://, az://, hf://...), or put the same file at that path on every node")


def this_node() -> dict:
    """Where this process runs: Ray's node id, the node's IP address and host name."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname()}


def check_this_node(plan, verified: frozenset[str] | None) -> None:
    """In a worker process, before it loads anything: raise the one line when its node does not see the
    planned dataset. `verified`: the nodes that need no check (verified_nodes; None: none was made, as
    for a worker built outside the pool)."""
    pin = local_dataset_pin(plan)
    if pin is None or verified is None:
        return
    node = this_node()
    if node["node_id"] in verified:
        return
    problem = problem_here(pin)
    if problem:
        raise RaygradError(refusal(pin, node, problem))


def _answer(pin: dict) -> tuple[dict, str | None]:
    """The task run on each node: (where it ran, its problem or None)."""
    return this_node(), problem_here(pin)


@functools.cache
def _remote_answer():
    import ray

    # No CPU reserved: it runs beside whatever the node runs, and a full node is checked too.
    return ray.remote(num_cpus=0, max_retries=0)(_answer)


def can_host(node: dict, gpus: int, cpus: int) -> bool:
    """Whether a live node of ray.nodes() has the resources of one worker."""
    resources = node.get("Resources", {})
    return bool(node.get("Alive")) and resources.get("GPU", 0) >= gpus and resources.get("CPU", 0) >= cpus


def verified_nodes(plan, gpus: int, cpus: int, client: bool, timeout: float = CHECK_SECONDS) -> frozenset[str]:
    """Check, on every live node that could host a worker of `gpus` GPUs and `cpus` CPUs, that it sees the
    plan's local dataset; raise the one line for the first that does not. -> the node ids that need no
    check in their workers: those that passed, or, on a cluster of one node that this driver runs on, that
    node alone, unchecked: the driver read the dataset there to plan it (the single machine and private
    local Ray case, which so costs nothing; a node an autoscaler adds later is checked by its workers).
    `client`: the driver joined through ray:// and shares no node's disk, so even one node is checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pin = local_dataset_pin(plan)
    if pin is None:
        return frozenset()  # nothing for a worker to check either (check_this_node)
    live = [node for node in ray.nodes() if node.get("Alive")]
    if not client and len(live) == 1 and live[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return frozenset([live[0]["NodeID"]])
    hosts = [node["NodeID"] for node in live if can_host(node, gpus, cpus)]
    asked = {_remote_answer().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
             .remote(pin): node_id for node_id in hosts}
    done, late = ray.wait(list(asked), num_returns=len(asked), timeout=timeout) if asked else ([], [])
    verified = set()
    for ref in done:
        try:
            node, problem = ray.get(ref)
        except Exception as err:  # the node died or left meanwhile: any worker Ray puts there checks itself
            log.info("dataset check on Ray node %s did not answer (%s)", asked[ref][:12], first_line(err))
            continue
        if problem:
            raise RaygradError(refusal(pin, node, problem))
        verified.add(node["node_id"])
    for ref in late:  # still starting a worker process: its workers check the dataset themselves
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    return frozenset(verified)
