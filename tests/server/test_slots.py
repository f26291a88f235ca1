"""The slot pool's runs of rows: found among free rows, taken whole, and rows moved into
them with their states."""

from types import SimpleNamespace

import torch

from model.fused import StateLayout
from server.slots import SlotPool


def pool(capacity: int) -> SlotPool:
    layout = StateLayout.of([("x", (2, 3), torch.float32), ("m", (1,), torch.float64)])
    return SlotPool(SimpleNamespace(layout=layout, device=torch.device("cpu")), capacity)


def test_a_run_is_the_first_long_enough_stretch_of_free_rows():
    p = pool(10)
    taken = [p.allocate() for _ in range(10)]
    assert taken == list(range(10)) and p.allocate_run(1) is None
    for slot in (1, 2, 4, 5, 6, 8):
        p.free(slot)
    assert p.allocate_run(4) is None  # six free rows, no four in a row
    assert p.allocate_run(3) == 4
    assert p.allocate_run(3) is None and p.in_use == 7
    assert sorted(p.allocate() for _ in range(3)) == [1, 2, 8]  # the run's rows stay taken
    assert p.allocate() is None


def test_moved_rows_keep_their_states_and_counts_in_the_order_given_and_free_the_old_rows():
    p = pool(8)
    slots = [p.allocate() for _ in range(4)]  # 0..3
    for slot in slots:
        p.flat32[slot] = float(slot)
        p.flat64[slot] = -float(slot)
        p.steps[slot] = 10 * slot
    first = p.allocate_run(3)
    assert first == 4
    p.move([3, 0, 2], first)
    assert p.flat32[4:7, 0].tolist() == [3.0, 0.0, 2.0]
    assert p.flat64[4:7, 0].tolist() == [-3.0, -0.0, -2.0]
    assert p.steps[4:7].tolist() == [30, 0, 20]
    assert p.in_use == 4  # rows 1, 4, 5, 6
    assert sorted(p.allocate() for _ in range(4)) == [0, 2, 3, 7]
