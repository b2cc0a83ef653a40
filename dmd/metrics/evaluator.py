"""The evaluator: named metrics of a set of generated samples.

``Evaluator(samples, labels, prompts)`` returns, for each reference set R (e.g. ``data``,
``teacher``) and the extractor E (e.g. ``fmnist``, ``inception``):

    fid_<E>_vs_<R>, kid_<E>_vs_<R>   FID / KID against R's cached features
    class_consistency                share of samples the classifier assigns to the requested
                                     label (class-conditional models, classifier extractors)
    clip_score                       CLIP score against the prompts (text-to-image, if a CLIP
                                     model is configured)

``teacher_metrics(n)`` gives the same numbers for the first ``n`` of the teacher's reference
samples (their FID vs the data, their class consistency): the yardstick the student is read
against, at the student's sample count (FID is biased upward at small n, so only equal counts
compare).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dmd.metrics.extractors import quantize
from dmd.metrics.fid import fid_from_features, kid_from_features
from dmd.metrics.reference import ReferenceStore, TeacherReference


class Evaluator:
    def __init__(self, extractor, references: dict, cache_dir: str | Path, bundled_dirs=(),
                 kid_subsets: int = 100, kid_subset_size: int = 1000, clip=None, teacher=None,
                 progress: bool = True):
        if not references:
            raise ValueError("The evaluator needs at least one reference set (eval.evaluator.references).")
        if isinstance(references, DictConfig):  # Hydra hands dataclass nodes over as configs
            references = OmegaConf.to_object(references)
        self.extractor, self.references = extractor, dict(references)
        self.store = ReferenceStore(cache_dir, bundled_dirs)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.clip, self.teacher, self.progress = clip, teacher, progress
        self._loaded: dict[str, dict] = {}

    def provenance(self, name: str) -> dict:
        return {"extractor": self.extractor.provenance,
                "source": self.references[name].provenance(self.teacher)}

    def reference(self, name: str) -> dict[str, torch.Tensor]:
        """{features[, logits, labels]} of one reference set, from the cache or computed now."""
        if name not in self._loaded:
            ref = self.references[name]

            def compute():
                images, labels = ref.images(self.teacher, progress=self.progress)
                feats, logits = self.extractor(quantize(images), progress=self.progress)
                return {"features": feats, "logits": logits,
                        "labels": None if labels is None else labels.float()}

            stored = self.store.get(self.provenance(name), compute)
            # float64 once here, not at every evaluation (the FID statistics need it)
            self._loaded[name] = {**stored, "features": stored["features"].double()}
        return self._loaded[name]

    def prepare(self) -> None:
        """Load or compute every reference set now (before training, on one rank)."""
        for name in self.references:
            self.reference(name)

    def check_sample_shape(self, shape) -> None:
        """Fail before training when the extractor cannot take samples of this shape."""
        self.extractor(torch.zeros(2, *shape, dtype=torch.uint8))

    def metrics_of_features(self, feats, logits=None, labels=None, skip: str | None = None) -> dict:
        out = {}
        for name in self.references:
            if name == skip:
                continue
            ref = self.reference(name)["features"].double()
            tag = f"{self.extractor.name}_vs_{name}"
            out[f"fid_{tag}"] = fid_from_features(feats, ref)
            out[f"kid_{tag}"] = kid_from_features(feats, ref, self.kid_subsets, self.kid_subset_size)
        if logits is not None and labels is not None and (torch.as_tensor(labels) >= 0).all():
            labels = torch.as_tensor(labels).long()
            out["class_consistency"] = (logits.argmax(-1) == labels).float().mean().item()
        return out

    def __call__(self, samples: torch.Tensor, labels=None, prompts: list[str] | None = None) -> dict:
        """Metrics of generated ``samples`` (images in [-1, 1]) for the requested labels/prompts."""
        feats, logits = self.extractor(quantize(samples), progress=self.progress)
        out = self.metrics_of_features(feats, logits, labels)
        if self.clip is not None and prompts is not None:
            out["clip_score"] = self.clip(samples, prompts)
        out["num_samples"] = int(samples.shape[0])
        return out

    def teacher_metrics(self, num_samples: int | None = None) -> dict:
        """Metrics of the first ``num_samples`` (all: None) samples of each teacher reference
        set, against the other references."""
        out = {}
        n = num_samples
        for name, ref in self.references.items():
            if isinstance(ref, TeacherReference):
                r = self.reference(name)
                labels = r["labels"][:n].long() if "labels" in r else None
                logits = r["logits"][:n] if "logits" in r else None
                m = self.metrics_of_features(r["features"][:n].double(), logits, labels, skip=name)
                out.update({f"{name}/{k}": v for k, v in m.items()})
        return out
