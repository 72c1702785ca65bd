from __future__ import annotations

import pytest
import torch
from pairs import make_pairs


@pytest.fixture
def pairs() -> dict[str, torch.Tensor]:
    return make_pairs()


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny SD, SD v-prediction, SDXL and inpainting pipelines saved in diffusers format."""
    from diffusers.utils import logging as diffusers_logging

    from diffalign.diffusion.tiny import build_tiny_pipeline

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": str(build_tiny_pipeline(root / "sd", kind="sd")),
        "sd_v": str(build_tiny_pipeline(root / "sd_v", kind="sd", prediction_type="v_prediction")),
        "sdxl": str(build_tiny_pipeline(root / "sdxl", kind="sdxl")),
        "inpaint": str(build_tiny_pipeline(root / "inpaint", kind="inpaint")),
    }


@pytest.fixture(scope="session")
def reward_assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from reward_assets import build_reward_assets

    return build_reward_assets(tmp_path_factory.mktemp("rewards"))
