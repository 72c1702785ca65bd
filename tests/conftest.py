from __future__ import annotations

import pytest
import torch
from pairs import make_pairs


@pytest.fixture
def pairs() -> dict[str, torch.Tensor]:
    return make_pairs()
