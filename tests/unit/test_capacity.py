"""Admission by real-time capacity (engines/capacity.py): the meter, and slots granted,
queued, refused and given back, on a real event loop. No test depends on speed: the
meter is fed numbers, and every wait is bounded."""

from __future__ import annotations

import asyncio

import pytest

from engines.capacity import EngineSlot, QueuePolicy, RealtimeAdmission, ThroughputMeter
from engines.errors import EngineOverloaded, EngineShareExceeded


def admission(
    *,
    capacity: float | None,
    max_active: int = 32,
    max_per_owner: int = 32,
    headroom: float = 1.0,
    queue_max: int = 4,
    queue_seconds: float = 30.0,
) -> RealtimeAdmission:
    """An admission whose meter says the engine makes `capacity` audio seconds per second."""
    meter = ThroughputMeter(parallelism=1)
    if capacity is not None:
        meter.observe(compute_seconds=1.0, audio_seconds=capacity)
    return RealtimeAdmission(
        meter=meter,
        max_active=max_active,
        max_per_owner=max_per_owner,
        policy=QueuePolicy(headroom=headroom, queue_max=queue_max, queue_seconds=queue_seconds),
    )


def test_the_meter_gives_audio_per_second_over_all_parallel_steps_and_ignores_free_audio() -> None:
    meter = ThroughputMeter(parallelism=2)
    assert meter.audio_seconds_per_second is None  # nothing measured yet
    meter.observe(compute_seconds=0.5, audio_seconds=4.0)  # 8 audio s per s on one worker
    meter.observe(compute_seconds=0.0001, audio_seconds=10.0)  # silence for a break: no compute
    assert meter.audio_seconds_per_second == pytest.approx(16.0)


async def test_streams_are_admitted_up_to_the_measured_capacity_times_headroom() -> None:
    gate = admission(capacity=5.0, headroom=0.8, queue_max=0)  # room for 4
    slots = [await gate.acquire() for _ in range(4)]
    with pytest.raises(EngineOverloaded):
        await gate.acquire()
    assert gate.state().demand == 4
    slots[0].release()
    slots[0].release()  # a second release changes nothing
    slots.append(await gate.acquire())
    for slot in slots[1:]:
        slot.release()
    state = gate.state()
    assert (state.demand, state.queued, state.admitted_total, state.refused_total) == (0, 0, 5, 1)


async def test_an_idle_engine_takes_one_stream_however_slow_it_measures() -> None:
    gate = admission(capacity=0.2, queue_max=0)
    slot = await gate.acquire()
    with pytest.raises(EngineOverloaded):
        await gate.acquire()
    slot.release()


async def test_until_measured_only_the_hard_limit_binds() -> None:
    gate = admission(capacity=None, max_active=3, queue_max=0)
    slots = [await gate.acquire() for _ in range(3)]
    with pytest.raises(EngineOverloaded):
        await gate.acquire()
    for slot in slots:
        slot.release()


async def test_a_queued_request_gets_the_first_slot_given_back_in_order_of_arrival() -> None:
    gate = admission(capacity=2.0, queue_max=4)
    held = [await gate.acquire(), await gate.acquire()]
    first = asyncio.create_task(gate.acquire("a"))
    second = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    assert gate.state().queued == 2
    held[0].release()
    granted: EngineSlot = await asyncio.wait_for(first, 30)
    assert granted.owner == "a"
    assert not second.done()
    held[1].release()
    assert (await asyncio.wait_for(second, 30)).owner == "b"
    assert gate.state().queued_total == 2


async def test_past_the_queue_bound_a_request_is_refused_at_once_with_the_expected_wait() -> None:
    gate = admission(capacity=1.0, queue_max=1)
    held = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    with pytest.raises(EngineOverloaded) as refused:
        await gate.acquire()  # the queue holds one
    assert refused.value.retry_after_s >= 1
    waiting.cancel()
    held.release()


async def test_a_request_expected_to_wait_longer_than_the_bound_is_refused_without_waiting() -> None:
    gate = admission(capacity=1.0, queue_seconds=1.0)
    held = await gate.acquire()  # a slot lives 5 s until one has ended: the wait would be 5 s
    with pytest.raises(EngineOverloaded) as refused:
        await asyncio.wait_for(gate.acquire(), 30)
    assert refused.value.retry_after_s == 5
    assert gate.state().queued == 0
    held.release()


async def test_a_request_that_waits_the_whole_bound_is_refused_and_leaves_the_queue() -> None:
    gate = admission(capacity=1.0, queue_seconds=0.2)
    gate._mean_slot_seconds = 0.1  # slots are expected to end soon: it queues
    held = await gate.acquire()
    with pytest.raises(EngineOverloaded):
        await asyncio.wait_for(gate.acquire(), 30)
    assert gate.state().queued == 0
    held.release()
    assert gate.state().demand == 0


async def test_a_request_cancelled_in_the_queue_leaves_nothing_behind() -> None:
    gate = admission(capacity=1.0, max_per_owner=1)
    held = await gate.acquire("a")
    waiting = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    held.release()
    state = gate.state()
    assert (state.demand, state.queued) == (0, 0)
    (await gate.acquire("b")).release()  # b's share was given back with its place in the queue


async def test_an_owner_at_its_share_gets_429_with_room_and_503_when_the_engine_is_full() -> None:
    gate = admission(capacity=3.0, max_per_owner=2)
    held = [await gate.acquire("a"), await gate.acquire("a")]
    with pytest.raises(EngineShareExceeded):
        await gate.acquire("a")  # room for one more, but "a" holds its share
    other = await gate.acquire("b")  # another owner is served: now the engine is full
    with pytest.raises(EngineOverloaded) as full:
        await gate.acquire("a")
    assert not isinstance(full.value, EngineShareExceeded)  # a full engine answers 503 first
    waiting = asyncio.create_task(gate.acquire("c"))  # full: "c" queues
    await asyncio.sleep(0)
    held[0].release()
    assert (await asyncio.wait_for(waiting, 30)).owner == "c"
    for slot in (held[1], other, waiting.result()):
        slot.release()
    assert gate.state().demand == 0


async def test_while_a_held_stream_is_at_risk_a_new_one_waits_and_starts_once_it_is_not() -> None:
    gate = admission(capacity=10.0, queue_seconds=30.0)
    risky = True
    gate.at_risk = lambda: risky
    first = await gate.acquire()  # an idle engine takes one whatever
    waiting = [asyncio.create_task(gate.acquire()), asyncio.create_task(gate.acquire())]
    await asyncio.sleep(0)
    assert gate.state().queued == 2  # capacity for both, but a held stream is at risk
    gate.poke()
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    risky = False
    gate.poke()  # the engine's next step: one is granted, the other waits for the step after
    granted = await asyncio.wait_for(waiting[0], 30)
    assert not waiting[1].done()
    gate.poke()
    second = await asyncio.wait_for(waiting[1], 30)
    for slot in (first, granted, second):
        slot.release()
    assert gate.state().refused_total == 0


async def test_a_request_cancelled_just_as_it_is_granted_gives_the_slot_back() -> None:
    gate = admission(capacity=1.0)
    held = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    held.release()  # granted: resolved on the loop's next turns
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    waiting.cancel()  # the caller went away just as its slot came
    with pytest.raises(asyncio.CancelledError):
        await waiting  # cancelled it is, not handed a slot it no longer wants
    assert gate.state().demand == 0


async def test_fixed_admission_takes_up_to_max_active_however_slow_and_at_risk_the_engine_is() -> None:
    """ENGINE_ADMISSION=fixed: a slow measurement and a stream at risk refuse nobody; only
    the engine's size and the owner's share bind (the tests' loaded machine relies on it)."""
    meter = ThroughputMeter(parallelism=1)
    meter.observe(compute_seconds=10.0, audio_seconds=0.1)  # far slower than real time
    gate = RealtimeAdmission(
        meter=meter,
        max_active=3,
        max_per_owner=2,
        policy=QueuePolicy(realtime=False, queue_max=0, queue_seconds=30.0),
    )
    gate.at_risk = lambda: True
    slots = [await gate.acquire("a"), await gate.acquire("a")]
    assert gate.realtime_limit() == 3.0
    with pytest.raises(EngineShareExceeded):  # room left, but not in a's share
        await gate.acquire("a")
    slots.append(await gate.acquire("b"))
    with pytest.raises(EngineOverloaded):  # full: the size binds
        await gate.acquire("c")
    for slot in slots:
        slot.release()
    assert gate.state().demand == 0


async def test_an_owner_holding_fewer_streams_is_granted_ahead_of_another_owners_queued_burst() -> None:
    gate = admission(capacity=None, max_active=2, queue_max=4)
    held = [await gate.acquire("busy"), await gate.acquire("busy")]  # the engine is full
    burst = [asyncio.create_task(gate.acquire("busy")) for _ in range(3)]
    await asyncio.sleep(0)
    other = asyncio.create_task(gate.acquire("other"))
    await asyncio.sleep(0)
    assert gate.state().queued == 4
    held[0].release()  # "other" holds none, "busy" one: "other" goes first
    slot = await asyncio.wait_for(other, 5)
    assert slot.owner == "other"
    assert not any(task.done() for task in burst)
    slot.release()  # then "busy"'s in their order
    first = await asyncio.wait_for(burst[0], 5)
    assert not burst[1].done()
    for task in burst[1:]:
        task.cancel()
    await asyncio.gather(*burst[1:], return_exceptions=True)
    for slot in (first, held[1]):
        slot.release()
    assert gate.state().demand == 0


async def test_a_queue_full_of_one_owners_burst_makes_room_for_another_owner() -> None:
    gate = admission(capacity=None, max_active=2, queue_max=2)
    held = [await gate.acquire("busy"), await gate.acquire("busy")]
    burst = [asyncio.create_task(gate.acquire("busy")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(EngineOverloaded):  # the same owner again: the queue is full
        await gate.acquire("busy")
    other = asyncio.create_task(gate.acquire("other"))
    await asyncio.sleep(0)
    # The other owner takes the place of the burst's last waiter, which is refused.
    with pytest.raises(EngineOverloaded):
        await asyncio.wait_for(burst[1], 5)
    assert not burst[0].done()
    held[0].release()
    assert (await asyncio.wait_for(other, 5)).owner == "other"
    burst[0].cancel()
    await asyncio.gather(burst[0], return_exceptions=True)
    state = gate.state()
    assert (state.queued, state.refused_total) == (0, 2)


class _Fleet:
    """engines.capacity.FleetShare over a dict: what the other processes hold, set by the test."""

    def __init__(self) -> None:
        self.elsewhere: dict[str, int] = {}
        self.here: dict[str, int] = {}

    async def held_elsewhere(self, owner: str) -> int:
        return self.elsewhere.get(owner, 0)

    def held_here(self, owner: str, count: int) -> None:
        self.here[owner] = count


async def test_an_owners_slots_on_other_processes_count_against_its_fleet_share() -> None:
    gate = admission(capacity=None, max_active=8, max_per_owner=4)
    fleet = _Fleet()
    gate.share_across(fleet, max_per_owner=3)
    fleet.elsewhere["a"] = 2
    held = await gate.acquire("a")  # 2 elsewhere + 1 here: its fleet share of 3
    with pytest.raises(EngineShareExceeded) as refused:
        await gate.acquire("a")  # this engine's own share (4) is far off
    assert refused.value.share == 3
    other = await gate.acquire("b")
    assert fleet.here == {"a": 1, "b": 1}  # what this process publishes for the others
    held.release()
    other.release()
    assert fleet.here == {"a": 0, "b": 0}
    fleet.elsewhere["a"] = 0  # the other processes gave theirs back
    slots = [await gate.acquire("a") for _ in range(3)]
    for slot in slots:
        slot.release()


async def test_the_queue_grants_first_the_owner_holding_fewer_slots_across_the_fleet() -> None:
    gate = admission(capacity=None, max_active=1, queue_seconds=30.0)
    fleet = _Fleet()
    gate.share_across(fleet, max_per_owner=0)  # no fleet bound: the count only orders the queue
    fleet.elsewhere["a"] = 5  # "a" holds five slots on the other processes, "b" none
    running = await gate.acquire("c")
    first = asyncio.create_task(gate.acquire("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    assert gate.state().queued == 2
    running.release()
    # Both hold nothing here; counted across the fleet "b" holds fewer, and goes ahead of "a"
    # although "a" came first.
    granted = await asyncio.wait_for(second, 30)
    assert not first.done()
    granted.release()
    (await asyncio.wait_for(first, 30)).release()
    assert gate.state().demand == 0
