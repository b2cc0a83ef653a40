"""Every entry point's config composes, and mistakes fail with a message that names them."""

import re

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ENTRY_CONFIGS = ["pretrain", "sample", "train_classifier", "train"]


def _compose(name, overrides=()):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_entry_configs_compose(name):
    cfg = _compose(name)
    assert cfg.task_name == name
    assert cfg.paths.checkpoints_dir.endswith("experiments/checkpoints")
    # Unique run dirs: the time stamp carries microseconds.
    assert re.search(rf"outputs/{name}/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d_\d{{6}}$", cfg.hydra.run.dir)
    assert re.search(r"multirun/.*_\d{6}$", cfg.hydra.sweep.dir)


def test_pretrain_components_instantiate():
    cfg = _compose("pretrain", ["network=tiny_unet"])
    unet = instantiate(cfg.network, _convert_="all")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 28
    scheduler = instantiate(cfg.noise_scheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert instantiate(cfg.trainer).max_steps == 4000


def test_data_presets_instantiate():
    for name, weights0 in (("gmm8", 1 / 8), ("gmm8_unequal", 8 / 22)):
        cfg = _compose("pretrain", [f"data={name}"])
        dm = instantiate(cfg.data)
        assert dm.mixture.num_components == 8
        assert dm.mixture.weights[0].item() == pytest.approx(weights0)


def test_gmm_teacher_preset_instantiates():
    teacher = instantiate(_compose("sample", ["teacher=gmm8"]).teacher)
    assert teacher.sample_shape == (2,) and teacher.num_classes == 0


def test_mistyped_key_is_refused(cli, tmp_path):
    proc = cli("dmd.sample", "num_samples=2", f"out={tmp_path}/x.npz", "sampler.stpes=4",
               f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert "Key 'stpes' is not in struct" in proc.stderr


def test_missing_out_is_refused(cli, tmp_path):
    proc = cli("dmd.sample", "teacher=gmm8", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "Missing mandatory value: out" in proc.stderr
