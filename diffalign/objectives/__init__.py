"""Preference objectives: pure functions over per-sample log-likelihoods.

>>> from diffalign.objectives import get_objective, list_objectives
>>> dpo = get_objective("dpo", beta=0.1)
>>> out = dpo(policy_chosen_logps=..., policy_rejected_logps=...,
...           reference_chosen_logps=..., reference_rejected_logps=...)  # doctest: +SKIP
>>> out.loss.backward(); out.metrics["rewards/accuracies"]  # doctest: +SKIP

See :mod:`diffalign.objectives.base` for the interface and each objective's docstring for its
formula, source and defaults.
"""

from diffalign.objectives.base import (
    LISTWISE_INPUTS,
    PAIRWISE_INPUTS,
    POLICY_GRADIENT_INPUTS,
    Objective,
    ObjectiveInputError,
    ObjectiveOutput,
    check_objective_inputs,
    check_ties,
    get_objective,
    list_objectives,
    objective_class,
    objective_spec,
    register_objective,
    soft_preference_probs,
)
from diffalign.objectives.calibration import PearsonCalibration
from diffalign.objectives.kldo import KLDO
from diffalign.objectives.listwise import NCA, InfoNCA, ListwiseObjective
from diffalign.objectives.log_ratio import (
    APO,
    CDPO,
    DPO,
    FDPO,
    IPO,
    RSO,
    APODown,
    APOZero,
    DROranking,
    Hinge,
    RobustDPO,
)
from diffalign.objectives.pairwise import PairwiseObjective
from diffalign.objectives.policy_gradient import PPOClip
from diffalign.objectives.reference_free import CPO, ORPO, SimPO
from diffalign.objectives.reward_weighted import MADPO, MaPPO, SmoothedDPO
from diffalign.objectives.sampling import PairRule, pairs_from_scores, rso_rejection_sample
from diffalign.objectives.trl_losses import (
    AOT,
    SFT,
    AOTUnpaired,
    BCOPair,
    Combined,
    DiscoPOP,
    DPONorm,
    EXOPair,
    SPPOHard,
)
from diffalign.objectives.value_regularised import VPO

__all__ = [
    "AOT",
    "APO",
    "CDPO",
    "CPO",
    "DPO",
    "FDPO",
    "IPO",
    "KLDO",
    "LISTWISE_INPUTS",
    "MADPO",
    "NCA",
    "ORPO",
    "PAIRWISE_INPUTS",
    "POLICY_GRADIENT_INPUTS",
    "RSO",
    "SFT",
    "VPO",
    "AOTUnpaired",
    "APODown",
    "APOZero",
    "BCOPair",
    "Combined",
    "DPONorm",
    "DROranking",
    "DiscoPOP",
    "EXOPair",
    "Hinge",
    "InfoNCA",
    "ListwiseObjective",
    "MaPPO",
    "Objective",
    "ObjectiveInputError",
    "ObjectiveOutput",
    "PPOClip",
    "PairRule",
    "PairwiseObjective",
    "PearsonCalibration",
    "RobustDPO",
    "SPPOHard",
    "SimPO",
    "SmoothedDPO",
    "check_objective_inputs",
    "check_ties",
    "get_objective",
    "list_objectives",
    "objective_class",
    "objective_spec",
    "pairs_from_scores",
    "register_objective",
    "rso_rejection_sample",
    "soft_preference_probs",
]
