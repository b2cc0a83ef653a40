"""Every command's configuration is checked once, before anything is built or written, and
every problem is named in one message (dmd.validation)."""

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from dmd.validation import ConfigError, validate

# Input checking, not the method: outside the fast tier (which stays within 4 minutes).
pytestmark = pytest.mark.slow


def _cfg(name, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("name,extra", [("train", ["experiment=fmnist_dmd2"]), ("train", ["experiment=gmm_dmd"]),
                                        ("train", ["experiment=t2i_tiny"]), ("sample", ["out=x.npz"]),
                                        ("evaluate", []), ("pretrain", []), ("train_classifier", [])])
def test_the_shipped_configs_are_valid(name, extra):
    validate(_cfg(name, *extra), name)


TRAIN_MISTAKES = {
    "algorithm.dm_t_range=[0.9,0.1]": "algorithm.dm_t_range=[0.9, 0.1]: must be [lo, hi] with 0 <= lo < hi <= 1",
    "algorithm.ema_decay=1.5": "algorithm.ema_decay=1.5: must be a number in [0, 1) (or null)",
    "algorithm.guidance_scale=-2": "algorithm.guidance_scale=-2: must be a number >= 0",
    "max_iterations=2.5": "max_iterations=2.5: must be a whole number >= 1",
    "seed=abc": "seed='abc': must be a whole number",
    "optim.lr_generator=abc": "optim.lr_generator='abc': must be a number > 0",
    "optim.lr_fake=-1e-4": "optim.lr_fake=-0.0001: must be a number > 0",
    "data.batch_size=0": "data.batch_size=0: must be a whole number >= 1",
    "algorithm.ttur_ratio=0": "algorithm.ttur_ratio=0: must be a whole number >= 1",
    "algorithm.generator_timesteps=[]": "algorithm.generator_timesteps=[]: must be a non-empty list",
    "algorithm.gan.balance=adaptve": "algorithm.gan.balance='adaptve': must be one of fixed, dimension, adaptive",
    "eval.num_samples=1": "eval.num_samples=1: must be a whole number >= 2",
    "callbacks.checkpoint.every_n_iterations=0": "callbacks.checkpoint.every_n_iterations=0: must be",
    "generator_steps=-3": "generator_steps=-3: must be a whole number >= 1 (or null)",
    "optim.betas=[0.9,1.5]": "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)",
    "algorithm.regression.sampler=dpm": "algorithm.regression.sampler='dpm': must be one of ddim, euler, heun",
}


def test_every_train_mistake_is_named_in_one_message():
    with pytest.raises(ConfigError) as err:
        validate(_cfg("train", "experiment=fmnist_dmd2", *TRAIN_MISTAKES), "train")
    message = str(err.value)
    # + algorithm.regression.guidance_scale, which follows algorithm.guidance_scale
    assert message.startswith(f"Bad config ({len(TRAIN_MISTAKES) + 1} problems); nothing was written")
    for named in TRAIN_MISTAKES.values():
        assert named in message


@pytest.mark.parametrize("mistake", [*TRAIN_MISTAKES, "max_iterations=abc", "algorithm.regression.weight=-1"])
def test_each_train_mistake_alone_is_refused(mistake):
    with pytest.raises(ConfigError) as err:
        validate(_cfg("train", "experiment=gmm_dmd2", mistake), "train")
    assert f"\n  {mistake.split('=')[0]}=" in str(err.value)


def test_all_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="are all 0: the generator would never move"):
        validate(_cfg("train", "experiment=fmnist_dmd", "algorithm.dm_weight=0",
                      "algorithm.gan.generator_weight=0", "algorithm.regression.weight=0"), "train")
    validate(_cfg("train", "experiment=fmnist_dmd", "algorithm.dm_weight=0"), "train")  # regression alone moves it


@pytest.mark.parametrize("name,overrides,named", [
    ("evaluate", ["latency.batch_sizes=[0]"], "latency.batch_sizes=[0]: must be a list of whole numbers >= 1"),
    ("evaluate", ["sampler.steps=0", "batch_size=0"], "sampler.steps=0"),
    ("sample", ["out=x.png"], "out='x.png': must be a file name ending in .npz"),
    ("sample", ["num_samples=0", "sampler.name=dpm", "out=x.npz"], "sampler.name='dpm': must be one of"),
    ("pretrain", ["ema_decay=1.0", "lr=0"], "ema_decay=1.0: must be a number in [0, 1)"),
    ("train_classifier", ["channels=[32,0]"], "channels=[32, 0]: must be a non-empty list of whole numbers >= 1"),
])
def test_other_commands_mistakes_are_named(name, overrides, named):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(name, *overrides), name)
    problems = len([o for o in overrides if o != "out=x.npz"])
    assert named in str(err.value) and f"({problems} problem" in str(err.value)


@pytest.mark.parametrize("name", ["sample", "evaluate"])
def test_generator_timesteps_need_a_generator_and_a_decreasing_order(name):
    out = ["out=x.npz"] if name == "sample" else []
    with pytest.raises(ConfigError, match=r"timesteps=\[999, 499\]: re-times a distilled generator \(give ckpt="):
        validate(_cfg(name, *out, "timesteps=[999,499]"), name)
    with pytest.raises(ConfigError, match=r"\(1 problem\)[^$]*timesteps=\[499, 999\]: must be null or a decreasing"):
        validate(_cfg(name, *out, "ckpt=run", "timesteps=[499,999]"), name)
    validate(_cfg(name, *out, "ckpt=run", "timesteps=[999,499]"), name)


def test_a_refused_config_writes_nothing(cli, tmp_path):
    proc = cli("dmd.sample", "out=x.npz", "num_samples=abc", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "num_samples='abc': must be a whole number >= 1" in proc.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists() and not (tmp_path / "x.npz").exists()


def test_every_rule_names_a_key_the_configs_have():
    """A rule on a misspelt key would be skipped silently: each must match some shipped config."""
    from omegaconf import OmegaConf

    from dmd.validation import RULES

    presets = {"train": [["experiment=fmnist_dmd"], ["experiment=gmm_dmd2"], ["experiment=t2i_tiny"],
                         ["experiment=gmm_sid"], ["experiment=gmm_cd"], ["experiment=gmm_pd"]],
               "sample": [["out=x.npz"]], "evaluate": [[]], "pretrain": [[]], "train_classifier": [[]]}
    for task, rules in RULES.items():
        cfgs = [_cfg(task, *o) for o in presets[task]]
        missing = [k for k, _ in rules if all(OmegaConf.select(c, k, default="<none>") == "<none>" for c in cfgs)]
        assert missing == [], task


def test_data_smaller_than_one_batch_is_refused():
    with pytest.raises(ConfigError, match="data.num_samples=16 is smaller than data.batch_size=32: not one full batch"):
        validate(_cfg("train", "experiment=gmm_dmd2", "data.num_samples=16", "data.batch_size=32"), "train")


def test_a_training_that_runs_no_iteration_is_never_completed(cli, tmp_path):
    import json

    run = tmp_path / "run"  # 16 prompts, batches of 32 (drop_last): not one batch
    proc = cli("dmd.train", "experiment=t2i_tiny", "data.batch_size=32", "max_iterations=2",
               f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0 and "Training ran no iteration" in proc.stderr
    record = json.loads((run / "results.json").read_text())
    assert record["status"] == "failed" and not (run / "generator").exists()
