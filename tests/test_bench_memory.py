"""benchmarks.common.tensor_peak_bytes: the allocator's own count of tensor bytes."""

import torch

from benchmarks.common import tensor_peak_bytes


def test_tensor_peak_is_the_largest_sum_of_live_tensor_bytes():
    """4 MB + 4 MB live at once, then 4 MB freed and 2 MB allocated: the peak growth is
    8,000,000 bytes exactly (counted from the call's start: a tensor made before it and freed
    inside it does not raise the peak), and the value passes through."""
    before = torch.ones(250, 1000)  # 1 MB, freed inside

    def work():
        nonlocal before
        a, b = torch.empty(1000, 1000), torch.empty(1000, 1000)
        del a
        before = None
        c = torch.empty(500, 1000, dtype=torch.float64)  # 4 MB, while b lives: 8 MB again
        return b, c

    (b, c), peak = tensor_peak_bytes(work)
    assert peak == 8_000_000
    assert b.shape == (1000, 1000) and c.dtype == torch.float64
    # ones (400 bytes) and exp (400) live together; ones is freed before sum's 4 bytes
    _, peak = tensor_peak_bytes(lambda: torch.ones(10, 10).exp().sum())
    assert peak == 800
