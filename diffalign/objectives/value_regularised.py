"""VPO, value-incentivised preference optimisation (Cen et al. 2024, arXiv 2405.19320, ICLR 2025):
DPO plus a term linear in the log-ratio of calibration samples. Notation:
:mod:`diffalign.objectives.pairwise`.

Derivation (UNVERIFIED reconstruction; no official code exists and the equation numbers of the
paper were not read, see ``../shared/SEED-METHODS.md`` §2.1): VPO fits the reward by
``argmin_r NLL_BT(r) - sign * alpha * [J*(r) - E_{y~pi_cal} r(y)]``, ``J*`` the KL-regularised value of
``r``; with the implicit reward ``r = beta rho + beta log Z(x)`` the calibrated value is
``-beta E_cal[rho]``, so the policy loss is DPO ``+ sign * alpha * beta * E_cal[rho]``, sign -1 offline
(pessimism: raises the likelihood of the calibration samples) and +1 online (optimism: lowers it,
exploration; the functional form of XPO, Xie et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from diffalign.config import NON_NEGATIVE, Range
from diffalign.objectives.base import Inputs, register_objective
from diffalign.objectives.log_ratio import DPO

__all__ = ["VPO"]


@register_objective("vpo")
@dataclass
class VPO(DPO):
    """VPO (Cen et al. 2024, §3-4, UNVERIFIED reconstruction): ``-log sigma(beta h) + s alpha beta c``
    per pair, ``c`` the mean log-ratio ``rho`` of the pair's calibration samples, ``s`` -1 for
    ``mode="offline"`` (pessimistic) and +1 for ``"online"`` (optimistic); beta 0.1, alpha 0.1.

    Calibration samples (``pi_cal``): ``"chosen"``, ``c = rho(y_w)``, the offline choice (the
    preferred responses: offline VPO is then DPO plus a likelihood term on the chosen, RPO-like);
    ``"both"``, ``c = (rho(y_w) + rho(y_l)) / 2``, the online choice: in an online round both
    responses are sampled from the reference (the previous iterate), so they are samples of
    ``pi_cal = pi_ref`` with no extra generation (:mod:`diffalign.text.online`).

    Scale (our choice): the paper's NLL is a sum over the N pairs and its regulariser an
    expectation, so its alpha is ours times N; here both terms are per-pair means, ``rho`` uses
    the same (summed) log-likelihoods as the DPO term, and alpha 0.1 makes the regulariser's
    gradient at most a tenth of DPO's largest (``beta sigma(-beta h) <= beta``). The paper sweeps
    alpha; its values were not read. The online term is unbounded below (it lowers ``l(y_cal)``
    without limit): keep alpha small. A soft label ``p`` mixes the orders, so with ``"chosen"``
    the calibration term becomes ``p rho(y_w) + (1 - p) rho(y_l)``.
    """

    ranges: ClassVar[dict[str, Range]] = {"alpha": NON_NEGATIVE}

    alpha: float = 0.1
    mode: Literal["offline", "online"] = "offline"
    calibration: Literal["chosen", "both"] = "chosen"

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        dpo, _ = super().pair_losses(chosen, rejected, x)
        # chosen, rejected are beta * rho: the regulariser alpha * beta * c is alpha * (these)
        calibration = chosen if self.calibration == "chosen" else (chosen + rejected) / 2
        sign = -1.0 if self.mode == "offline" else 1.0
        return dpo + sign * self.alpha * calibration, {
            "vpo/calibration_logratio": calibration.mean() / self.beta
        }
