"""The elastic scheduler: one map of shards over the pool's Ray actors, until every shard has a result.

Up to PER_WORKER shards are in flight on an actor: the one it computes (the oldest call, its head)
and the next, which the actor reads beside it and computes after it, so a worker goes from one shard
to the next without waiting for the driver to take a result and send work. An actor runs two calls
at once, but computes them in the order they were sent, whichever read its rows first: each call
carries a ticket and the ticket of the call it follows (runtime.ComputeTurns). So when the
oldest call the driver has in flight on an actor (its head) fails because its process died, every
call sent before it had been answered, and it was the one computing (or reading, with nothing
computing). Near the end (fewer shards waiting than workers) an actor
takes one at a time, so no shard waits behind another while a worker has none.

A shard is charged a loss (MAX_LOSSES_PER_SHARD stop the run) only when the worker process that
was computing it is gone, never for a death while idle, for a shard only read or queued on it, or
for an actor that is only restarting:
- an idle actor is asked `placed` before it is sent a shard, and sent it once that answers, so the
  shard runs on the process that answered. A death while idle fails that question (Ray answers
  ActorUnavailableError while it restarts the actor, ActorDiedError when it will not); the shard
  goes back to the queue uncharged. An actor with a shard in flight is sent the next one without
  asking: a death before that one starts fails the one in flight too.
- a failed call that is not its actor's head was reading or waiting for its turn when the head's
  process died or the actor went out of reach (or, rarely, computing after a head whose result is
  still on its way to the driver): back to the queue uncharged, so a loss may be missed but is never
  charged to the wrong shard, and the actor gets nothing more until it answers.
- the head's call failing with ActorUnavailableError tells only that the actor could not be
  reached ("the task may or may not have been executed"): its process died (Ray says this, not
  ActorDiedError, while restarts are left) or the network failed. The shard is queued again, and
  the loss is charged when the actor answers `placed` from another process, or is gone for good;
  the same process answering again costs nothing. The shard sent behind it goes back uncharged.
- ActorDiedError on the head's call: the process that started it is dead and not restarted; charged.

Combining (compute/folding.py): a worker folds each shard it computes into one running partial and
answers the shard's id only; a call the head marks `send` answers the running partial with every shard
in it, which the reducer commits all or nothing. SendPolicy paces those sends, so taking partials costs
the head a bounded share of its time (HEAD_SHARE) however many workers and shards there are: a worker
holds its shards about workers x (the head's measured seconds per partial) / HEAD_SHARE. In the tail
(fewer shards queued than workers) calls fold and nothing is sent to the head: once nothing is queued,
the workers left holding folds reduce among themselves (`_reduce`), two at a time as they finish: one
(the giver) is sent a call that only sends, and the other (the taker) a call `absorb` given that call's
ref, so Ray moves the partial worker to worker, never through the head, and the giver's shards are the
taker's from then on. That is about log2(workers) rounds of one merge each on the workers, and the head
takes one partial (a few, where workers finish far apart), not one per worker. The last holder, when
nothing else computes or absorbs, sends to the head. A worker lost, or out of reach, costs only its
shards not yet sent: they are queued again uncharged (the loss is charged, as above, to the shard it
was computing), and its running partial is given up under a new number (SendOrder.fold), so a worker
that comes back drops it and no shard is counted twice. So does either side of an absorb: a taker lost
costs what it held, the giver's shards included; a giver lost before or after sending (its partial
cannot be had: the taker answers so, its own fold unchanged) costs the giver's shards; neither charged,
as neither was computing a shard.

The pool (pool.py) owns the actors and their start-up calls (`placed`, `ready`); this module decides
which shard goes where and what a failure costs, through the pool's side of `ActorPool` below (the
pool imports this module, never the other way). Ray's runtime is runtime.py's."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, deque
from time import perf_counter  # real seconds of the head's own work (the tests replace `time` with a fake clock)
from typing import Callable, Iterator, Protocol

from ..compute.folding import SendOrder
from ..errors import RaygradError, first_line
from ..store.partial import ShardResult
from .runtime import actor_name, get, wait

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # how long one wait for a result or a worker lasts
STATUS_SECONDS = 30.0  # between "waiting for workers" lines
MAX_LOSSES_PER_SHARD = 3  # a shard whose worker dies this often is killing it (memory, say): stop, not loop
PER_WORKER = 2  # shards in flight per worker: the one it computes and the next, read beside it
_tickets = itertools.count()  # run calls in the order sent, from every map of this process (ComputeTurns)
_folds = itertools.count()  # numbers for the workers' running partials (SendOrder.fold), never reused
# Of the head's wall time, the share that taking folded partials (Ray's transfer and Reducer.add) may
# use: half of a target of <= 0.5 busy, the other half left for acknowledgements, checkpoint snapshots
# and the tail, when every worker sends what it holds. math.inf: every shard sent at once (no folding).
HEAD_SHARE = 0.25
COST_WEIGHT = 0.3  # of the newest partial in the running mean of the head's seconds per partial


class ActorPool(Protocol):
    """What the scheduler needs of whatever owns the actors' lifecycle (pool.WorkerPool): the actors, their
    start-up calls (`placed`, `ready`) and their replacement stay the pool's; the scheduler reads the answers
    through these methods and tells the pool where each actor runs and what it computes."""

    config: object  # RunConfig: worker_timeout
    echo: Callable[[str], None]
    clocks: "WorkerClocks"
    actors: list  # the actors asked for (up or not): read only

    def watch_unwatched(self) -> None: ...  # ask `placed` and `ready` of actors up since an earlier map
    def watch_start(self, actor) -> None: ...  # ask a new or restarted actor `placed` and `ready`
    def ask_later(self, actor) -> None: ...  # an actor Ray is restarting: ask again in a while
    def retry_due(self, now: float) -> float | None: ...  # ask again those due; -> seconds to the next
    def loading(self) -> int: ...  # actors placed and loading their model
    def startup_refs(self) -> list: ...  # the start-up calls in flight
    def take_startup(self, ref) -> tuple[str, object] | None: ...  # ("placed" | "ready", actor), or None
    def placed_on(self, actor, node: str) -> None: ...
    def loaded(self, actor, device: str) -> int: ...  # -> how many actors have loaded
    def computing(self, actor, shard: int | None) -> None: ...  # the shard it computes now (None: none)
    def replace_actor(self, lost) -> None: ...  # an actor gone for good: ask for another
    def say_sae_passes(self, who: str, groups: list[list[int]] | None) -> None: ...
    def status_line(self, up: int, loading: int) -> str: ...  # "waiting for workers" while none computes
    def timeout_message(self) -> str: ...  # the --worker-timeout line


class WorkerTimeout(RaygradError):
    pass


class WorkerClocks:
    """Per worker, as the driver sees it: seconds up (from its `ready` answer until it is lost or the
    map ends) and seconds idle (up with no shard computing or queued on it: waiting for the driver)."""

    def __init__(self):
        self.up: Counter = Counter()
        self.idle: Counter = Counter()
        self._up_since: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self.names: dict[str, int] = {}  # actor id -> worker number, in the order they came up

    def ready(self, name: str, now: float) -> None:
        self.names.setdefault(name, len(self.names) + 1)
        self._up_since.setdefault(name, now)
        self._idle_since.setdefault(name, now)

    def working(self, name: str, now: float) -> None:
        since = self._idle_since.pop(name, None)
        if since is not None:
            self.idle[name] += now - since

    def waiting(self, name: str, now: float) -> None:
        if name in self._up_since:
            self._idle_since.setdefault(name, now)

    def lost(self, name: str, now: float) -> None:
        self.working(name, now)
        since = self._up_since.pop(name, None)
        if since is not None:
            self.up[name] += now - since

    def stop(self, now: float) -> None:
        for name in list(self._up_since):
            self.lost(name, now)

    def record(self) -> dict:
        """The timing record's part: idle seconds per worker (by number) and the idle fraction of all."""
        up = sum(self.up.values())
        return {"worker_idle_seconds": {str(self.names[name]): seconds for name, seconds in self.idle.items()},
                "worker_idle_fraction": sum(self.idle.values()) / up if up > 0 else 0.0}


class SendPolicy:
    """Which calls the head marks `send`: a token bucket that fills at HEAD_SHARE / (the head's measured
    seconds per partial taken), so sends arrive no faster than the head takes them within its share,
    however many workers there are; each token goes to the worker whose shards have waited longest.
    Until a partial has been measured nothing fills it: the first call sends, to measure one."""

    def __init__(self, share: float):
        self.share = share
        self.cost: float | None = None  # head seconds per partial taken (transfer + reduce), a running mean
        self.tokens = 1.0
        self.updated: float | None = None

    def measured(self, seconds: float) -> None:
        self.cost = seconds if self.cost is None else (1 - COST_WEIGHT) * self.cost + COST_WEIGHT * seconds

    def grant(self, now: float, ahead: int, workers: int) -> bool:
        """A send for a call now, `ahead` workers having waited longer (a token is left for each)."""
        if self.share == math.inf:
            return True
        if self.cost is not None and self.updated is not None:
            rate = self.share / max(self.cost, 1e-9)  # sends a second
            self.tokens = min(workers + 1.0, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1 + ahead:
            self.tokens -= 1
            return True
        return False


class ElasticMap:
    """One map: `results()` yields each partial the workers send once, in the order they arrive; each
    holds one or more shards (ShardResult.shards), none of them yielded before."""

    def __init__(self, pool: ActorPool, queue: deque):
        self.pool, self.queue, self.clocks = pool, queue, pool.clocks
        self.asking: dict = {}  # `placed` ref -> (actor, item): an idle actor asked whether it is up, before `item`
        self.running: dict = {}  # run ref -> (actor, item, the worker process that answered before it)
        self.last_ticket: dict[str, int] = {}  # actor id -> the ticket of the last run call sent to it
        self.in_flight: dict[str, deque] = {}  # actor id -> its run refs in the order sent; the first computes
        self.process_of: dict[str, str] = {}  # actor id -> the process that last answered `placed`
        self.room: dict = {}  # actor id -> an actor with a shard in flight and room for another
        self.suspect: set[str] = set()  # actors a call behind the head failed on: nothing until they answer `placed`
        self.unreachable: dict = {}  # actor id -> (item, process that started it, error): charged if another answers
        self.idle: list = []
        self.finished: set[int] = set()
        self.losses: Counter = Counter()  # shard -> worker processes lost while computing it
        self.policy = SendPolicy(HEAD_SHARE)
        self.fold_of: dict[str, int] = {}  # actor id -> the number of its running partial (SendOrder.fold)
        # actor id -> {shard: (item, when acknowledged)}: folded on the worker, not yet in a partial taken
        self.held: dict[str, dict[int, tuple]] = {}
        self.sends: set = set()  # run refs marked `send`
        # What each partial will hold, in the order calls were sent (an actor computes them in that order,
        # whatever order their answers arrive in): actor id -> the items sent since its last `send` call,
        # and each `send` call's ref -> the items its partial holds (its own included).
        self.segment: dict[str, list] = {}
        self.segments: dict = {}
        self.get_seconds = 0.0  # the head's seconds in `get` for the partial being yielded
        self.carrying_on = None  # the actor that sent the partial being yielded: served once it is taken
        # `absorb` ref -> (taker, giver, the giver's held shards moved to the taker, the giver's send ref,
        # kept so that Ray keeps the partial until the taker has it)
        self.absorbing: dict = {}

    def results(self) -> Iterator[ShardResult]:
        pool, queue = self.pool, self.queue
        pool.watch_unwatched()  # those up since an earlier map answer at once
        none_up_since = last_status = time.monotonic()
        try:
            while queue or self.running or self.asking or self.absorbing or any(self.held.values()):
                self._hand_out()
                now = time.monotonic()
                next_retry = pool.retry_due(now)
                loading = pool.loading()
                # Checked before every wait, not only after an empty one: the waits end early while an
                # actor that Ray cannot restart (no node for it) is asked again.
                if self.running or self.asking or self.absorbing or self.idle or loading:
                    none_up_since = now
                elif now - none_up_since > pool.config.worker_timeout:
                    raise WorkerTimeout(pool.timeout_message())
                timeout = POLL_SECONDS if next_retry is None else min(POLL_SECONDS, next_retry)
                refs = [*self.running, *self.asking, *self.absorbing, *pool.startup_refs()]
                if refs:
                    ready = wait(refs, timeout=max(0.0, timeout))
                else:  # every actor is being restarted: nothing to take until one is asked again
                    time.sleep(max(0.0, timeout))
                    ready = []
                if not ready:
                    now = time.monotonic()
                    if not self.running and not self.absorbing and now - last_status >= STATUS_SECONDS:
                        pool.echo(pool.status_line(len(self.idle), loading))
                        last_status = now
                    continue
                result = self._take(ready[0])
                if result is not None:
                    self.finished.update(result.shards)
                    started = perf_counter()
                    yield result
                    self.policy.measured(self.get_seconds + perf_counter() - started)
                    self._carry_on(self.carrying_on)
        finally:
            self.clocks.stop(time.monotonic())

    def _hand_out(self) -> None:
        """Ask idle actors whether they are up (each for a shard), and top up those with room."""
        queue, actors = self.queue, self.pool.actors
        while self.idle and queue:
            actor, item = self.idle.pop(), queue.popleft()
            self.asking[actor.placed.remote()] = (actor, item)
        while self.room and queue and len(queue) >= len(actors):
            self._fill(self.room[next(iter(self.room))])
        if not queue:
            self._reduce()

    def _reduce(self) -> None:
        """The tail's tree reduction (scheduler docstring): idle workers holding folds, two at a time, one
        absorbing the other's partial; the last holder sends to the head once nothing else computes or
        absorbs (nor is being asked: a lost shard queued again could still make another holder)."""
        holders = [actor for actor in self.idle if self.held.get(actor_name(actor))]
        while len(holders) >= 2:
            taker, giver = holders.pop(), holders.pop()
            self.idle.remove(taker)
            self.idle.remove(giver)
            self._absorb(taker, giver)
        if holders and not self.running and not self.absorbing and not self.asking:
            self.idle.remove(holders[0])
            self._send(holders[0], None, send=True)

    def _absorb(self, taker, giver) -> None:
        """The giver sends what it folded, to the taker, which absorbs it: the giver's shards are the
        taker's from now on (if the absorb fails, `_absorbed` says whose loss they are)."""
        taker_name, giver_name = actor_name(taker), actor_name(giver)
        sent = giver.run.remote(None, None, None, next(_tickets), None,
                                SendOrder(self.fold_of.setdefault(giver_name, next(_folds)), True))
        moved = self.held.pop(giver_name)
        self.segment.pop(giver_name, None)  # no call in flight on it: its segment is what it held
        self.held.setdefault(taker_name, {}).update(moved)
        self.segment.setdefault(taker_name, []).extend(item for item, _ in moved.values())
        order = SendOrder(self.fold_of.setdefault(taker_name, next(_folds)), False)
        ref = taker.absorb.remote([sent], next(_tickets), None, order)  # in a list: handed over unresolved
        self.absorbing[ref] = (taker, giver, moved, sent)
        now = time.monotonic()
        for name in (taker_name, giver_name):
            self.clocks.working(name, now)

    def _absorbed(self, ref) -> None:
        """A taker answered (or failed) its `absorb`."""
        from ray.exceptions import RayActorError

        taker, giver, moved, _ = self.absorbing.pop(ref)
        taker_name, giver_name = actor_name(taker), actor_name(giver)
        try:
            absorbed, why = get(ref)
        except RayActorError as err:  # the taker lost or out of reach: what it held, the giver's shards too
            lost = [*self._drop_calls(taker), *self._give_up_fold(taker_name)]
            self.pool.echo(f"worker lost while absorbing another's partial ({first_line(err)}); its "
                           f"{len(lost)} folded shards are queued again")
            self.queue.extendleft(reversed(lost))
            self.pool.watch_start(taker)
            self._carry_on(giver)  # it sent (or was lost: asked `placed` before its next shard, it says so)
            return
        if not absorbed:  # the giver's partial cannot be had: the taker's fold is as it was
            held, segment = self.held[taker_name], self.segment.get(taker_name, [])
            items = [held.pop(shard)[0] for shard in moved]
            for item in items:
                segment.remove(item)
            self.pool.echo(f"worker lost holding {len(items)} folded shards ({why}); they are queued again")
            self.fold_of[giver_name] = next(_folds)  # if it sent nothing after all, it drops what it folded
            self.queue.extendleft(reversed(items))
            self._drop_calls(giver)
            self.pool.watch_start(giver)
        else:
            self._carry_on(giver)
        self._carry_on(taker)

    def _take(self, ref) -> ShardResult | None:
        """Whatever answered: an actor placed, loaded, asked before a shard, or a shard's result."""
        startup = self.pool.take_startup(ref)
        if startup is not None:
            kind, actor = startup
            (self._placed if kind == "placed" else self._loaded)(actor, ref)
        elif ref in self.asking:
            self._asked(*self.asking.pop(ref), ref)
        elif ref in self.absorbing:
            self._absorbed(ref)
        else:
            return self._finished(ref)
        return None

    def _placed(self, actor, ref) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            node, process = get(ref)  # usually before its `ready` (which loads the model beside it)
        except ActorUnavailableError:  # restarting, perhaps waiting for a node: not placed, ask again
            self.pool.ask_later(actor)
            return
        except RayActorError:  # gone for good: its `ready` call says so and it is replaced
            self._settle(actor, None)
            return
        self.pool.placed_on(actor, node)
        self._settle(actor, process)

    def _loaded(self, actor, ref) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        pool = self.pool
        try:
            info = get(ref)
        except ActorUnavailableError:  # restarting after a loss: Ray brings it back, ask again
            pool.ask_later(actor)
            return
        except RayActorError as err:  # gone before it was up: ask for another one
            log.warning("a worker was lost while starting (%s); asking for another", first_line(err))
            pool.replace_actor(actor)
            return
        number = pool.loaded(actor, info["device"])
        pool.say_sae_passes(f"worker {number}", info.get("sae_groups"))
        self.idle.append(actor)
        self.clocks.ready(actor_name(actor), time.monotonic())

    def _asked(self, actor, item, ref) -> None:
        """An idle actor answered (or failed) the question put before sending it `item`."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            node, process = get(ref)
        except ActorUnavailableError:  # died while idle and being restarted: the shard never started
            self.queue.appendleft(item)
            self.clocks.lost(actor_name(actor), time.monotonic())
            self.pool.ask_later(actor)
            return
        except RayActorError:  # died while idle, for good: its `ready` call says so and it is replaced
            self.queue.appendleft(item)
            self.clocks.lost(actor_name(actor), time.monotonic())
            self.pool.watch_start(actor)
            return
        name = actor_name(actor)
        self.pool.placed_on(actor, node)  # Ray may have restarted it elsewhere while idle
        self.process_of[name] = process
        self.suspect.discard(name)
        self._send(actor, item)
        self._fill(actor)

    def _finished(self, ref) -> ShardResult | None:
        """A call answered: an acknowledgement (its shard folded on the worker), a partial the worker sent
        (-> it, unless a shard in it is already in), or a failure that queues its shard again with those
        the worker held (and perhaps costs a loss). `item` None: a call that only sends."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        actor, item, process = self.running.pop(ref)
        self.sends.discard(ref)
        name = actor_name(actor)
        calls = self.in_flight[name]
        head = calls[0] is ref
        position = calls.index(ref)
        calls.remove(ref)
        started = perf_counter()
        try:
            result = get(ref)
        except RayActorError as err:
            if not head:  # sent behind a shard still in flight: it was reading or waiting (scheduler docstring)
                self._not_folded(name, ref, item, position)
                if item is not None:
                    self.queue.appendleft(item)
                self.suspect.add(name)
                self.room.pop(name, None)
                return None
            # its node or process is gone, or out of reach: the shard is queued again, with those it held
            if item is not None:
                if isinstance(err, ActorUnavailableError):
                    self.unreachable[name] = (item, process, err)  # charged once the actor answers again
                else:
                    self._charge(item, err)
                self.pool.echo(f"worker lost during shard {item[0]} ({first_line(err)}); the shard is queued again")
            self.segments.pop(ref, None)
            lost = [*([item] if item is not None else []), *self._drop_calls(actor), *self._give_up_fold(name)]
            self.queue.extendleft(reversed(lost))  # those behind it and those it held: never computing
            self.pool.watch_start(actor)  # answers if Ray restarts it (or it was out of reach), raises if gone
            return None
        self.get_seconds = perf_counter() - started
        if result is None:  # ComputeTurns gives up only on calls sent before a head, which the driver dropped
            raise RuntimeError(f"internal error: a worker gave up on {_call_name(item)}, which the driver awaited")
        sent = self._received(actor, item, result, ref)
        if sent is None:
            self._carry_on(actor)
        else:  # once the head has taken it (results()), so the next send is granted at its measured cost
            self.carrying_on = actor
        return sent

    def _carry_on(self, actor) -> None:
        """After an answer: the actor's next call computes, or it is sent more, or it is idle (holding a
        fold or not: a holder computes more while shards are queued, else takes part in `_reduce`)."""
        name = actor_name(actor)
        calls = self.in_flight.setdefault(name, deque())
        if calls:
            self.pool.computing(actor, _shard_of(self.running[calls[0]][1]))  # the next
            self._fill(actor)
        else:
            self.pool.computing(actor, None)
            self.room.pop(name, None)
            self.idle.append(actor)
            self.clocks.waiting(name, time.monotonic())

    def _received(self, actor, item, result: ShardResult, ref) -> ShardResult | None:
        """An answer's bookkeeping -> the partial to yield (None: an acknowledgement)."""
        name = actor_name(actor)
        expected = self.segments.pop(ref, None)  # a `send` call: what its partial holds
        if result.partial is None:
            if expected is not None and (item is not None or any(held[0] not in self.finished for held in expected)):
                raise RuntimeError(f"internal error: a worker asked to send after {_call_name(item)} sent nothing")
            if item is not None and item[0] not in self.finished:
                self.held.setdefault(name, {})[item[0]] = (item, time.monotonic())
            return None
        if expected is None or set(result.shards) != {held[0] for held in expected}:
            raise RuntimeError(f"internal error: a worker sent shards {sorted(result.shards)}, the driver awaited "
                               f"{None if expected is None else sorted(held[0] for held in expected)}")
        holding = self.held.get(name, {})
        for shard in result.shards:
            holding.pop(shard, None)
        if any(shard in self.finished for shard in result.shards):
            # Cannot happen (a shard is folded on one worker at a time): never added twice, and never in
            # part; those not yet in are queued again.
            log.warning("a worker sent shards %s, some already in: refused whole, the rest queued again",
                        sorted(result.shards))
            self.queue.extendleft(reversed([held for held in expected if held[0] not in self.finished]))
            return None
        return result

    def _not_folded(self, name: str, ref, item, position: int) -> None:
        """A call behind the head failed, so its worker never folded its shard: out of the partial it was
        to be in; if it was to send, the worker still holds what it folded, for the next `send` call."""
        calls = self.in_flight[name]
        later = [call for call in list(calls)[position:] if call in self.segments]  # `send` calls after it
        if ref in self.segments:
            rest = [held for held in self.segments.pop(ref) if held is not item]
            if later:
                self.segments[later[0]] = rest + self.segments[later[0]]
            else:
                self.segment[name] = rest + self.segment.get(name, [])
        else:
            for items in [*(self.segments[call] for call in later), self.segment.get(name, [])]:
                if item in items:
                    items.remove(item)
                    break

    def _give_up_fold(self, name: str) -> list:
        """Forget what a lost (or unreachable) worker held: a new number for its running partial, so
        if it comes back it drops the old one. -> the items it held, queued again uncharged."""
        self.fold_of[name] = next(_folds)
        self.segment.pop(name, None)
        return [held for held, _ in self.held.pop(name, {}).values()]

    def _charge(self, item, err) -> None:
        self.losses[item[0]] += 1
        if self.losses[item[0]] >= MAX_LOSSES_PER_SHARD:
            raise RaygradError(_shard_keeps_killing_line(item, self.losses[item[0]], err)) from None

    def _settle(self, actor, process: str | None) -> None:
        """The actor answered from `process`, or (None) is gone for good."""
        if actor_name(actor) in self.unreachable:
            item, started_by, err = self.unreachable.pop(actor_name(actor))
            if process != started_by:
                self._charge(item, err)

    def _send(self, actor, item, send: bool | None = None) -> None:
        """Send `item` (None: a call that only sends what the worker folded) to compute after the last
        call sent to the actor, while any is in flight. That call, not the last one here still
        unanswered: results may arrive out of order (a large one pulled from another node after the
        small one behind it). `send`: whether the worker sends its running partial after it (None:
        the tail always, else as SendPolicy grants)."""
        name = actor_name(actor)
        calls = self.in_flight.setdefault(name, deque())
        ticket, after = next(_tickets), self.last_ticket[name] if calls else None
        if send is None:
            send = self._send_now(name)
        order = SendOrder(self.fold_of.setdefault(name, next(_folds)), send)
        ref = actor.run.remote(*(item if item is not None else (None, None, None)), ticket, after, order)
        self.running[ref], self.last_ticket[name] = (actor, item, self.process_of[name]), ticket
        segment = self.segment.setdefault(name, [])
        if item is not None:
            segment.append(item)
        if send:
            self.sends.add(ref)
            self.segments[ref] = self.segment.pop(name)
        calls.append(ref)
        if len(calls) == 1:  # the actor's head: the shard it computes now
            self.pool.computing(actor, _shard_of(item))
        self.clocks.working(name, time.monotonic())

    def _send_now(self, name: str) -> bool:
        """Whether the call being sent to actor `name` should send its running partial: in the tail
        (no more calls will be sent to fill actors up) never (the workers reduce among themselves,
        `_reduce`), else as SendPolicy grants, first to the actors whose shards have waited longest among
        those with no send in flight (an actor with one comes after all of them)."""
        if self.policy.share == math.inf:
            return True
        if len(self.queue) < len(self.pool.actors):
            return False
        waiting = {actor for actor, refs in self.in_flight.items() if not any(ref in self.sends for ref in refs)}
        since = {actor: min(at for _, at in held.values()) for actor, held in self.held.items() if held}
        mine = since.get(name, math.inf) if name in waiting else math.inf
        ahead = sum(at < mine for actor, at in since.items() if actor in waiting and actor != name)
        return self.policy.grant(time.monotonic(), ahead, len(self.pool.actors))

    def _fill(self, actor) -> None:
        """Top an actor with a shard in flight up to PER_WORKER, while enough shards wait."""
        name = actor_name(actor)
        self.room.pop(name, None)
        if name in self.suspect:
            return
        while len(self.in_flight[name]) < PER_WORKER and self.queue and len(self.queue) >= len(self.pool.actors):
            self._send(actor, self.queue.popleft())
        if len(self.in_flight[name]) < PER_WORKER:
            self.room[name] = actor

    def _drop_calls(self, actor) -> list:
        """Forget an actor's calls in flight; -> their items, oldest first."""
        name = actor_name(actor)
        self.room.pop(name, None)
        self.pool.computing(actor, None)
        self.clocks.lost(name, time.monotonic())
        items = []
        for ref in self.in_flight.pop(name, ()):
            self.sends.discard(ref)
            self.segments.pop(ref, None)
            items.append(self.running.pop(ref)[1])
        return [item for item in items if item is not None]


def _shard_of(item) -> int | None:
    return None if item is None else item[0]


def _call_name(item) -> str:
    return "a call that only sends" if item is None else f"shard {item[0]}"


def _shard_keeps_killing_line(item: tuple, losses: int, err: BaseException) -> str:
    shard, ref = item[0], item[-1]
    return (f"shard {shard} ({ref.texts} texts, {ref.rows_text()}, about {ref.est_tokens} target tokens) lost its "
            f"worker {losses} times "
            f"(last: {first_line(err)}); a worker that dies on the same shard is likely out of host or GPU "
            "memory: use a smaller --batch-size or --tokens-per-batch, a shorter --max-length, or workers with "
            "more memory, then resume")
