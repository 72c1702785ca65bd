"""A seconds-long check that every registered objective really aligns a policy.

The policy is a table of logits over K candidate answers for each of N prompts; a hidden
reward scores every (prompt, candidate). Each objective trains a fresh copy from the uniform
policy (which is also the reference) on the data its kind consumes:

- pairwise objectives: pairs of candidates labelled by a Bradley-Terry annotator of the hidden
  reward (so some labels are wrong), reward scores squashed to [0, 1] for the objectives that
  use them;
- listwise objectives: all K candidates with their reward scores;
- the policy-gradient objective: candidates sampled from the current policy, advantages
  normalised over the batch.

An objective passes when the expected hidden reward of the trained policy exceeds the
uniform policy's by ``min_gain``. This is the real optimisation path of the library
(``get_objective`` -> ``__call__`` -> ``loss.backward``), only the estimator is a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.objectives import get_objective, list_objectives

__all__ = ["SelfCheckConfig", "run_selfcheck", "unexpected"]


@dataclass
class SelfCheckConfig:
    objectives: list[str] = field(default_factory=list)  # empty: every registered objective
    prompts: int = 64
    candidates: int = 4
    batch_size: int = 64
    steps: int = 150
    lr: float = 0.05
    min_gain: float = 0.1
    seed: int = 0
    # Hyper-parameters for this toy scale (the defaults of smoothed_dpo are SD1.5's).
    objective_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"smoothed_dpo": {"beta": 0.1, "reward_min": 0.0, "reward_max": 1.0}}
    )
    output: Path | None = None  # where to write the JSON report
    # Objectives whose defaults are known not to align the toy policy, and why: reported as
    # "known failure" and not counted against the exit code; one that passes is reported too.
    known_failures: dict[str, str] = field(
        default_factory=lambda: {
            "discopop": "at TRL's tau 0.05 the loss rises with the margin near 0 (slope +0.785 at z = 0), "
            "so descent from the reference prefers the rejected answer",
        }
    )


def _batch(kind: str, logits: torch.Tensor, reward: torch.Tensor, cfg: SelfCheckConfig, g: torch.Generator):
    n, k = reward.shape
    logp = F.log_softmax(logits, -1)
    ref = torch.full_like(logp, -torch.log(torch.tensor(float(k))).item())
    idx = torch.randint(n, (cfg.batch_size,), generator=g)
    ones = torch.ones(cfg.batch_size)  # an answer is one token: per-token and summed log-probs agree
    if kind == "listwise":
        lengths = torch.ones(cfg.batch_size, k)
        return {
            "policy_logps": logp[idx],
            "reference_logps": ref[idx],
            "rewards": reward[idx],
            "lengths": lengths,
        }
    if kind == "policy_gradient":
        with torch.no_grad():
            picks = torch.multinomial(logp[idx].exp(), 1, generator=g).squeeze(1)
        r = reward[idx, picks]
        taken = logp[idx, picks]
        return {
            "policy_logps": taken,
            "old_policy_logps": taken.detach(),
            "advantages": (r - r.mean()) / (r.std() + 1e-7),
        }
    a = torch.randint(k, (cfg.batch_size,), generator=g)
    b = (a + torch.randint(1, k, (cfg.batch_size,), generator=g)) % k  # a different candidate
    a_wins = torch.rand(cfg.batch_size, generator=g) < torch.sigmoid(reward[idx, a] - reward[idx, b])
    w, lo = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    scores = torch.sigmoid(reward)
    return {
        "policy_chosen_logps": logp[idx, w],
        "policy_rejected_logps": logp[idx, lo],
        "reference_chosen_logps": ref[idx, w],
        "reference_rejected_logps": ref[idx, lo],
        "chosen_rewards": scores[idx, w],
        "rejected_rewards": scores[idx, lo],
        "chosen_lengths": ones,
        "rejected_lengths": ones,
    }


def _expected_reward(logits: torch.Tensor, reward: torch.Tensor) -> float:
    return float((logits.softmax(-1) * reward).sum(-1).mean())


def check_objective(name: str, cfg: SelfCheckConfig) -> dict[str, Any]:
    """Train the table policy with one objective; report expected reward before and after."""
    g = torch.Generator().manual_seed(cfg.seed)
    reward = torch.randn(cfg.prompts, cfg.candidates, generator=g) * 2
    objective = get_objective(name, **cfg.objective_options.get(name, {}))
    logits = torch.zeros_like(reward, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=cfg.lr)
    before = _expected_reward(logits.detach(), reward)
    metrics: dict[str, float] = {}
    for _ in range(cfg.steps):
        out = objective(**_batch(objective.kind, logits, reward, cfg, g))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        metrics = out.metrics
    after = _expected_reward(logits.detach(), reward)
    best = reward.max(-1).values.mean().item()
    return {
        "objective": name,
        "expected_reward_before": before,
        "expected_reward_after": after,
        "best_possible": best,
        "final_loss": float(out.loss.detach()),
        "final_metrics": metrics,
        "passed": after - before >= cfg.min_gain,
        "known_failure": cfg.known_failures.get(name),
    }


def run_selfcheck(cfg: SelfCheckConfig) -> list[dict[str, Any]]:
    names = cfg.objectives or list_objectives()
    results = [check_objective(name, cfg) for name in names]
    if cfg.output is not None:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        cfg.output.write_text(json.dumps(results, indent=2))
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = [f"{'objective':<20}{'reward before':>15}{'after':>9}{'best':>8}  result"]
    for r in results:
        lines.append(
            f"{r['objective']:<20}{r['expected_reward_before']:>15.3f}{r['expected_reward_after']:>9.3f}"
            f"{r['best_possible']:>8.3f}  {_verdict(r)}"
        )
    passed = sum(r["passed"] for r in results)
    known = sum(not r["passed"] and bool(r["known_failure"]) for r in results)
    lines.append(
        f"selfcheck: {passed} passed, {len(results) - passed - known} failed, {known} known failures"
    )
    return "\n".join(lines)


def unexpected(results: list[dict[str, Any]]) -> list[str]:
    """The objectives whose result is not what was expected: a failure not listed as known, or a
    known failure that passed (its reason is then stale)."""
    return [r["objective"] for r in results if r["passed"] == bool(r["known_failure"])]


def _verdict(r: dict[str, Any]) -> str:
    if r["known_failure"]:
        return "passed (listed as a known failure)" if r["passed"] else f"known failure: {r['known_failure']}"
    return "ok" if r["passed"] else "FAILED"
