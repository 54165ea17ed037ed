"""The batcher: a batch forms when the model can take one, from the head of the line."""

import asyncio

import pytest

from service.batching import Batcher, Call


class Model:
    """A stand-in batch function that records its batches and runs until released."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, calls: list[Call[str]]) -> list[str]:
        items = [item for call in calls for item in call.items]
        self.batches.append(items)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        if self.fail is not None:
            raise self.fail
        return [item.upper() for item in items]


async def _arrive(batcher: Batcher, calls: list[list[str]]) -> list[asyncio.Task]:
    tasks = []
    for items in calls:
        tasks.append(asyncio.create_task(batcher(items)))
        await asyncio.sleep(0)  # one after the other
    return tasks


def test_calls_that_arrive_while_the_model_runs_form_the_next_batch_together():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4)
        first = await _arrive(batcher, [["a"]])
        # arrive while "a" runs: b..f wait; the next batch takes the head of the line up to 4
        rest = await _arrive(batcher, [["b"], ["c", "d"], ["e"], ["f"]])
        assert model.batches == [["a"]] and batcher.queued == 5
        model.release.set()
        answers = await asyncio.gather(*first, *rest)
        return model.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [["a"], ["b", "c", "d", "e"], ["f"]]
    assert answers == [["A"], ["B"], ["C", "D"], ["E"], ["F"]]


def test_a_call_s_items_stay_in_one_batch_and_the_line_keeps_its_order():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4)
        tasks = await _arrive(batcher, [["a"], ["b", "c", "d"], ["e", "f"], ["g"]])
        model.release.set()
        await asyncio.gather(*tasks)
        return model.batches

    # "e f" does not fit after "b c d" and is not overtaken by "g"
    assert asyncio.run(scenario()) == [["a"], ["b", "c", "d"], ["e", "f", "g"]]


def test_depth_two_runs_the_next_batch_while_one_is_in_flight():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=2, depth=2)
        tasks = await _arrive(batcher, [["a"], ["b"], ["c"], ["d"]])
        await asyncio.sleep(0.01)
        running = model.running
        model.release.set()
        await asyncio.gather(*tasks)
        return running, model.most_running, model.batches

    running, most, batches = asyncio.run(scenario())
    assert running == 2 and most == 2
    assert batches == [["a"], ["b"], ["c", "d"]]


def test_a_short_batch_waits_for_batch_wait_timeout_s_unless_it_fills():
    async def scenario(wait_s: float):
        model = Model()
        model.release.set()
        batcher = Batcher(model, max_batch_size=3, batch_wait_timeout_s=wait_s)
        tasks = [asyncio.create_task(batcher(["a"]))]
        await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(batcher([x])) for x in "bcd"]
        await asyncio.gather(*tasks)
        return model.batches

    # no wait: "b" goes alone as soon as it comes, and "c", "d" that came while it ran, together
    assert asyncio.run(scenario(0.0)) == [["a"], ["b"], ["c", "d"]]
    # held 0.5 s (far beyond the 0.02 s before the others come, even on a loaded machine):
    # "b" and "c" join "a"; the full batch goes at once, "d" after its own wait
    assert asyncio.run(scenario(0.5)) == [["a", "b", "c"], ["d"]]


def test_a_cancelled_call_leaves_its_batch_and_the_rest_are_answered():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4)
        tasks = await _arrive(batcher, [["a"], ["b"], ["c"], ["d"]])
        tasks[2].cancel()  # "c" gives up while waiting in the line
        await asyncio.sleep(0)
        model.release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return model.batches, done

    batches, done = asyncio.run(scenario())
    assert batches == [["a"], ["b", "d"]]
    assert done[0] == ["A"] and done[1] == ["B"] and done[3] == ["D"]
    assert isinstance(done[2], asyncio.CancelledError)


def test_a_failing_batch_fails_its_calls_and_the_next_batch_still_runs():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=2)
        model.fail = RuntimeError("out of memory")
        tasks = await _arrive(batcher, [["a"], ["b"], ["c"]])
        model.release.set()
        await asyncio.sleep(0.01)
        model.fail = None
        after = await batcher(["d"])
        return await asyncio.gather(*tasks, return_exceptions=True), after

    failed, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert after == ["D"]


def test_calls_outside_one_to_max_batch_size_items_are_refused():
    async def scenario(items):
        return await Batcher(Model(), max_batch_size=2)(items)

    for items in ([], ["a", "b", "c"]):
        with pytest.raises(ValueError, match=f"^a call takes 1 to 2 items, got {len(items)}$"):
            asyncio.run(scenario(items))


def test_a_call_of_exactly_max_batch_size_items_is_one_batch():
    async def scenario():
        model = Model()
        model.release.set()
        batcher = Batcher(model, max_batch_size=3)
        return await batcher(["a", "b", "c"]), model.batches

    assert asyncio.run(scenario()) == (["A", "B", "C"], [["a", "b", "c"]])


def test_batches_of_one_and_the_limits_of_the_settings():
    async def scenario():
        model = Model()
        model.release.set()
        batcher = Batcher(model, max_batch_size=1)
        tasks = await _arrive(batcher, [["a"], ["b"]])
        return await asyncio.gather(*tasks), model.batches

    assert asyncio.run(scenario()) == ([["A"], ["B"]], [["a"], ["b"]])
    for bad in (dict(max_batch_size=0), dict(max_batch_size=2, depth=0)):
        with pytest.raises(ValueError, match="^max_batch_size and depth must be at least 1$"):
            Batcher(Model(), **bad)
    assert Batcher(Model(), max_batch_size=1, depth=1).depth == 1


def test_a_batch_function_that_answers_the_wrong_number_of_items_fails_its_calls():
    """One result per item, or none: a model that drops an image must not shift every later
    answer onto the wrong request."""

    async def short(calls):
        return ["only one"]

    async def scenario():
        batcher = Batcher(short, max_batch_size=4)
        tasks = await _arrive(batcher, [["a", "b"], ["c"]])  # two batches: "a b", then "c"
        return await asyncio.gather(*tasks, return_exceptions=True), batcher.in_flight

    (failed, answered), in_flight = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "got 1 results" in str(failed)
    assert answered == ["only one"] and in_flight == 0


def test_the_line_counts_its_images_and_forgets_cancelled_calls():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4)
        tasks = await _arrive(batcher, [["a"], ["b", "c"], ["d"]])
        queued = batcher.queued  # "a" runs; "b c" and "d" wait
        tasks[1].cancel()
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(tasks[0], tasks[2])
        return queued, batcher.queued, batcher.in_flight, model.batches

    assert asyncio.run(scenario()) == (3, 0, 0, [["a"], ["d"]])


def test_a_full_batch_goes_at_once_whatever_the_wait():
    """The wait is for short batches: three items in a batch of three go as the third comes,
    not after the (long) wait."""

    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=3, batch_wait_timeout_s=60.0)
        tasks = await _arrive(batcher, [["a"], ["b", "c"]])
        await asyncio.sleep(0.01)  # the batch's task starts
        formed = list(model.batches)
        model.release.set()
        await asyncio.gather(*tasks)
        return formed

    assert asyncio.run(scenario()) == [["a", "b", "c"]]


def test_a_failing_batch_hands_its_error_to_its_calls_and_its_task_ends_quietly():
    async def scenario():
        model = Model()
        model.fail = RuntimeError("out of memory")
        batcher = Batcher(model, max_batch_size=2)
        calls = await _arrive(batcher, [["a"]])
        (task,) = batcher._tasks  # held while it runs: asyncio keeps weak references only
        model.release.set()
        outcome = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0)
        return outcome, task.exception(), batcher._tasks, batcher.in_flight

    (failed,), own, held, in_flight = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and own is None
    assert held == set() and in_flight == 0


@pytest.mark.parametrize("when", ["running", "before it starts"])
def test_a_cancelled_batch_cancels_its_calls_and_the_next_batch_still_runs(when):
    """A batch's task cancelled (the replica stopping) while the model runs it, or before it
    even started: its calls are cancelled, not left waiting, and the batcher goes on."""

    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=1, depth=2)
        calls = await _arrive(batcher, [["a"], ["b"]])
        started = len(model.batches)  # "a" runs; "b"'s task is made but has not run yet
        first, second = sorted(batcher._tasks, key=lambda t: int(t.get_name().split("-")[1]))
        (first if when == "running" else second).cancel()
        model.release.set()
        answered = asyncio.gather(*calls, return_exceptions=True)
        outcomes = await asyncio.wait_for(answered, 10)  # fails, rather than hangs, if left waiting
        await asyncio.sleep(0)
        after = await batcher(["c"])
        await asyncio.sleep(0)  # its task's own end
        return started, outcomes, after, batcher._tasks, batcher.in_flight

    started, outcomes, after, held, in_flight = asyncio.run(scenario())
    assert started == 1
    cancelled = 0 if when == "running" else 1
    assert isinstance(outcomes[cancelled], asyncio.CancelledError)
    assert outcomes[1 - cancelled] == [["A"], ["B"]][1 - cancelled]
    assert after == ["C"] and held == set() and in_flight == 0
