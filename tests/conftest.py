"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite runs tiny models: a second thread only adds overhead and contention (measured 3-20x slower
    products with 2 threads on the 2-core machine while another process ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
