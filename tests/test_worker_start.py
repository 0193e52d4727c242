"""A Ray run starts its workers as soon as the model is resolved and the pool sized: they load the model
while the driver plans the shards (issue 28). The plan is still planned once, the shards reach the
actors as work items, and an actor Ray restarts during the planning is built again from what it got.
The model is resolved while Ray starts, and a bad one is refused with its own line, Ray stopped. One real
local Ray run (a Ray start and an actor cost seconds on a small machine), compared with the in-process
run of the same texts."""

import os
import signal
import threading
import time

from helpers import assert_same_totals, build_config

from raygrad import constants as names
from raygrad import engine
from raygrad.store.zarr_store import ResultStore


def test_the_worker_loads_while_the_shards_are_planned_and_a_restart_gets_its_plan_again(
        tiny_llama, texts_file, tmp_path, monkeypatch, in_process_totals):
    import ray

    expected = in_process_totals()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    real_plan_shards, seen = engine._plan_shards, {}

    def plan_shards_once_the_worker_has_loaded(plan, config, source, workers, device, echo):
        (actor,) = seen["pool"].actors  # asked for before the shards were planned
        seen["ready"] = ray.get(actor.ready.remote(), timeout=300)  # its model is loaded already
        seen["held"] = ray.get(actor.__ray_call__.remote(lambda self: (len(self.plan.shards), self.plan.source)))
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # Ray restarts the actor (max_restarts), from its constructor's arguments
        seen["killed"] = pid
        seen["plannings"] = seen.get("plannings", 0) + 1
        return real_plan_shards(plan, config, source, workers, device, echo)

    real_start = engine.WorkerPool.start_workers

    def start_workers(self, plan, seed):
        seen["pool"], seen["started with"] = self, plan
        return real_start(self, plan, seed)

    import raygrad.cluster.pool as pool_module

    real_start_ray, ray_starting = pool_module.start_or_join, threading.Event()

    def start_ray(*args):
        ray_starting.set()
        return real_start_ray(*args)

    real_make_plan = engine.make_plan

    def make_plan_once_ray_is_starting(config, workers):
        # Waits for Ray's start: resolved one after the other, this would wait in vain.
        seen["resolved beside ray"] = ray_starting.wait(timeout=120)
        seen["resolved on"] = threading.current_thread() is not threading.main_thread()
        return real_make_plan(config, workers)

    real_exit = engine.WorkerPool.__exit__

    def exit_after_looking(self, *exc):
        (actor,) = self.actors
        seen["pid after"] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        return real_exit(self, *exc)

    monkeypatch.setattr(engine, "_plan_shards", plan_shards_once_the_worker_has_loaded)
    monkeypatch.setattr(pool_module, "start_or_join", start_ray)
    monkeypatch.setattr(engine, "make_plan", make_plan_once_ray_is_starting)
    monkeypatch.setattr(engine.WorkerPool, "start_workers", start_workers)
    monkeypatch.setattr(engine.WorkerPool, "__exit__", exit_after_looking)
    started = time.monotonic()
    run_dir = engine.run(build_config(tiny_llama, texts_file, tmp_path / "ray", workers=1, shard_size=2),
                         echo=lambda _: None, progress=False)
    assert not ray.is_initialized()  # the run's own Ray, stopped
    assert seen["resolved beside ray"] and seen["resolved on"]  # the model resolved while Ray started
    assert seen["plannings"] == 1  # one pass over the dataset
    assert seen["ready"]["device"] == "cpu" and seen["ready"]["load_seconds"] < time.monotonic() - started
    held_shards, held_source = seen["held"]
    assert held_shards == 0  # the actor got the plan before its shards: they come as work items
    saved = ResultStore.open(run_dir / names.STORE_NAME)
    plan = saved.attrs[names.ATTR_PLAN]
    assert len(plan["shards"]) == 3 and held_source == plan["source"]  # what each work item carries
    assert seen["started with"].source == plan["source"] and not seen["started with"].shards
    assert seen["pid after"] != seen["killed"]  # a new process, built again from the plan it was given
    totals, done = saved.totals()
    assert done.all()
    assert_same_totals(totals, expected)


def test_a_model_that_cannot_be_resolved_beside_ray_stops_the_run_with_its_own_line(tiny_llama, texts_file, tmp_path,
                                                                                       monkeypatch):
    """With --workers 1 the model is resolved while Ray starts: a missing one is refused with the line an
    in-process run gives, before a pool that cannot start (no GPU for --device cuda) is; nothing is
    written, and the Ray started beside it is stopped."""
    import pytest
    import ray

    from raygrad.errors import RaygradError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    missing = tmp_path / "no-such-model"
    with pytest.raises(RaygradError) as in_process:
        engine.run(build_config(missing, texts_file, tmp_path / "alone"), echo=lambda _: None, progress=False)
    for device in ("auto", "cuda"):  # cuda: the pool cannot start either
        with pytest.raises(RaygradError) as beside:
            engine.run(build_config(missing, texts_file, tmp_path / device, workers=1, device=device),
                       echo=lambda _: None, progress=False)
        assert str(beside.value) == str(in_process.value)
        assert not ray.is_initialized()
        assert not any((tmp_path / device).iterdir())
