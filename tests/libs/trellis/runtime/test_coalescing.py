"""Coalescer: items submitted while a group is sent share the next group, in order; each
submitter gets its own item's outcome; abandoned items are dropped only when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from trellis.runtime.coalescing import Coalescer


async def test_writes_queued_during_a_commit_share_the_next_in_order() -> None:
    groups: list[list[int]] = []
    gate = asyncio.Event()

    async def commit_many(items: Sequence[int]) -> list[BaseException | None]:
        groups.append(list(items))
        if len(groups) == 1:
            await gate.wait()  # the first commit is slow: the others queue behind it
        return [ValueError(f"odd {i}") if i == 7 else None for i in items]

    commit: Coalescer[int, None] = Coalescer(commit_many, max_group=256)
    first = asyncio.create_task(commit.send(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(commit.send(i)) for i in range(1, 10)]
    await asyncio.sleep(0.01)
    assert groups == [[0]]  # nothing else committed while the first one runs
    gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert groups == [[0], list(range(1, 10))]
    assert commit.groups == 2
    assert [isinstance(r, ValueError) for r in results] == [i == 7 for i in range(10)]


async def test_a_failed_commit_fails_every_write_of_its_group() -> None:
    async def commit_many(items: Sequence[int]) -> list[BaseException | None]:
        raise ConnectionError("down")

    commit: Coalescer[int, None] = Coalescer(commit_many, max_group=256)
    results = await asyncio.gather(*(commit.send(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_window_lets_company_arrive_and_groups_are_bounded() -> None:
    groups: list[list[int]] = []

    async def send_many(items: Sequence[int]) -> list[int]:
        groups.append(list(items))
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(send_many, max_group=3, window=0.01)
    futures = [coalescer.submit(i) for i in range(5)]  # queued at once, no task has run
    assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40]
    assert groups == [[0, 1, 2], [3, 4]]


async def test_abandoned_items_are_dropped_only_when_asked() -> None:
    sent: list[int] = []

    async def send_many(items: Sequence[int]) -> list[None]:
        sent.extend(items)
        return [None] * len(items)

    for drop, expected in [(False, [1, 2]), (True, [2])]:
        sent.clear()
        coalescer: Coalescer[int, None] = Coalescer(
            send_many, max_group=10, window=0.01, drop_abandoned=drop
        )
        coalescer.submit(1).cancel()  # its submitter gave up before the group formed
        await coalescer.send(2)
        assert sent == expected


async def test_an_item_that_may_wait_goes_with_the_next_group_or_when_its_wait_is_over() -> None:
    groups: list[list[str]] = []

    async def send_many(items: Sequence[str]) -> list[None]:
        groups.append(list(items))
        return [None] * len(items)

    coalescer: Coalescer[str, None] = Coalescer(send_many, max_group=10)
    free = coalescer.submit("free", within=0.2)
    await asyncio.sleep(0.05)
    assert groups == []  # it waits for company
    await coalescer.send("urgent")  # goes at once, taking the waiting one along
    assert groups == [["free", "urgent"]]
    assert free.done()

    loop = asyncio.get_running_loop()
    started = loop.time()
    await coalescer.submit("alone", within=0.05)  # no company comes: its wait ends
    assert groups[-1] == ["alone"]
    assert 0.04 <= loop.time() - started < 1.0


async def test_flush_and_aclose_send_waiting_items_at_once() -> None:
    groups: list[list[int]] = []

    async def send_many(items: Sequence[int]) -> list[None]:
        groups.append(list(items))
        return [None] * len(items)

    coalescer: Coalescer[int, None] = Coalescer(send_many, max_group=10)
    waiting = [coalescer.submit(i, within=60.0) for i in range(3)]
    await asyncio.sleep(0.01)
    assert groups == []
    await asyncio.wait_for(coalescer.aclose(), 1.0)  # not the minute they may wait
    assert groups == [[0, 1, 2]]
    assert all(f.done() and f.exception() is None for f in waiting)
