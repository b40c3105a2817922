"""The drainer's model threads: the setting, then OMP_NUM_THREADS, then the CPUs it may run on."""

from __future__ import annotations

import os

import pytest
import torch

from taskserver.platform.request_lane.batches import use_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert use_threads(3) == 3
    assert torch.get_num_threads() == 3


def test_omp_num_threads_when_the_setting_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert use_threads(0) == 1
    assert torch.get_num_threads() == 1


def test_the_cpus_this_process_may_use_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert use_threads(0) == len(os.sched_getaffinity(0))
