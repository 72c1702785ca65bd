"""ImageReward (Xu et al. 2023), through the ``image-reward`` package when it imports.

image-reward 1.5 imports ``apply_chunking_to_forward`` and friends from
``transformers.modeling_utils``, which transformers stopped re-exporting in 4.56; it also pins
``timm==0.6.13`` and ``fairscale==0.4.13`` and imports OpenAI's ``clip`` package. It runs beside
transformers >= 4.27.4, < 4.56 only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.images import to_pil
from diffalign.rewards import RewardModel

WORKING_VERSIONS = "transformers >= 4.27.4, < 4.56 (with timm 0.6.13, fairscale 0.4.13 and OpenAI's clip)"


def import_failure(err: Exception) -> RuntimeError:
    import transformers

    return RuntimeError(
        f"the image-reward package is installed but could not be imported: {err!r} "
        f"(transformers {transformers.__version__} here); image-reward 1.5 runs beside {WORKING_VERSIONS}"
    )


def import_image_reward() -> object:
    """The ``ImageReward`` package, or an error naming the real import failure."""
    try:
        import ImageReward
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "ImageReward":
            raise RuntimeError(
                "the 'imagereward' reward needs the image-reward package (pip install image-reward); "
                f"image-reward 1.5 runs beside {WORKING_VERSIONS}"
            ) from err
        raise import_failure(err) from err
    except Exception as err:  # a broken dependency may fail at import in any way
        raise import_failure(err) from err
    return ImageReward


class ImageRewardModel(RewardModel):
    """BLIP-based ImageReward; scores are the package's z-normalised rewards (``model.score``).

    ``model``: ``"ImageReward-v1.0"`` (downloaded by the package) or a local ``ImageReward.pt``;
    ``med_config``: the BLIP text encoder's ``med_config.json`` (hub repo ``THUDM/ImageReward``).
    Offline, pass both as local files; by default ``med_config.json`` is looked for beside a local
    ``model`` file.

    Raises:
        RuntimeError: the package is missing or does not import (naming why and what works).
        FileNotFoundError: a local ``model`` without a ``med_config.json`` found or given.
    """

    needs_prompts = True

    def __init__(
        self,
        model: str | Path = "ImageReward-v1.0",
        med_config: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        image_reward = import_image_reward()
        if med_config is None and Path(model).is_file():
            med_config = Path(model).parent / "med_config.json"
        if med_config is not None and not Path(med_config).is_file():
            raise FileNotFoundError(
                f"ImageReward: no med_config.json at {med_config}; download it from the hub repo "
                f"THUDM/ImageReward and pass med_config=PATH"
            )
        self._device = torch.device(device or "cpu")
        self.model = image_reward.load(
            str(model), device=str(self._device), med_config=None if med_config is None else str(med_config)
        )

    @property
    def device(self) -> torch.device:
        return self._device

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        scores = [float(self.model.score(p, im)) for p, im in zip(prompts, to_pil(images), strict=True)]
        return torch.tensor(scores, device=images.device)
