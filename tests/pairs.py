"""Small synthetic inputs for the objective tests."""

from __future__ import annotations

import torch


def make_pairs(batch: int = 6, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small pairwise batch with plausible values: log-likelihoods < 0, rewards in [0, 1]."""
    g = torch.Generator().manual_seed(seed)

    def logps() -> torch.Tensor:
        return -(torch.rand(batch, generator=g, dtype=torch.float64) * 3 + 0.1)

    pairs = {
        "policy_chosen_logps": logps(),
        "policy_rejected_logps": logps(),
        "reference_chosen_logps": logps(),
        "reference_rejected_logps": logps(),
        "chosen_rewards": torch.rand(batch, generator=g, dtype=torch.float64),
        "rejected_rewards": torch.rand(batch, generator=g, dtype=torch.float64),
        "chosen_lengths": torch.randint(1, 9, (batch,), generator=g).double(),
        "rejected_lengths": torch.randint(1, 9, (batch,), generator=g).double(),
    }
    return {k: v.to(dtype) for k, v in pairs.items()}
