"""Stage units in forked one-thread processes (erprm_core.running.workers) and sharded work spread over them.

The pipeline tests show the tables do not change (the smoke chain runs with two workers on two idle cores and
its golden digests hold); these tests pin the mechanics: order, closures, errors, nesting, the counters that
come back, and which machines get workers at all.
"""

from __future__ import annotations

import os

import pytest

from erprm_core.running import artifacts, workers


def test_fork_map_returns_results_in_item_order_from_other_processes():
    offset = 100  # a closure: the forked workers inherit it, nothing is pickled but the results

    def unit(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    out = workers.fork_map(unit, list(range(7)), workers=2)
    assert [r for r, _ in out] == list(range(100, 107))
    assert os.getpid() not in {pid for _, pid in out}  # every unit ran in a worker
    assert workers.fork_map(unit, [1], workers=2) == [(101, os.getpid())]  # one item: no process started


def test_workers_run_one_thread_and_nested_maps_serially():
    def unit(_: int) -> tuple[int, list[int]]:
        import torch

        return torch.get_num_threads(), workers.fork_map(lambda y: os.getpid(), [0, 1], workers=2)

    for threads, inner in workers.fork_map(unit, [0, 1], workers=2):
        assert threads == 1
        assert len(set(inner)) == 1  # both inner units ran in the worker itself


def test_a_failing_unit_raises_in_the_caller():
    def unit(x: int) -> int:
        if x == 3:
            raise ValueError(f"unit {x} exploded")
        return x

    with pytest.raises(ValueError, match="unit 3 exploded"):
        workers.fork_map(unit, list(range(5)), workers=2)


def test_worker_count_needs_pinned_numerics_and_several_threads():
    assert workers.worker_count(2, pinned=True) == 2  # this machine has no GPU (the tests run on the CPU)
    assert workers.worker_count(2, pinned=False) == 1
    assert workers.worker_count(1, pinned=True) == 1


def test_worker_count_is_one_where_processes_do_not_fork_safely(monkeypatch):
    monkeypatch.setattr(workers.sys, "platform", "darwin")
    assert workers.worker_count(2, pinned=True) == 1


@pytest.mark.parametrize("n_workers", [1, 2])
def test_sharded_work_in_workers_gives_the_same_records_and_counters(tmp_path, n_workers):
    stats = {"calls": 0, "items": 0, "name": "sampler"}

    def compute(chunk, index):
        stats["calls"] += 1
        stats["items"] += len(chunk)
        return [{"item": x, "square": x * x, "shard": index} for x in chunk]

    items = list(range(23))
    folder = tmp_path / "shards"
    out = artifacts.run_sharded(items, 5, folder, compute, ("item",), workers=n_workers, tallies=[stats])
    assert out == [{"item": x, "square": x * x, "shard": x // 5} for x in items]
    assert stats == {"calls": 5, "items": 23, "name": "sampler"}  # counted once, whichever process ran it
    assert len(artifacts.shard_status(folder)) == 5

    (folder / "shard-00002.jsonl").unlink()  # resume: only the missing shard is computed again
    again = artifacts.run_sharded(items, 5, folder, compute, ("item",), workers=n_workers, tallies=[stats])
    assert again == out and stats["calls"] == 6 and stats["items"] == 28
