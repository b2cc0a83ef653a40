"""Datamodules: Fashion-MNIST images and 2-D Gaussian mixtures."""

from dmd.data.fmnist import FashionMNISTDataModule, load_fashion_mnist
from dmd.data.mixtures import GaussianMixture, GaussianMixtureDataModule

__all__ = [
    "FashionMNISTDataModule",
    "GaussianMixture",
    "GaussianMixtureDataModule",
    "load_fashion_mnist",
]
