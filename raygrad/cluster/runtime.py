"""The Ray runtime under the pool: a private local Ray bound to loopback, or a cluster joined by
--address; the SIGTERM handler kept across ray.init, and a signal's exception raised as itself from
inside a Ray call (wait, get); the reaper that ends a SIGKILLed driver's local Ray; the actor around
a ShardRunner and the order its calls compute in; what the cluster offers. No scheduling here
(pool.py, scheduler.py).

No credential goes into a runtime_env: Ray writes it to its session's logs (runtime_env_agent.log)
and shows it in its dashboard and state API. A local Ray's processes are children of this one, so
its workers inherit this process's environment, credentials included; on a joined cluster each node
reads its own (README, "On a Ray cluster")."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

from ..compute.folding import SendOrder, ShardFold  # torch-free: the actor imports torch only to load
from ..config import RunConfig, is_ascii_count
from ..errors import RaygradError, first_line
from ..plan import Plan
from .node_check import check_this_node

if TYPE_CHECKING:
    from ..compute.worker import ShardRunner
    from ..store.partial import ShardResult

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # raygrad/: what workers import, shipped to a joined cluster
# Settings, not secrets, that a joined cluster's workers get from the driver (in runtime_env, which
# Ray logs): the hub the plan's revisions were pinned on, whether to reach it at all, and where the
# bundled model's converted weights are cached. Credentials (HF_TOKEN, AWS_*) never travel: each node
# reads its own.
FORWARDED_SETTINGS = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "RAYGRAD_CACHE")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ComputeTurns:
    """The order an actor's calls compute in: the order the driver sent them, whichever call read its
    rows first, one at a time. So a process that dies was computing the oldest call it had not
    finished, the one scheduler.py charges the loss to.

    Each call carries a ticket (increasing, from the driver) and `after`: the ticket of the last call
    sent to this actor, when the driver still awaited a call on it, else None (a head). A call
    computes once the call it follows has computed or failed. The driver sends a head only when it has no call in flight
    on the actor, so a head means every call with a smaller ticket was given up (its result would be
    dropped): those not yet computing return at once, and one waiting on a call that never arrived
    (lost in transit) is not left waiting for ever."""

    def __init__(self):
        self._changed = threading.Condition()
        self._newest_head = -1  # tickets start at 0
        self._passed: int | None = None  # the ticket of the call that computed (or failed) last
        self._computing = False

    @contextlib.contextmanager
    def turn(self, ticket: int, after: int | None) -> Iterator[bool]:
        """Wait for this call's turn -> True, and computing is this call's until the block ends; or
        -> False at once for a call the driver gave up on (nothing to compute)."""
        with self._changed:
            if after is None and ticket > self._newest_head:
                self._newest_head = ticket
                self._changed.notify_all()
            self._changed.wait_for(lambda: ticket < self._newest_head or (
                not self._computing and (after is None or after == self._passed)))
            live = ticket >= self._newest_head
            if live:
                self._computing = True
        try:
            yield live
        finally:
            if live:
                with self._changed:
                    self._computing, self._passed = False, ticket
                    self._changed.notify_all()


class RemoteWorker:
    """The Ray actor around a ShardRunner. The constructor only keeps the plan,
    so `placed` answers as soon as the actor has a node; `ready` loads the model
    (minutes for a large one being downloaded) and raises a load failure, which
    the driver reports as the run's error (a failing constructor would look like
    a lost node and be retried)."""

    # Threaded (max_concurrency=2): two calls at a time, so `placed` answers while `ready` loads, and
    # the next shard is read and tokenized while this one computes; computing is one shard at a
    # time, in the order the driver sent them (ComputeTurns), on the actor's own compute thread.

    def __init__(self, plan: Plan, seed: int, verified_nodes: frozenset[str] | None = None):
        self.plan, self.seed, self.runner = plan, seed, None
        self.verified_nodes = verified_nodes  # nodes that need not check a local dataset again (node_check.py)
        self._loading = threading.Lock()  # one ShardRunner, however many calls arrive at once
        self._turns = ComputeTurns()
        # The model loads and every shard computes on this one thread, whichever of Ray's two threads took
        # the call: torch's OpenMP keeps a team of threads per calling thread, and with two teams (more
        # threads than cores here) OpenMP stops spinning at its barriers and parks its threads, which
        # made the actor compute about 7% slower than the same shards in one process (measured).
        self._compute_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raygrad-compute")
        self._fold = ShardFold()  # the shards computed here and not yet sent, as one partial

    def placed(self) -> tuple[str, str]:
        """-> (its node, its process): Ray's worker id names the process, a new one after each restart."""
        import ray

        context = ray.get_runtime_context()
        return context.get_node_id(), context.get_worker_id()

    def ready(self) -> dict:
        runner = self._runner()
        return {"device": str(runner.device), "load_seconds": runner.load_seconds, "sae_groups": runner.sae_groups}

    def run(self, shard: int | None, source: dict, ref, ticket: int, after: int | None,
            order: SendOrder | None = None) -> ShardResult | None:
        """-> the shard folded into this worker's running partial, answered as an acknowledgement or, when
        `order` says send (None: send), as everything folded (compute/folding.py); None for a call the
        driver gave up on (ComputeTurns: `ticket`, `after`). `shard` None: only send what is folded. The
        fold happens in the call's turn, so a process that dies was computing the head's shard, never
        folding an earlier one."""
        order = order or SendOrder(self._fold.fold or 0, True)
        try:
            runner = self._runner()
            prepared = None if shard is None else runner.prepare(shard, source, ref)  # beside the one computing
        except BaseException:
            with self._turns.turn(ticket, after):  # in its turn even so: the call sent next waits for this one
                raise
        with self._turns.turn(ticket, after) as live:
            if not live:
                return None
            computed = None if prepared is None else self._on_compute_thread(runner.compute, prepared)
            return self._fold.take(computed, order)

    def absorb(self, sent: list, ticket: int, after: int | None, order: SendOrder) -> tuple[bool, str]:
        """Fold another worker's sent partial into this one's (ShardFold.absorb) -> (True, ""), or (False,
        why) when it cannot be had (that worker was lost before or after sending), this fold unchanged.
        `sent`: [the ref of the other worker's call that sends], inside a list so that Ray hands it over
        unresolved and its failure is this call's answer, not its error; `ray.get` here pulls the partial
        from the other worker's node, never through the head's."""
        import ray
        from ray.exceptions import RayError

        with self._turns.turn(ticket, after) as live:
            if not live:
                return False, "the driver gave this call up"
            try:
                other = ray.get(sent[0])
            except RayError as err:
                return False, first_line(err)
            if other is None:
                return False, "the other worker gave its call up"
            self._fold.absorb(other, order)
            return True, ""

    def _runner(self) -> ShardRunner:
        with self._loading:
            if self.runner is None:  # also after Ray restarted this actor, perhaps on another node
                from ..compute.worker import ShardRunner  # torch and the model load in the actor, not at its import

                check_this_node(self.plan, self.verified_nodes)  # before any load: a node without the dataset stops
                self.runner = self._on_compute_thread(ShardRunner, self.plan, self.seed)
            return self.runner

    def _on_compute_thread(self, function, *args):
        """function(*args) on the actor's one compute thread; its result, or its exception raised here."""
        return self._compute_thread.submit(function, *args).result()


def forwarded_settings() -> dict[str, str]:
    """The driver's FORWARDED_SETTINGS that a joined cluster's workers get. An HF_ENDPOINT with a user
    or password in its URL is a credential, and stays here."""
    settings = {name: os.environ[name] for name in FORWARDED_SETTINGS if name in os.environ}
    endpoint = urlsplit(settings.get("HF_ENDPOINT", ""))
    if endpoint.username is not None or endpoint.password is not None:
        del settings["HF_ENDPOINT"]
        log.warning("HF_ENDPOINT holds a user or password: not passed to the workers; set it on each node")
    return settings


def local_python_path() -> str:
    """The PYTHONPATH with which workers on this machine import raygrad from wherever this driver does
    (a checkout works too)."""
    return os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))


def local_runtime_env() -> dict:
    """The runtime_env of a driver joining a Ray whose nodes run on this machine (a test's loopback
    cluster): local_python_path. Nothing else: the rest of the environment they inherit."""
    return {"env_vars": {"PYTHONPATH": local_python_path()}}


@contextlib.contextmanager
def python_path_inherited() -> Iterator[None]:
    """PYTHONPATH set to local_python_path while a private local Ray starts: its raylet inherits it, and
    so every worker it starts, the ones it starts ahead of time included. Given in a runtime_env
    instead, an actor needs a worker of its own, started after it is asked for (0.6 s later, measured)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = local_python_path()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def start_or_join(config: RunConfig, ray) -> tuple | None:
    """ray.init: join --address, else start a private local Ray bound to loopback. -> what
    `bind_to_loopback` changed (for `stop`), None when a cluster was joined."""
    if config.address:
        wait_reachable(config.address, config.connect_timeout)
        try:
            ray.init(address=config.address, log_to_driver=False, logging_level=logging.ERROR,
                     runtime_env={"py_modules": [str(PACKAGE_DIR)], "env_vars": forwarded_settings()})
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise RaygradError(f"--address {config.address}: cannot join that Ray cluster "
                               f"({first_line(err)})") from None
        return None
    # address="local": never follow RAY_ADDRESS or a `ray_current_cluster` file left
    # by another process (a stale one made runs hang); --address names a cluster.
    # logging_level: Ray's start-up notices (token authentication, "Started a local Ray
    # instance") say nothing a raygrad user can act on; warnings about the run still show.
    # Its GCS and raylet start as children of this process, with os.environ as it is now, and the
    # raylet starts the workers with its own: they see this process's credentials.
    loopback_setting = bind_to_loopback()
    try:
        with python_path_inherited():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)
    except BaseException:
        restore_cluster_setting(*loopback_setting)
        raise
    start_reaper()  # ends this Ray's processes if this process is SIGKILLed
    return loopback_setting


def stop(loopback_setting: tuple | None) -> None:
    """Shut down the Ray this process started (and put back what bind_to_loopback changed)."""
    import ray

    with signals_raised_plainly():
        if loopback_setting is not None:  # a private local Ray: this process started its processes
            _kill_autoscaler_monitor()
        ray.shutdown()
    if loopback_setting is not None:
        restore_cluster_setting(*loopback_setting)


def _kill_autoscaler_monitor() -> None:
    """End a private local Ray's autoscaler monitor before ray.shutdown, which stops the GCS first: the
    monitor, sent SIGTERM after it, waits to report its end to that GCS until Ray kills it a second
    later, one second of every local run's end (measured: shutdown 1.36 s, 0.19-0.34 s with this). It
    has nothing to scale on one machine. Reads Ray's process table (a private attribute): where a Ray
    release moves it, the shutdown is as before."""
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", "monitor"), []):
        process = getattr(info, "process", None)
        if process is None or process.poll() is not None:
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=5)


def cluster_offer() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return (f"GPU {free.get('GPU', 0):g} free of {total.get('GPU', 0):g}, "
            f"CPU {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}, {len(ray.nodes())} node(s)")


_reaper = None  # one per driver process: it outlives every local Ray this process starts


def start_reaper() -> None:
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        import sys

        _reaper = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reaper.py")), str(os.getpid())],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)


def actor_name(actor) -> str:
    return actor._actor_id.hex()


def get(ref):
    """ray.get, with a worker's own one-line error (a model it cannot load, a GPU too small)
    raised as that line rather than Ray's wrapper and the remote traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        with signals_raised_plainly():
            return ray.get(ref)
    except RayTaskError as err:
        if isinstance(err.cause, RaygradError):
            raise RaygradError(str(err.cause)) from None
        raise


def wait(refs: list, timeout: float) -> list:
    """ray.wait for the first of `refs` to be ready: -> [that ref], or [] after `timeout` seconds."""
    import ray

    with signals_raised_plainly():
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return ready


@contextlib.contextmanager
def signals_raised_plainly():
    """Around a Ray call that blocks the main thread. A signal handler that raises (the CLI's SIGTERM
    handler, Ctrl-C's KeyboardInterrupt) may run inside Ray's Cython code, which then returns as if
    nothing happened, and Python reports `SystemError: <cyfunction CoreWorker.wait ...> returned a
    result with an exception set`, the handler's exception as its cause. Raise that exception itself,
    so the run stops as it does for a signal anywhere else."""
    try:
        yield
    except SystemError as err:
        cause = err.__cause__
        if isinstance(cause, BaseException) and not isinstance(cause, Exception):  # a signal's, not a bug's
            raise cause.with_traceback(cause.__traceback__) from None
        raise


def bind_to_loopback() -> tuple[str | None, bool]:
    """Keep a private local Ray on 127.0.0.1. On Linux Ray replaces a loopback
    `_node_ip_address` with the machine's own address and listens on every
    interface, unless its "cluster" switch is off (the switch macOS and Windows
    default to). The Ray processes read it from the environment, this process
    from a constant set when Ray was imported. -> what to put back."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    return before


def restore_cluster_setting(environment_value: str | None, constant: bool) -> None:
    """Undo bind_to_loopback, so a later --address run in this process joins its cluster as usual."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    if environment_value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = environment_value
    ray_constants.ENABLE_RAY_CLUSTER = constant


@contextlib.contextmanager
def sigterm_handler_kept():
    """ray.init replaces the SIGTERM handler with one that exits at once; keep a
    handler of the caller's own, such as the CLI's, which stops like Ctrl-C
    (finished shards saved, the resume command said). Without one, Ray's stays."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers, and Ray then sets none
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler):  # not SIG_DFL, SIG_IGN, or None (set outside Python)
            signal.signal(signal.SIGTERM, handler)


def wait_reachable(address: str, timeout: float) -> None:
    """Wait until something listens at `address` (host:port or ray://host:port), for at most
    `timeout` seconds; ray.init itself would wait minutes on an address where nothing answers."""
    import socket

    if address == "auto":
        return  # Ray resolves it from this node's own files, and fails fast when there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not is_ascii_count(port) or not 0 < int(port) < 65536:  # '²' passes isdigit, not int()
        raise RaygradError(f"--address {address}: expected HOST:PORT (a port 1-65535), ray://HOST:PORT or auto")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, timeout))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RaygradError(
                    f"--address {address}: nothing answered within --connect-timeout {timeout:g} s "
                    f"({err.strerror or err}); is the cluster up (`ray status` on its head node)?"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def largest_node_gpus(nodes: list[dict]) -> int:
    return max((int(node.get("Resources", {}).get("GPU", 0)) for node in nodes if node.get("Alive")), default=0)
