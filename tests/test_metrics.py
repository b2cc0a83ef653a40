"""Metrics: FID/KID math against clean-fid, cached references with provenance, the evaluator's
names, class consistency, CLIP score on a tiny CLIP, and clear errors for missing weights."""

import json
import string

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance

import dmd.metrics.fid as fid_module
from dmd import ROOT_DIR
from dmd.data.fmnist import load_fashion_mnist
from dmd.metrics import Evaluator
from dmd.metrics.extractors import FMNISTFeatures, InceptionFeatures
from dmd.metrics.fid import feature_statistics, fid_from_features, kid_from_features
from dmd.metrics.reference import DataReference, ReferenceStore


def _features(n=2000, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_fid_matches_clean_fid_and_a_mean_shift_gives_its_squared_norm():
    a, b = _features(seed=0), _features(seed=1) * 1.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert fid_from_features(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, mean moved by delta in every coordinate: FID = D * delta^2 exactly.
    for delta in (0.1, 0.5):
        assert fid_from_features(a, a + delta) == pytest.approx(16 * delta**2, rel=1e-6)


def test_fid_falls_back_to_torchmetrics_when_clean_fid_breaks_on_scipy(monkeypatch):
    a, b = _features(seed=0), _features(seed=1) + 0.3
    expected = fid_from_features(a, b)

    def broken(*args, **kwargs):  # what clean-fid 0.1.35 raises with a newer scipy
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    monkeypatch.setattr(fid_module, "frechet_distance", broken)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_is_about_zero_on_one_distribution_grows_with_a_shift_and_keeps_numpy_rng():
    a, b = _features(seed=0), _features(seed=1)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    same = kid_from_features(a, b, num_subsets=20, max_subset_size=500)
    assert np.array_equal(np.random.get_state()[1], before)  # caller's RNG untouched
    assert abs(same) < 0.01
    assert kid_from_features(a, b, 20, 500) == same  # seeded: reproducible
    assert same < kid_from_features(a, b + 0.2, 20, 500) < kid_from_features(a, b + 0.5, 20, 500)


def test_reference_cache_is_reused_and_invalidated_by_provenance(tmp_path):
    store, calls = ReferenceStore(tmp_path / "cache"), []

    def compute():
        calls.append(1)
        return {"features": torch.randn(10, 3)}

    prov = {"extractor": {"name": "x", "weights_sha256": "aa"}, "source": {"kind": "data", "n": 10}}
    first = store.get(prov, compute)
    again = store.get(prov, compute)
    assert len(calls) == 1 and torch.equal(first["features"], again["features"])
    # Another extractor weight hash or another sample count: a new key, computed anew.
    store.get({**prov, "extractor": {"name": "x", "weights_sha256": "bb"}}, compute)
    store.get({**prov, "source": {"kind": "data", "n": 11}}, compute)
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    # A provenance file that does not match, or a corrupt tensor file, is never trusted.
    path = store.path(prov)
    path.with_suffix(".json").write_text(json.dumps({"other": 1}))
    store.get(prov, compute)
    path.write_bytes(b"not a safetensors file")
    store.get(prov, compute)
    assert len(calls) == 5
    # Read-only bundled folders are searched after the cache.
    bundled = ReferenceStore(tmp_path / "empty", [tmp_path / "cache"])
    assert torch.equal(bundled.get(prov, compute)["features"], store.get(prov, compute)["features"])
    assert len(calls) == 5


@pytest.fixture(scope="module")
def fmnist_test():
    return load_fashion_mnist("test")


def test_evaluator_names_its_metrics_and_scores_real_images_well(tmp_path, fmnist_test):
    images, labels = fmnist_test
    refs = {"data": DataReference(split="test", num_samples=2000, seed=1)}
    second = FMNISTFeatures(ROOT_DIR / "experiments" / "checkpoints" / "fmnist_resnet", name="fmnist_resnet")
    ev = Evaluator(FMNISTFeatures(), refs, tmp_path, kid_subsets=10, progress=False,
                   more_extractors=[second])
    real = ev(images[5000:6000], labels[5000:6000])
    assert set(real) == {"fid_fmnist_vs_data", "kid_fmnist_vs_data", "precision_fmnist_vs_data",
                         "recall_fmnist_vs_data", "fid_fmnist_resnet_vs_data",
                         "kid_fmnist_resnet_vs_data", "class_consistency", "num_samples"}
    assert real["class_consistency"] > 0.88
    assert real["precision_fmnist_vs_data"] > 0.6 and real["recall_fmnist_vs_data"] > 0.6
    wrong = ev(images[5000:6000], (labels[5000:6000] + 1) % 10)
    assert wrong["class_consistency"] < 0.1
    noise = ev(torch.rand(1000, 1, 28, 28) * 2 - 1, labels[:1000])
    for space in ("fmnist", "fmnist_resnet"):  # both feature spaces tell images from noise
        assert noise[f"fid_{space}_vs_data"] > 20 * real[f"fid_{space}_vs_data"]
        assert noise[f"kid_{space}_vs_data"] > 20 * real[f"kid_{space}_vs_data"]
    assert noise["precision_fmnist_vs_data"] < 0.05
    # The extractor's weights are part of the provenance: other weights, another file.
    other = FMNISTFeatures()
    other.net.weights_sha256 = "0" * 64
    assert ReferenceStore(tmp_path).path(Evaluator(other, refs, tmp_path).provenance("data")) != \
        ReferenceStore(tmp_path).path(ev.provenance("data"))


def test_fmnist_features_refuse_other_image_sizes():
    with pytest.raises(ValueError, match="eval=inception"):
        FMNISTFeatures()(torch.zeros(2, 3, 32, 32))


def test_missing_inception_weights_give_a_clear_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from dmd import ROOT_DIR

    with initialize_config_dir(str(ROOT_DIR / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=inception"])
    assert cfg.eval.evaluator.extractor._target_.endswith("InceptionFeatures")
    assert set(cfg.eval.evaluator.references) == {"data", "teacher"}
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt.*eval=fmnist"):
        InceptionFeatures(path=tmp_path, download=False)


def test_an_offline_inception_download_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    import urllib.error

    import cleanfid.inception_torchscript as ts

    def offline(fpath):
        (tmp_path / "w" / "inception-2015-12-05.pt").write_bytes(b"")  # a download cut short
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ts, "check_download_inception", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*no network"):
        InceptionFeatures(path=tmp_path / "w", download=True)
    assert not (tmp_path / "w" / "inception-2015-12-05.pt").exists()


def _tiny_clip(folder):
    """A randomly initialised CLIP with a letters-only BPE vocabulary, saved like a hub model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase,
              *(c + "</w>" for c in string.ascii_lowercase)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_runs_on_a_tiny_local_clip(tmp_path, fmnist_test):
    from dmd.metrics.clip import CLIPScorer

    scorer = CLIPScorer(_tiny_clip(tmp_path / "clip"))
    images, labels = fmnist_test
    prompts = [f"a {name}" for name in ["shirt", "trouser", "pullover", "dress"]]
    score = scorer(images[:4], prompts)
    assert 0 <= score <= 100 and np.isfinite(score)
    other = scorer(torch.rand(4, 1, 28, 28) * 2 - 1, ["a bag"] * 4)
    assert other != score and scorer(images[:4], prompts) == pytest.approx(score)  # reset between calls
    ev = Evaluator(FMNISTFeatures(), {"data": DataReference(num_samples=100)}, tmp_path,
                   kid_subsets=2, clip=scorer, progress=False)
    assert ev(images[:4], labels[:4], prompts)["clip_score"] == pytest.approx(score)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        scorer(images[:4], prompts[:3])


def test_clip_loader_names_the_missing_model(tmp_path):
    from dmd.metrics.clip import clip_loader

    with pytest.raises(OSError, match="Could not load a CLIP model"):
        clip_loader(tmp_path / "nowhere")()


def test_precision_recall_measure_quality_and_coverage_separately():
    from dmd.metrics.fid import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 4, generator=g)
    real[:300, 0] += 12  # two well-separated modes
    same = torch.randn(600, 4, generator=g)
    same[:300, 0] += 12
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    dropped = torch.randn(600, 4, generator=g)
    dropped[:, 0] += 12  # every sample in one mode: sharp but half the data is missed
    p, r = precision_recall(real, dropped)
    assert p > 0.9 and 0.35 < r < 0.6
    p, r = precision_recall(real, torch.randn(600, 4, generator=g) + 40)  # off the data
    assert p == 0.0 and r == 0.0


def test_an_evaluators_network_as_a_training_signal_is_refused():
    from dmd.distances import build_distance, digest
    from dmd.metrics.evaluator import check_independent

    class _Evaluator:
        def weights_digests(self):
            return {"fmnist": FMNISTFeatures().net.weights_sha256}

    checkpoints = ROOT_DIR / "experiments" / "checkpoints"
    shared = build_distance("features", checkpoints / "fmnist_classifier")
    with pytest.raises(ValueError, match="algorithm.regression.network uses the network of .*'fmnist'"):
        check_independent({"algorithm.regression.network": digest(shared)}, _Evaluator())
    independent = build_distance("perceptual", checkpoints / "fmnist_perceptual")
    check_independent({"algorithm.regression.network": digest(independent)}, _Evaluator())


def test_clip_score_is_higher_for_matching_prompts_than_for_shuffled_ones(tmp_path):
    """CLIPScorer must score images[i] against prompts[i] (across its batches): a tiny CLIP whose
    towers are replaced by designed ones (image -> its dominant colours, text -> the colours it
    names) scores ~100 on matching pairs and far less on shuffled ones."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from dmd.metrics.clip import CLIPScorer

    colours = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
               "yellow": (1, 1, 0), "cyan": (0, 1, 1), "magenta": (1, 0, 1)}
    scorer = CLIPScorer(_tiny_clip(tmp_path / "clip"), batch_size=4)  # 6 images: batches of 4 and 2
    clip, tokenizer = scorer.metric.model.model, scorer.metric.processor.tokenizer

    class Tower(torch.nn.Module):  # stands in for CLIP's vision / text transformer
        def __init__(self, features):
            super().__init__()
            self.features = features

        def forward(self, *args, **kwargs):
            feats = self.features(*args, **kwargs)
            return BaseModelOutputWithPooling(pooler_output=torch.nn.functional.pad(feats, (0, 13)))

    def image_colours(pixel_values, **kwargs):  # channel means above their average
        m = pixel_values.mean(dim=(2, 3))
        return (m - m.mean(dim=1, keepdim=True)).clamp(min=0)

    def text_colours(input_ids, **kwargs):
        words = [tokenizer.decode(ids, skip_special_tokens=True).split() for ids in input_ids]
        return torch.tensor([next(colours[w] for w in ws if w in colours) for ws in words], dtype=torch.float)

    clip.vision_model, clip.text_model = Tower(image_colours), Tower(text_colours)
    with torch.no_grad():  # the real projections, keeping the 3 designed coordinates
        clip.visual_projection.weight.copy_(torch.eye(8, 16))
        clip.text_projection.weight.copy_(torch.eye(8, 16))
    names = list(colours)
    rgb = torch.tensor([colours[n] for n in names], dtype=torch.float)[:, :, None, None] * 2 - 1
    images = (rgb + 0.1 * torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    prompts = [f"a {n} square" for n in names]
    matched = scorer(images, prompts)
    assert matched > 99
    for shuffled in (prompts[::-1], prompts[1:] + prompts[:1], [prompts[i] for i in (1, 0, 3, 2, 5, 4)]):
        assert scorer(images, shuffled) < matched - 25
