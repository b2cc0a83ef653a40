"""CLIP score through torchmetrics' ``CLIPScore``, with the model loaded from any HF CLIP
folder or hub id (torchmetrics itself only accepts a fixed list of hub names, so it is given
a loader callable)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dmd.metrics.extractors import quantize


class _FeatureTensors(torch.nn.Module):
    """transformers >= 5 returns output objects from ``get_*_features`` (the projected features
    in ``pooler_output``); torchmetrics 1.9 expects the tensors themselves."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return _features(self.model.get_text_features(*args, **kwargs))


def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_loader(name_or_path: str | Path):
    """A zero-argument callable returning (CLIPModel, CLIPProcessor), as torchmetrics expects."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(str(name_or_path)).eval()
            return _FeatureTensors(model), CLIPProcessor.from_pretrained(str(name_or_path))
        except OSError as err:
            raise OSError(f"Could not load a CLIP model + processor from {name_or_path!r} ({err}). "
                          "Give a local folder written by save_pretrained, or a hub id on a "
                          "connected machine.") from err

    return load


class CLIPFeatures:
    """Image embeddings of a CLIP model as FID/KID features (``fid_clip_*``: FID in CLIP space,
    as clean-fid's ``clip_vit_b_32`` mode; not Inception FID). The model is any HF CLIP folder or
    hub id, so it works offline with a local folder. No logits."""

    name = "clip"

    def __init__(self, model: str | Path = "openai/clip-vit-base-patch32", batch_size: int = 64, device=None):
        from dmd.teachers import weights_digest

        self.model_name = str(model)
        self.model, self.processor = clip_loader(model)()
        self.batch_size, self.device = batch_size, device
        self._sha = weights_digest(self.model.model)

    @property
    def provenance(self) -> dict:
        return {"name": self.name, "model": Path(self.model_name).name, "weights_sha256": self._sha,
                "resize": "clip-processor"}

    @torch.no_grad()
    def __call__(self, images: Tensor, progress: bool = False) -> tuple[Tensor, None]:
        from tqdm.auto import tqdm

        uint8 = quantize(images)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(device)
        feats = []
        for start in tqdm(range(0, uint8.shape[0], self.batch_size), desc="CLIP features", disable=not progress):
            pixels = self.processor(images=list(uint8[start:start + self.batch_size]),
                                    return_tensors="pt")["pixel_values"].to(device)
            feats.append(self.model.get_image_features(pixel_values=pixels).float().cpu())
        return torch.cat(feats), None


class CLIPScorer:
    """Mean CLIP score (100 * cosine, floored at 0) of images against their prompts."""

    def __init__(self, model: str | Path = "openai/clip-vit-large-patch14", batch_size: int = 64,
                 device=None):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.model_name = str(model)
        # Scores are computed by one process (rank 0 evaluates while the others wait): never wait
        # for the other ranks' states, which would deadlock a multi-GPU run.
        self.metric = CLIPScore(model_name_or_path=clip_loader(model), sync_on_compute=False)
        if device:
            self.metric = self.metric.to(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> float:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts.")
        self.metric.reset()
        uint8 = quantize(images)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        for start in range(0, uint8.shape[0], self.batch_size):
            sl = slice(start, start + self.batch_size)
            self.metric.update(uint8[sl].to(self.metric.device), list(prompts[sl]))
        return float(self.metric.compute())
