"""Regression pairs are cached by what they are (teacher weights, sampler), not where the teacher lives."""

import shutil

from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dmd.regression_pairs import pairs_for_config


def test_the_pair_cache_is_shared_by_copies_of_one_teacher(tmp_path):
    copy = tmp_path / "teacher_copy"
    shutil.copytree(ROOT / "experiments/checkpoints/fmnist_teacher", copy)
    made = []
    for path in (ROOT / "experiments/checkpoints/fmnist_teacher", copy):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                "experiment=fmnist_dmd", f"teacher.path={path}", f"paths.cache_dir={tmp_path}/cache",
                "algorithm.regression.num_pairs=4", "algorithm.regression.steps=1"])
        made.append(pairs_for_config(cfg, instantiate(cfg.teacher)))
    files = list((tmp_path / "cache" / "pairs").glob("*"))
    assert sorted(f.suffix for f in files) == [".json", ".safetensors"]  # one set, no temporary left
    assert all(made[0][k].equal(made[1][k]) for k in made[0])
