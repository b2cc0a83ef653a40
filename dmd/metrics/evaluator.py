"""The evaluator: named metrics of a set of generated samples.

``Evaluator(samples, labels, prompts)`` returns, for each reference set R (e.g. ``data``,
``teacher``) and each extractor E (the primary ``extractor``, e.g. ``fmnist`` or ``inception``,
and the ``more_extractors``, independent feature spaces such as ``fmnist_resnet``: no single
network can be gamed):

    fid_<E>_vs_<R>, kid_<E>_vs_<R>   FID / KID against R's cached features
    precision_<E>_vs_<R>,            improved precision / recall (Kynkäänniemi et al. 2019, k=3)
    recall_<E>_vs_<R>                in the primary feature space, against as many of R's
                                     samples as were generated (the first n of R)
    class_consistency                share of samples the primary classifier assigns to the
                                     requested label (class-conditional models)
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
from dmd.metrics.fid import fid_from_features, kid_from_features, precision_recall
from dmd.metrics.reference import ReferenceStore, TeacherReference


class Evaluator:
    def __init__(self, extractor, references: dict, cache_dir: str | Path, bundled_dirs=(),
                 kid_subsets: int = 100, kid_subset_size: int = 1000, clip=None, teacher=None,
                 progress: bool = True, more_extractors=(), precision_recall_k: int | None = 3):
        if not references:
            raise ValueError("The evaluator needs at least one reference set (eval.evaluator.references).")
        if isinstance(references, DictConfig):  # Hydra hands dataclass nodes over as configs
            references = OmegaConf.to_object(references)
        self.extractor, self.references = extractor, dict(references)
        self.extractors = [extractor, *(more_extractors or ())]
        names = [e.name for e in self.extractors]
        if len(set(names)) != len(names):
            raise ValueError(f"The evaluator's extractors need distinct names (their metrics are "
                             f"named after them), got {names}.")
        self.store = ReferenceStore(cache_dir, bundled_dirs)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.clip, self.teacher, self.progress = clip, teacher, progress
        self.precision_recall_k = precision_recall_k
        self._loaded: dict[tuple[str, str], dict] = {}
        self._images: dict[str, tuple] = {}  # reference images while preparing (drawn once)

    def provenance(self, name: str, extractor=None) -> dict:
        return {"extractor": (extractor or self.extractor).provenance,
                "source": self.references[name].provenance(self.teacher)}

    def weights_digests(self) -> dict[str, str]:
        """{extractor name: weights sha256} of every evaluation network (to keep them out of
        training: see ``dmd.train``)."""
        return {e.name: e.provenance.get("weights_sha256") for e in self.extractors}

    def reference(self, name: str, extractor=None) -> dict[str, torch.Tensor]:
        """{features[, logits, labels]} of one reference set in one extractor's feature space
        (default: the primary one), from the cache or computed now."""
        extractor = extractor or self.extractor
        if (name, extractor.name) not in self._loaded:
            ref = self.references[name]

            def compute():
                if name not in self._images:
                    self._images[name] = ref.images(self.teacher, progress=self.progress)
                images, labels = self._images[name]
                feats, logits = extractor(quantize(images), progress=self.progress)
                return {"features": feats, "logits": logits,
                        "labels": None if labels is None else labels.float()}

            stored = self.store.get(self.provenance(name, extractor), compute)
            # float64 once here, not at every evaluation (the FID statistics need it)
            self._loaded[name, extractor.name] = {**stored, "features": stored["features"].double()}
        return self._loaded[name, extractor.name]

    def prepare(self) -> None:
        """Load or compute every reference set in every feature space now (before training, on
        one rank); a reference's images are drawn once for all extractors."""
        for name in self.references:
            for extractor in self.extractors:
                self.reference(name, extractor)
        self._images.clear()

    def check_sample_shape(self, shape) -> None:
        """Fail before training when an extractor cannot take samples of this shape."""
        for extractor in self.extractors:
            extractor(torch.zeros(2, *shape, dtype=torch.uint8))

    def metrics_of_features(self, feats: dict, logits=None, labels=None, skip: str | None = None) -> dict:
        """Metrics of generated samples given their features in each space ({extractor name:
        (N, D)}) and the primary extractor's logits."""
        out = {}
        for name in self.references:
            if name == skip:
                continue
            for extractor in self.extractors:
                ref = self.reference(name, extractor)["features"]
                f = feats[extractor.name]
                tag = f"{extractor.name}_vs_{name}"
                out[f"fid_{tag}"] = fid_from_features(f, ref)
                out[f"kid_{tag}"] = kid_from_features(f, ref, self.kid_subsets, self.kid_subset_size)
                if extractor is self.extractor and self.precision_recall_k:
                    n = min(f.shape[0], ref.shape[0])  # equal sizes: the k-NN radii depend on n
                    p, r = precision_recall(ref[:n], f[:n], self.precision_recall_k)
                    out[f"precision_{tag}"], out[f"recall_{tag}"] = p, r
        if logits is not None and labels is not None and (torch.as_tensor(labels) >= 0).all():
            labels = torch.as_tensor(labels).long()
            out["class_consistency"] = (logits.argmax(-1) == labels).float().mean().item()
        return out

    def features(self, samples: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """({extractor name: features}, the primary extractor's logits) of images in [-1, 1]."""
        images = quantize(samples)
        feats, logits = {}, None
        for extractor in self.extractors:
            feats[extractor.name], lg = extractor(images, progress=self.progress)
            if extractor is self.extractor:
                logits = lg
        return feats, logits

    def __call__(self, samples: torch.Tensor, labels=None, prompts: list[str] | None = None) -> dict:
        """Metrics of generated ``samples`` (images in [-1, 1]) for the requested labels/prompts."""
        feats, logits = self.features(samples)
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
                feats = {e.name: self.reference(name, e)["features"][:n] for e in self.extractors}
                m = self.metrics_of_features(feats, logits, labels, skip=name)
                out.update({f"{name}/{k}": v for k, v in m.items()})
        return out


def check_independent(training_networks: dict[str, str | None], evaluator) -> None:
    """Refuse a run in which a training signal uses an evaluation network: a metric that training
    can reach is no longer a measurement. ``training_networks``: {config key: weights sha256}."""
    evaluators = getattr(evaluator, "weights_digests", dict)()
    for key, sha in training_networks.items():
        shared = [name for name, e_sha in evaluators.items() if sha and e_sha == sha]
        if shared:
            raise ValueError(
                f"{key} uses the network of the evaluator's feature space {shared[0]!r} (same "
                f"weights, sha256 {sha[:12]}…): training would optimise the metric it is scored on. "
                "Use a network no evaluator uses (the bundled "
                "${paths.checkpoints_dir}/fmnist_perceptual) or distance=l2.")
