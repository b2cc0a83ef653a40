"""Teachers: a frozen denoiser plus what samplers need to know about it.

``load_teacher`` loads a diffusers folder laid out like a hub pipeline
(``unet/`` + ``scheduler/``) from a local path or a hub id, exactly as diffusers does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from dmd.denoisers import Denoiser, DiffusersUNetDenoiser, GaussianMixtureDenoiser
from dmd.schedule import load_scheduler, prediction_type_of, schedule_from_diffusers


@dataclass
class Teacher:
    """A frozen x0-predictor, the shape of one sample, the number of classes (0 = none) and
    the diffusers scheduler its schedule came from (saved beside distilled generators)."""

    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    scheduler: object = None

    def condition(self, batch_condition):
        """What the denoiser takes as ``cond`` for a training batch's second element."""
        return batch_condition if self.num_classes else None

    pipeline_class = None  # the diffusers pipeline a text-to-image teacher's folder loads as
    network_subfolder = "unet"  # where a diffusers folder keeps the network (transformer/: SD3, Flux)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one sample as an image (:meth:`to_images`)."""
        return tuple(self.sample_shape)

    def prompt_list(self, n: int) -> list[str] | None:
        """The prompts of ``labels(n)`` (text-to-image teachers; None here)."""
        return None

    def save_components(self, folder) -> None:
        """Write what a generator folder needs besides ``unet/`` and ``scheduler/`` (nothing here)."""

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1] (latent teachers decode them; here they already are)."""
        return samples

    def as_images(self, samples: torch.Tensor, labels=None):
        """(images, class labels or None) of samples drawn for ``labels``: what metrics, grids and
        .npz files take. Text conditions are not class labels."""
        return self.to_images(samples), labels if isinstance(labels, torch.Tensor) else None

    def null_condition(self, n: int, device=None):
        """The unconditional input used by CFG, or None for unconditional models."""
        if not self.num_classes:
            return None
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def labels(self, n: int, device=None):
        """Balanced class labels 0, 1, ..., C-1, 0, 1, ... (None for unconditional models)."""
        if not self.num_classes:
            return None
        return torch.arange(n, device=device) % self.num_classes


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (so retrained weights at the same path invalidate the cache)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its raw bytes
            t = t.reshape(-1).view(torch.uint8)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _network_class(path: str, subfolder: str):
    """The model class named in ``<path>/<subfolder>/config.json`` (``_class_name``)."""
    from diffusers import UNet2DModel

    from dmd.networks import MLPNet

    classes = {"UNet2DModel": UNet2DModel, "MLPNet": MLPNet}
    local = Path(path).expanduser() / subfolder / "config.json"
    if not local.is_file():  # a hub id: diffusers resolves it; the Fashion-MNIST kind by default
        return UNet2DModel
    name = json.loads(local.read_text()).get("_class_name")
    if name not in classes:
        raise ValueError(f"{local} names _class_name={name!r}; supported: {sorted(classes)}.")
    return classes[name]


def _name_damaged_weights(folder: Path, err: Exception) -> None:
    """Say "truncated or corrupt" when a present weights file cannot be read."""
    from safetensors import SafetensorError, safe_open

    for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(weights), "pt") as f:  # only on the error path: reads every tensor
                for key in f.keys():
                    f.get_tensor(key)
        except (SafetensorError, OSError) as bad:
            raise OSError(f"{weights} is truncated or corrupt ({weights.stat().st_size} bytes: {bad}). "
                          "Restore it from a good copy.") from err


def require_finite_weights(net: torch.nn.Module, where) -> None:
    """Refuse weights with NaN/Inf (a flipped bit in the file, or a diverged run's save): they
    would be sampled and scored as if they were a model."""
    bad = [name for name, t in net.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{where} holds non-finite weights (NaN/Inf) in {len(bad)} tensor(s), e.g. "
                         f"{', '.join(bad[:3])}: the file is corrupt (e.g. a flipped bit) or was saved "
                         "from a diverged run. Nothing was sampled; restore it from a good copy.")


def load_teacher(path: str, subfolder_unet: str = "unet",
                 subfolder_scheduler: str = "scheduler") -> Teacher:
    """Load a (class-conditional) ``UNet2DModel`` or ``MLPNet`` teacher and its scheduler, frozen."""

    local = Path(path).expanduser()
    if (local.is_absolute() or str(path).startswith(".")) and not local.is_dir():
        raise FileNotFoundError(
            f"Teacher folder {local} does not exist. Point teacher.path at a diffusers folder with "
            f"'{subfolder_unet}/' and '{subfolder_scheduler}/' (as written by `python -m dmd.pretrain`)."
        )
    try:
        net = _network_class(str(path), subfolder_unet).from_pretrained(str(path), subfolder=subfolder_unet)
        scheduler = load_scheduler(str(path), subfolder_scheduler)
    except (OSError, ValueError) as err:
        _name_damaged_weights(local / subfolder_unet, err)
        raise OSError(
            f"Could not load a diffusers model + scheduler from {path!r}: {err}. Expected "
            f"'{subfolder_unet}/config.json', '{subfolder_unet}/diffusion_pytorch_model.safetensors' "
            f"and '{subfolder_scheduler}/scheduler_config.json'."
        ) from err
    require_finite_weights(net, Path(path) / subfolder_unet)
    denoiser = DiffusersUNetDenoiser(_freeze(net), schedule_from_diffusers(scheduler),
                                     prediction_type_of(scheduler))
    num_embeds = net.config.num_class_embeds or 0
    size = net.config.sample_size
    shape = (size,) if not hasattr(net.config, "in_channels") else (net.config.in_channels, size, size)
    # The last class embedding row is the null class used for classifier-free guidance.
    return Teacher(denoiser, shape, max(num_embeds - 1, 0), scheduler)


def gaussian_mixture_teacher(mixture, scheduler) -> Teacher:
    """The analytic (exact) denoiser of a 2-D mixture, as an unconditional teacher."""
    schedule = schedule_from_diffusers(scheduler)
    denoiser = GaussianMixtureDenoiser(schedule, mixture.means, mixture.stds, mixture.weights)
    return Teacher(_freeze(denoiser), (mixture.means.shape[1],), 0, scheduler)
