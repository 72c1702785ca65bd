"""Parts of the online methods (Diffusion-DRO, PrefPaint's PPO): a lagged copy of the policy that
samples, and a replay buffer of what it sampled. Both are checkpointable (``state_dict`` /
``load_state_dict``), so a method lists them in ``Method.state()`` and a resumed run goes on with
the same samples and the same sampling weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.diffusion.policy import DiffusionPolicy

__all__ = ["LaggedPolicy", "ReplayBuffer"]


class LaggedPolicy:
    """A frozen copy of ``live`` (:meth:`DiffusionPolicy.frozen_copy`) re-synced after every
    ``every``-th optimiser step: Diffusion-DRO samples its negatives from one synced every step
    (basiclab/DiffusionDRO ``train.py``, ``buffer_update_steps``), PrefPaint's PPO every 15.

    A checkpoint holds the copy's weights only when they differ from the live policy's (a sync
    is not due at the checkpoint's step); otherwise it records that they are equal, and the copy
    is re-synced from the restored live weights when first used (:attr:`policy`), since a
    checkpoint's method state loads before the model weights.
    """

    def __init__(self, live: DiffusionPolicy, every: int) -> None:
        if every < 1:
            raise ValueError(f"a lagged policy syncs every >= 1 optimiser steps, got {every}")
        self.live, self.every = live, every
        self._copy = live.frozen_copy()
        self.synced_at = 0  # the optimiser step whose live weights the copy holds
        self.step = 0  # optimiser steps done
        self._sync_pending = False

    @property
    def policy(self) -> DiffusionPolicy:
        """The lagged policy, to sample from (no gradients: its UNet is frozen)."""
        if self._sync_pending:
            self._copy.load_unet_from(self.live)
            self._sync_pending = False
        return self._copy

    def on_optimizer_step(self, step: int) -> None:
        """Record that optimiser step ``step`` is done; re-sync when ``step`` is a multiple of ``every``."""
        self.step = step
        if step % self.every == 0:
            self._copy.load_unet_from(self.live)
            self._sync_pending = False
            self.synced_at = step

    def state_dict(self) -> dict[str, Any]:
        equal = self.synced_at == self.step
        weights = None if equal else {k: v.detach().cpu() for k, v in self._copy.unet.state_dict().items()}
        return {"synced_at": self.synced_at, "step": self.step, "every": self.every, "unet": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ``ValueError`` when the checkpoint synced at another interval (the copy it holds
        would not be this run's)."""
        if state["every"] != self.every:
            raise ValueError(
                f"the checkpoint's lagged policy synced every {state['every']} optimiser steps, this "
                f"run every {self.every}: resume with the same interval"
            )
        self.synced_at, self.step = state["synced_at"], state["step"]
        self._sync_pending = state["unet"] is None
        if state["unet"] is not None:
            self._copy.unet.load_state_dict(state["unet"])


class ReplayBuffer:
    """The last ``capacity`` rows pushed, first in first out, drawn uniformly.

    A row is one sample: a named set of tensors sharing their first dimension (e.g. a trajectory's
    latents (T, C, h, w), its timesteps (T,) and its prompt's embedding). Rows live on the CPU
    (as the official Diffusion-DRO buffer's ``cpu_offload``); :meth:`draw` returns them there.
    """

    def __init__(self, capacity: int, settings: Mapping[str, Any] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a replay buffer holds >= 1 rows, got capacity {capacity}")
        self.capacity = capacity
        self.settings = dict(settings or {})  # what shapes the rows, by config key: checked on load
        self.rows: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(next(iter(self.rows.values()))) if self.rows else 0

    def push(self, rows: dict[str, Tensor]) -> None:
        """Append ``rows`` (name -> (N, ...), the same N and names at every push), dropping the
        oldest beyond ``capacity``. Raises ``ValueError`` on mismatched names or row counts."""
        counts = {len(v) for v in rows.values()}
        if len(counts) != 1:
            raise ValueError(f"rows pushed together must have one length, got {sorted(counts)}")
        if self.rows and rows.keys() != self.rows.keys():
            raise ValueError(f"the buffer holds {sorted(self.rows)}, the push has {sorted(rows)}")
        for name, new in rows.items():
            new = new.detach().cpu()
            kept = torch.cat([self.rows[name], new]) if name in self.rows else new
            self.rows[name] = kept[-self.capacity :]

    def draw(self, n: int) -> dict[str, Tensor]:
        """``n`` rows drawn with torch's global generator: distinct rows when the buffer holds at
        least ``n`` (``randperm``), else with replacement (as the official ``ReplayBuffer.sample``).
        Raises ``ValueError`` on an empty buffer."""
        size = len(self)
        if size == 0:
            raise ValueError("draw from an empty replay buffer: push rows first")
        index = torch.randperm(size)[:n] if n <= size else torch.randint(0, size, (n,))
        return {name: rows[index] for name, rows in self.rows.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "settings": dict(self.settings), "rows": dict(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ``ValueError`` when the checkpoint's buffer had another capacity, or was filled
        under other ``settings`` (its rows would not fit this run's: rollout steps, image size)."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer holds {state['capacity']} rows, this run's "
                f"{self.capacity}: resume with the same buffer size"
            )
        saved = state.get("settings", {})
        changed = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in self.settings.items() if saved.get(k) != v]
        if changed:
            raise ValueError(
                f"the checkpoint's replay buffer was filled with {', '.join(changed)}: its rows do not fit "
                "this run; resume with the same settings"
            )
        self.rows = dict(state["rows"])
