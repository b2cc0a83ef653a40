"""``python -m dmd.pairs experiment=fmnist_dmd``: make the regression pairs a training run would
use (``algorithm.regression.*``) ahead of time; ``dmd.train`` makes them itself when missing.
The pairs themselves: :mod:`dmd.regression_pairs`.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from dmd.regression_pairs import pairs_for_config
from dmd.validation import validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    validate(cfg, "train")
    pairs_for_config(cfg, instantiate(cfg.teacher))


if __name__ == "__main__":
    main()
