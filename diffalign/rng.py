"""Per-sample random streams.

A sample's random draws (its noise and timestep, its caption dropout, its rollout's noise, the
timesteps a policy-gradient step trains) come from a generator of its own, seeded by the run's seed
and the sample's position in the global data stream (:func:`stream_seeds`). They do not depend on
how a batch is split over processes or micro-batches: a two-process run draws for each sample what
a one-process run of the same global batch draws, and a resumed run what the interrupted one drew.

The draw functions take ``generator`` as diffusers' pipelines do: one ``torch.Generator``, a list
with one per row (row ``i`` drawn from ``generator[i]``), or None (torch's global generator).
Per-row generators live on the CPU, so that a sample's draws are the same on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "child_seeds", "generators", "rand", "randint", "randn", "stream_seeds"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers: nearby inputs give unrelated seeds (unlike a linear mix)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stream_seeds(seed: int, first: int, n: int) -> list[int]:
    """Seeds of the samples at positions ``first`` .. ``first + n - 1`` of a run's data stream
    (position ``p`` is the ``p``-th sample the run's processes see together, counted from 0)."""
    return [_mix(seed, position) for position in range(first, first + n)]


def child_seeds(seeds: Sequence[int], k: int) -> list[int]:
    """``k`` seeds per seed, row-major (``k`` rollouts of one prompt each get a stream of their own)."""
    return [_mix(s, j) for s in seeds for j in range(k)]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def _rows(
    draw: Callable[[int, torch.Generator | None], Tensor],
    n: int,
    generator: Generators,
    device: torch.device | str | None,
) -> Tensor:
    """``draw(rows, generator)`` once for all rows, or row by row from a list of generators."""
    if generator is None or isinstance(generator, torch.Generator):
        out = draw(n, generator)
    else:
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} rows: give one per row")
        out = torch.cat([draw(1, g) for g in generator]) if n else draw(0, None)
    return out.to(device) if device is not None else out


def randn(
    shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """Standard normal draws of ``shape`` (rows first), drawn in float32 and cast to ``dtype``."""
    rest = tuple(shape[1:])
    return _rows(lambda n, g: torch.randn((n, *rest), generator=g), shape[0], generator, device).to(dtype)


def randint(
    high: int, n: int, generator: Generators = None, device: torch.device | str | None = None
) -> Tensor:
    """``n`` integers uniform in [0, ``high``) (int64)."""
    return _rows(lambda m, g: torch.randint(0, high, (m,), generator=g), n, generator, device)


def rand(n: int, generator: Generators = None, device: torch.device | str | None = None) -> Tensor:
    """``n`` floats uniform in [0, 1)."""
    return _rows(lambda m, g: torch.rand(m, generator=g), n, generator, device)
