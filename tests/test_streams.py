"""Evaluation never sees a training input: every random stream is keyed by its purpose.

For every preset (and for every preset with all its seeds set equal, the choice that once gave
the evaluation and DMD's regression pairs the same 1000 noises) the noises drawn by the code
paths themselves -- the evaluation draw (callback, dmd.evaluate, dmd.sample), the teacher
reference, the regression pairs and the first batches of the training stream -- share no row.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import dmd.draw
from dmd import ROOT_DIR
from dmd.draw import sample_generator, sample_teacher
from dmd.metrics.reference import TeacherReference
from dmd.module import training_rng
from dmd.regression_pairs import make_pairs
from dmd.streams import PURPOSES, STREAMS_VERSION, stream_seed
from dmd.teachers import Teacher

PRESETS = sorted(p.stem for p in (ROOT_DIR / "conf" / "experiment").glob("*.yaml"))


class _IdentityGenerator(torch.nn.Module):
    """A 'generator' that returns its input noise: what it is fed is what the test sees."""

    num_steps = 1

    def forward(self, z, cond=None, generator=None):
        return z


@pytest.fixture
def noise_recorder(monkeypatch):
    """The teacher's ODE sampler replaced by the identity: sample_teacher returns its noise."""
    monkeypatch.setattr(dmd.draw, "sample", lambda denoiser, z, *args, **kwargs: z)


def _compose(preset, overrides=()):
    with initialize_config_dir(str(ROOT_DIR / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={preset}", *overrides])


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)}


def _draws(cfg) -> dict[str, torch.Tensor]:
    shape = (2,) if "mixture" in cfg.data._target_.lower() else (1, 8, 8)
    teacher = Teacher(torch.nn.Identity(), shape, num_classes=10)
    n_eval = min(int(cfg.eval.num_samples), 2000)
    draws = {"eval": sample_generator(_IdentityGenerator(), teacher, n_eval, cfg.eval.seed,
                                      device="cpu", progress=False)[0]}
    ref = (cfg.eval.evaluator.get("references") or {}).get("teacher")
    if ref is not None and "TeacherReference" in ref._target_:
        reference = TeacherReference(num_samples=2000, seed=ref.seed)
        draws["teacher-reference"] = sample_teacher(
            teacher, reference.num_samples, seed=reference.seed, device="cpu", progress=False,
            purpose="teacher-reference")[0]
    reg = cfg.algorithm.regression
    draws["regression-pairs"] = make_pairs(teacher, min(int(reg.num_pairs), 2000), seed=reg.seed)["noise"]
    rng = training_rng(cfg.seed)  # the module's stream: noise is drawn first at each iteration
    draws["training"] = torch.cat([torch.randn(int(cfg.data.batch_size), *shape, generator=rng)
                                   for _ in range(10)])
    return draws


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("same_seeds", [False, True])
def test_no_evaluation_draw_is_a_training_draw(preset, same_seeds, noise_recorder):
    overrides = ["seed=0", "eval.seed=0", "algorithm.regression.seed=0"] if same_seeds else []
    cfg = _compose(preset, overrides)
    draws = _draws(cfg)
    assert draws["eval"].shape[0] >= 16 and draws["regression-pairs"].shape[0] >= 16
    held_out = set().union(*(_rows(draws[k]) for k in ("eval", "teacher-reference") if k in draws))
    for purpose in ("regression-pairs", "training"):
        assert not held_out & _rows(draws[purpose]), f"{preset}: evaluation draws reused by {purpose}"
    if "teacher-reference" in draws:
        assert not _rows(draws["eval"]) & _rows(draws["teacher-reference"])


def test_streams_are_keyed_by_purpose_and_seed():
    seeds = {(p, s): stream_seed(p, s) for p in PURPOSES for s in range(5)}
    assert len(set(seeds.values())) == len(seeds)
    with pytest.raises(ValueError, match="purpose"):
        stream_seed("evaluation", 0)


def test_caches_of_another_derivation_are_not_reused(tmp_path, noise_recorder):
    from dmd.regression_pairs import load_or_make_pairs

    teacher = Teacher(torch.nn.Identity(), (2,), num_classes=0)
    load_or_make_pairs(teacher, {"teacher": "x"}, tmp_path, 8, "heun", 1, 1.0, seed=0)
    (meta,) = Path(tmp_path, "pairs").glob("*.json")
    assert f'"streams": {STREAMS_VERSION}' in meta.read_text()
    from diffusers import DDPMScheduler

    from dmd.data import GaussianMixture
    from dmd.teachers import gaussian_mixture_teacher

    prov = TeacherReference().provenance(gaussian_mixture_teacher(GaussianMixture.ring(), DDPMScheduler()))
    assert prov["streams"] == STREAMS_VERSION
