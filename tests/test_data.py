import gzip
import shutil

import pytest
import torch

from dmd.data import FashionMNISTDataModule, GaussianMixture, load_fashion_mnist
from dmd.data.fmnist import DEBIAN_DIR


def test_fashion_mnist_from_debian_package():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    dm = FashionMNISTDataModule(batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert len(dm.train_set) == 60000


def test_fashion_mnist_from_a_configured_uncompressed_folder(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(DEBIAN_DIR / f"{stem}.gz") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    images, _ = load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(images, load_fashion_mnist("test")[0])


def test_missing_fashion_mnist_names_all_three_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr("dmd.data.fmnist.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", root=tmp_path / "empty")
    msg = str(err.value)
    assert "data.root" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.download=true" in msg and str(tmp_path / "empty") in msg
    with pytest.raises(FileNotFoundError, match="needs data.root to download into"):
        load_fashion_mnist("train", download=True)


def test_truncated_idx_file_is_reported(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(DEBIAN_DIR / f"{stem}.gz") as src:
            data = src.read()
        (tmp_path / stem).write_bytes(data[: len(data) // 2] if "images" in stem else data)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fashion_mnist("test", root=tmp_path)


def test_gmm8_preset_layout():
    mix = GaussianMixture.ring(8, 2.0, 0.1)
    assert torch.allclose(mix.means.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(mix.means[2], torch.tensor([0.0, 2.0]), atol=1e-6)
    x, k = mix.sample(80000, torch.Generator().manual_seed(0))
    assert torch.bincount(k).float().div(80000).sub(1 / 8).abs().max() < 0.01
    assert (x - mix.means[k]).std().item() == pytest.approx(0.1, rel=0.02)


def test_unequal_weights_preset_and_bad_weights():
    mix = GaussianMixture.ring(weights=[8, 1, 4, 1, 2, 1, 4, 1])
    assert mix.weights.sum().item() == pytest.approx(1.0)
    assert mix.weights[0].item() == pytest.approx(8 / 22)
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixture.ring(weights=[1, 2])


def test_epoch_shuffle_changes_order_per_epoch_and_resumes_mid_epoch():
    from dmd.data.loaders import EpochShuffle

    s = EpochShuffle(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    s.set_epoch(0)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    resumed = EpochShuffle(10, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == e0


class _Recorder:
    """A LightningModule that records the batches it trains on (and learns nothing)."""

    @staticmethod
    def make():
        import pytorch_lightning as pl

        class Recorder(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(()))
                self.seen = []

            def training_step(self, batch, i):
                self.seen.append(batch[0].flatten().tolist())
                return self.w * 0

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


@pytest.mark.parametrize("stop", [pytest.param(3, marks=pytest.mark.slow), 16, pytest.param(8, marks=pytest.mark.slow),
                                  pytest.param(13, marks=pytest.mark.slow)])  # at the end of epoch 2, mid-epoch...
def test_a_resume_sees_the_batches_of_an_uninterrupted_run_also_at_an_epoch_boundary(tmp_path, stop):
    """The loader's saved position at the end of an epoch once made the resumed run skip the
    whole next epoch (Lightning loads the state, then sets the new epoch)."""
    import pytorch_lightning as pl
    from torch.utils.data import TensorDataset

    from dmd.data.loaders import resumable_loader

    class SaveAtTheStop(pl.Callback):  # as dmd's IterationCheckpoint: in the batch's end hook
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == trainer.max_steps:
                trainer.save_checkpoint(tmp_path / "stop.ckpt")

    def fit(max_steps, module, ckpt=None):
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                             callbacks=[SaveAtTheStop()])
        data = resumable_loader(TensorDataset(torch.arange(32.0)), batch_size=4, seed=5)
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt)

    straight = _Recorder.make()
    fit(20, straight)
    first = _Recorder.make()
    fit(stop, first)
    second = _Recorder.make()
    fit(20, second, tmp_path / "stop.ckpt")
    assert first.seen + second.seen == straight.seen


@pytest.mark.parametrize("cut", [2, 100, 5000])
def test_a_cut_off_gzip_or_header_names_the_file(tmp_path, cut):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        data = (DEBIAN_DIR / f"{stem}.gz").read_bytes()
        (tmp_path / f"{stem}.gz").write_bytes(data[:cut] if "images" in stem else data)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is truncated or corrupt .*data.root elsewhere"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08"))  # a header cut short
    with pytest.raises(ValueError, match="no IDX header in its 3 bytes"):
        load_fashion_mnist("test", root=tmp_path)
