"""DDP data sharding: ranks see disjoint micro-batches that together are the one-device order, resumable."""

from __future__ import annotations

import pytest

from panobench.training.datamodule import ResumableSampler


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize(("total", "chunk"), [(48, 4), (50, 4), (7, 3)])
def test_two_ranks_split_the_one_device_order_by_micro_batch(total: int, chunk: int) -> None:
    one = list(ResumableSampler(13, total, seed=3))
    ranks = [list(ResumableSampler(13, total, seed=3, rank=r, world=2, chunk=chunk)) for r in range(2)]
    assert [len(r) for r in ranks] == [len(ResumableSampler(13, total, 3, rank=r, world=2, chunk=chunk))
                                       for r in range(2)]
    assert sum(len(r) for r in ranks) == len(one) == total
    # Micro-batch j of the one-device run is micro-batch j // 2 of rank j % 2.
    merged = [batch for pair in zip(_chunks(ranks[0], chunk), _chunks(ranks[1], chunk) + [[]], strict=False)
              for batch in pair]
    assert [i for batch in merged for i in batch] == one


def test_world_one_is_the_plain_order_and_resumes_mid_run() -> None:
    full = list(ResumableSampler(10, 40, seed=1))
    assert list(ResumableSampler(10, 40, seed=1, rank=0, world=1, chunk=4)) == full
    # Resume after 3 optimizer steps of 2 ranks x batch 4: each rank continues exactly where it stopped.
    consumed = 3 * 2 * 4
    for rank in range(2):
        whole = list(ResumableSampler(10, 40, seed=1, rank=rank, world=2, chunk=4))
        resumed = list(ResumableSampler(10, 40, seed=1, start=consumed, rank=rank, world=2, chunk=4))
        assert resumed == whole[consumed // 2:]


def test_rank_outside_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(10, 40, seed=1, rank=2, world=2)
