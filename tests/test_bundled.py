"""The bundled checkpoints: the Fashion-MNIST teacher and the feature network."""

import numpy as np
import pytest
import torch
from conftest import ROOT

from dmd.data.fmnist import load_fashion_mnist
from dmd.draw import sample_teacher
from dmd.metrics.features import FashionMNISTClassifier, extract
from dmd.metrics.fid import fid_from_features
from dmd.metrics.fmnist import DEFAULT_CLASSIFIER, data_evaluator, load_classifier
from dmd.schedule import FlowSchedule, VPSchedule
from dmd.teachers import load_teacher

TEACHER = ROOT / "experiments" / "checkpoints" / "fmnist_teacher"
FLOW_TEACHER = ROOT / "experiments" / "checkpoints" / "fmnist_flow_teacher"


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.mark.slow
def test_feature_network_accuracy(classifier):
    images, labels = load_fashion_mnist("test")
    _, logits = extract(classifier, images)
    assert (logits.argmax(-1) == labels).float().mean().item() >= 0.92


def test_fid_is_zero_on_itself_and_grows_with_a_shift(classifier):
    images, _ = load_fashion_mnist("test")
    feats, _ = extract(classifier, images[:3000])
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shifted = [fid_from_features(feats, feats + d) for d in (0.1, 0.5, 1.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_corrupt_classifier_weights_are_reported(tmp_path):
    net = FashionMNISTClassifier(channels=(4, 8, 8), feature_dim=8)
    net.save(tmp_path)
    (tmp_path / "config.json").write_text((DEFAULT_CLASSIFIER / "config.json").read_text())
    with pytest.raises(RuntimeError, match="does not match"):
        FashionMNISTClassifier.load(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("folder,schedule", [(TEACHER, VPSchedule), (FLOW_TEACHER, FlowSchedule)])
def test_bundled_teacher_samples_the_requested_classes(tmp_path, folder, schedule):
    teacher = load_teacher(str(folder))
    assert teacher.num_classes == 10 and teacher.sample_shape == (1, 28, 28)
    assert isinstance(teacher.denoiser.schedule, schedule)  # the flow teacher: velocity on (1 - s) x0 + s eps
    images, labels = sample_teacher(teacher, 100, "heun", 8, 2.0, seed=0, progress=False)
    assert images.shape == (100, 1, 28, 28) and torch.isfinite(images).all()
    evaluator = data_evaluator(tmp_path)
    metrics = evaluator(images, labels)
    assert metrics["class_consistency"] >= 0.8
    # Pure noise images are nowhere near the data under the same features.
    noise = evaluator(torch.randn(100, 1, 28, 28).clamp(-1, 1), labels)
    assert metrics["fid_fmnist_vs_data"] < noise["fid_fmnist_vs_data"] / 5


def test_sample_cli_defaults_to_the_bundled_teacher(cli, tmp_path):
    out = tmp_path / "t.npz"
    cli("dmd.sample", "num_samples=20", f"out={out}", "seed=0", "sampler.steps=4",
        f"hydra.run.dir={tmp_path}/run")
    data = np.load(out)
    assert data["arr_0"].shape == (20, 28, 28, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(20)]
