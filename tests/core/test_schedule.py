from __future__ import annotations

import pytest

from lightning_sparse.core.schedule import INTERPOLATIONS, SparsitySchedule, interpolate


@pytest.mark.parametrize("inter_func", sorted(INTERPOLATIONS))
def test_interpolation_starts_and_ends_at_the_targets(inter_func: str) -> None:
    assert interpolate(inter_func, 0.1, 0.9, 0.0) == pytest.approx(0.1)
    assert interpolate(inter_func, 0.1, 0.9, 1.0) == pytest.approx(0.9)
    values = [interpolate(inter_func, 0.0, 0.9, p / 20) for p in range(21)]
    assert values == sorted(values), "sparsity must never shrink along the schedule"


def test_interpolation_shapes() -> None:
    # cubic prunes fast early, inverse_cubic late, linear in between.
    assert interpolate("cubic", 0.0, 1.0, 0.5) == pytest.approx(0.875)
    assert interpolate("linear", 0.0, 1.0, 0.5) == pytest.approx(0.5)
    assert interpolate("inverse_cubic", 0.0, 1.0, 0.5) == pytest.approx(0.125)
    # progress outside [0, 1] is clamped rather than extrapolated
    assert interpolate("linear", 0.2, 0.8, 1.5) == pytest.approx(0.8)


def test_updates_fall_on_the_frequency_grid_and_on_end_epoch() -> None:
    schedule = SparsitySchedule(0.0, 0.8, start_epoch=1.0, end_epoch=2.1, update_frequency=0.25)
    assert schedule.num_updates == 6  # 1.0, 1.25, 1.5, 1.75, 2.0 and the end 2.1
    assert [schedule.update_epoch(i) for i in range(6)] == pytest.approx(
        [1.0, 1.25, 1.5, 1.75, 2.0, 2.1]
    )
    trajectory = {epoch: schedule.due_index(epoch) for epoch in (0.0, 0.99, 1.0, 1.3, 2.09, 2.1, 9)}
    assert trajectory == {0.0: -1, 0.99: -1, 1.0: 0, 1.3: 1, 2.09: 4, 2.1: 5, 9: 5}
    assert schedule.sparsity_at(0.5) == 0.0
    assert schedule.sparsity_at(2.1) == pytest.approx(0.8)
    assert schedule.sparsity_at(1.0) == pytest.approx(0.0)


def test_fractional_steps_do_not_accumulate_float_error() -> None:
    # 0.1 is not exact in binary; update 7 is due at exactly epoch 0.7, not one step later.
    schedule = SparsitySchedule(0.0, 0.5, start_epoch=0.0, end_epoch=1.0, update_frequency=0.1)
    assert schedule.num_updates == 11
    assert schedule.due_index(7 / 10) == 7
    assert schedule.due_index(3 * 0.1) == 3


def test_single_update_when_start_equals_end() -> None:
    schedule = SparsitySchedule(0.0, 0.7, start_epoch=2.0, end_epoch=2.0, update_frequency=1.0)
    assert schedule.num_updates == 1
    assert schedule.due_index(1.99) == -1
    assert schedule.sparsity_at(2.0) == pytest.approx(0.7)
