"""Property-based checks of every pairwise objective: for any finite inputs in the ranges the
models produce (text log-likelihoods of long answers, diffusion ELBO terms of large latents),
loss and gradients are finite, and the loss does not depend on the order of the pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_objective_gradients import CONFIGS, DIFFERENTIABLE

from diffalign.objectives import get_objective

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)
LOGPS = st.floats(-5000.0, 0.0, allow_nan=False, width=32)


@st.composite
def pair_batches(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 5))

    def column(values: st.SearchStrategy[float]) -> torch.Tensor:
        return torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)

    names = (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
    )
    batch = {name: column(LOGPS) for name in names}
    batch |= {f"{side}_rewards": column(st.floats(0.0, 1.0, width=32)) for side in ("chosen", "rejected")}
    batch |= {f"{side}_lengths": column(st.integers(1, 4096).map(float)) for side in ("chosen", "rejected")}
    return batch


@pytest.mark.parametrize(
    ("name", "hparams"), CONFIGS, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in CONFIGS]
)
@PROPERTY
@given(batch=pair_batches(), order=st.randoms(use_true_random=False))
def test_finite_inputs_give_a_finite_loss_and_gradient_whatever_the_order(
    name: str, hparams: dict, batch: dict[str, torch.Tensor], order
) -> None:
    obj = get_objective(name, **hparams)
    inputs = {k: v.clone().requires_grad_(k in DIFFERENTIABLE) for k, v in batch.items()}
    loss = obj(**inputs).loss
    assert torch.isfinite(loss), (name, batch)
    loss.backward()
    for k in DIFFERENTIABLE:
        assert torch.isfinite(inputs[k].grad).all(), (name, k, batch)
    permutation = list(range(len(batch["policy_chosen_logps"])))
    order.shuffle(permutation)
    shuffled = get_objective(name, **hparams)(**{k: v[permutation] for k, v in batch.items()}).loss
    torch.testing.assert_close(shuffled, loss.detach(), rtol=1e-5, atol=1e-5)
