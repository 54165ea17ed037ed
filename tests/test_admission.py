"""A server replica's per-model admission: slots in flight, a FIFO line, refusal when full."""

import asyncio

import pytest

from service.admission import ModelBusy, ModelQueue


async def _hold(queue: ModelQueue, name: str, order: list, release: asyncio.Event) -> None:
    async with queue.slot():
        order.append(name)
        await release.wait()


def test_calls_beyond_capacity_wait_and_go_in_arrival_order():
    async def scenario() -> list:
        queue, order, release = ModelQueue(capacity=2, max_waiting=-1), [], asyncio.Event()
        tasks = []
        for name in "abcdef":
            tasks.append(asyncio.create_task(_hold(queue, name, order, release)))
            await asyncio.sleep(0)  # each call arrives after the previous one
        await asyncio.sleep(0.01)
        assert order == ["a", "b"] and queue.in_flight == 2 and queue.waiting == 4
        release.set()
        await asyncio.gather(*tasks)
        assert queue.in_flight == 0 and queue.waiting == 0
        return order

    assert asyncio.run(scenario()) == list("abcdef")


def test_a_full_line_refuses_at_once():
    async def scenario() -> None:
        queue, order, release = ModelQueue(capacity=1, max_waiting=2), [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(queue, n, order, release)) for n in "abc"]
        await asyncio.sleep(0.01)
        assert queue.full()
        with pytest.raises(ModelBusy):
            async with queue.slot():
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert not queue.full() and order == list("abc")

    asyncio.run(scenario())


def test_a_caller_that_gives_up_leaves_the_line():
    async def scenario() -> None:
        queue, order, release = ModelQueue(capacity=1, max_waiting=1), [], asyncio.Event()
        holder = asyncio.create_task(_hold(queue, "holder", order, release))
        await asyncio.sleep(0)
        impatient = asyncio.create_task(_hold(queue, "impatient", order, release))
        await asyncio.sleep(0.01)
        assert queue.full()
        impatient.cancel()  # e.g. the request timed out
        await asyncio.sleep(0.01)
        assert queue.waiting == 0 and not queue.full()
        late = asyncio.create_task(_hold(queue, "late", order, release))
        release.set()
        await asyncio.gather(holder, late)
        assert order == ["holder", "late"] and queue.in_flight == 0

    asyncio.run(scenario())


def test_the_limits_at_their_edges():
    """No line at all (max_waiting 0): a call is refused only while every slot is taken; a line
    of one: the second waiter is refused; capacity must be at least one."""

    async def scenario() -> None:
        queue, order, release = ModelQueue(capacity=2, max_waiting=0), [], asyncio.Event()
        assert not queue.full()
        first = asyncio.create_task(_hold(queue, "a", order, release))
        await asyncio.sleep(0)
        assert not queue.full() and queue.in_flight == 1  # a slot is still free
        second = asyncio.create_task(_hold(queue, "b", order, release))
        await asyncio.sleep(0)
        assert queue.full() and queue.waiting == 0
        with pytest.raises(ModelBusy):
            async with queue.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert not queue.full() and (queue.in_flight, queue.waiting) == (0, 0)

        queue, release = ModelQueue(capacity=1, max_waiting=1), asyncio.Event()
        held = asyncio.create_task(_hold(queue, "c", order, release))
        await asyncio.sleep(0)
        assert not queue.full()  # the line has room for one
        waiter = asyncio.create_task(_hold(queue, "d", order, release))
        await asyncio.sleep(0)
        assert queue.full() and queue.waiting == 1
        release.set()
        await asyncio.gather(held, waiter)
        assert order == list("abcd")

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="at least 1"):
        ModelQueue(capacity=0, max_waiting=-1)
    assert ModelQueue(capacity=1, max_waiting=-1).capacity == 1
