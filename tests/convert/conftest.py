"""One intra-op thread for these tests: they run many small ops, where a thread pool only adds hand-off cost (on a
loaded 2-core machine, several times the run time)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_intraop_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
