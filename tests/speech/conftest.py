"""Fixtures shared by the speech tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # On the shared 2-core CI box, 2 intra-op threads make torch.isin (HF's suppress-tokens processor)
    # take ~0.9 s per decoding step; one thread makes Whisper's generate() 5-7x faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
