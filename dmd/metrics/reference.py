"""Reference sets for FID/KID, computed once and cached with their provenance.

A reference is the features (and logits, for classifiers) of either real data
(:class:`DataReference`) or the teacher's own samples for one sampler setting
(:class:`TeacherReference`). Its provenance -- the extractor (name, weights hash, resize mode),
the source (dataset/split, or teacher weights hash + sampler/steps/CFG), the number of samples
and the seed -- is hashed into the file name and stored beside it as JSON: any change gives a
new key, so stale statistics are never reused. Features (not only mean/covariance) are kept
because KID needs them.

Files are ``<kind>-<key>.safetensors`` + ``.json``, looked up in the cache dir first and then
in read-only bundled folders (``experiments/references`` ships the expensive teacher sets).
clean-fid's ``make_custom_stats`` is not used: it writes into site-packages and cannot take a
custom feature extractor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dmd.files import save_safetensors
from dmd.streams import STREAMS_VERSION, stream

log = logging.getLogger(__name__)


@dataclass
class DataReference:
    """Real images of a dataset split (all of them, or ``num_samples`` drawn with ``seed``)."""

    dataset: str = "fashion_mnist"
    split: str = "test"
    num_samples: int | None = None
    seed: int = 0
    root: str | None = None

    kind = "data"

    def provenance(self, teacher=None) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "split": self.split,
                "num_samples": self.num_samples, "seed": self.seed,
                "streams": STREAMS_VERSION}

    def images(self, teacher=None, progress: bool = True):
        if self.dataset != "fashion_mnist":
            raise ValueError(f"DataReference(dataset={self.dataset!r}): only 'fashion_mnist' is "
                             "available as a data reference.")
        from dmd.data.fmnist import load_fashion_mnist

        images, labels = load_fashion_mnist(self.split, self.root)
        if self.num_samples is not None and self.num_samples < images.shape[0]:
            idx = torch.randperm(images.shape[0], generator=stream("data-reference", self.seed))
            images, labels = images[idx[: self.num_samples]], labels[idx[: self.num_samples]]
        return images, labels


@dataclass
class ImageFolderReference:
    """Real images of a folder (e.g. the prompts' paired images, or COCO val), resized and
    centre-cropped to ``size``; all of them, or ``num_samples`` drawn with ``seed``."""

    folder: str = ""
    size: int | None = None  # None: the teacher's image size
    num_samples: int | None = None
    seed: int = 0

    kind = "data"

    def files(self):
        from dmd.data.prompts import image_files

        files = image_files(self.folder)
        if self.num_samples is not None and self.num_samples < len(files):
            idx = torch.randperm(len(files), generator=stream("data-reference", self.seed))
            files = [files[i] for i in idx[: self.num_samples].tolist()]
        return files

    def provenance(self, teacher=None) -> dict:
        files = "\n".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.files())
        return {"kind": self.kind, "folder": Path(self.folder).name,
                "files_sha256": hashlib.sha256(files.encode()).hexdigest(),
                "size": self._size(teacher), "num_samples": self.num_samples, "seed": self.seed,
                "streams": STREAMS_VERSION}

    def _size(self, teacher) -> int:
        if self.size is None and teacher is None:
            raise ValueError("ImageFolderReference(size=None) takes the teacher's image size: give the teacher or a size.")
        return self.size or teacher.image_shape[-1]

    def images(self, teacher=None, progress: bool = True):
        from dmd.data.prompts import load_images

        return load_images(self.files(), self._size(teacher)), None


@dataclass
class TeacherReference:
    """The teacher's samples for one sampler setting (class-balanced labels, seeded noise)."""

    sampler: str = "heun"
    steps: int = 8
    guidance_scale: float = 2.0
    spacing: str = "karras"
    num_samples: int = 10_000
    seed: int = 0
    batch_size: int = 500

    kind = "teacher"

    def provenance(self, teacher=None) -> dict:
        if teacher is None:
            raise ValueError("A teacher reference needs the teacher: set the evaluator's teacher.")
        from dmd.teachers import weights_digest

        d = teacher.denoiser
        prov = {"kind": self.kind, "teacher_weights_sha256": weights_digest(d),
                "schedule_sha256": d.schedule.digest(),
                "prediction_type": getattr(d, "prediction_type", None),
                "num_classes": teacher.num_classes, "sampler": self.sampler, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "spacing": self.spacing,
                "num_samples": self.num_samples, "seed": self.seed, "streams": STREAMS_VERSION}
        if getattr(d, "guidance", None) is not None:  # guidance-distilled (Flux): an input of the network
            prov["embedded_guidance"] = d.guidance
        if getattr(teacher, "prompts", None):  # text-to-image: the prompts the samples answer
            prov["prompts_sha256"] = hashlib.sha256("\n".join(teacher.prompts).encode()).hexdigest()
        return prov

    def images(self, teacher=None, progress: bool = True):
        from dmd.draw import sample_teacher

        # Sample where the teacher already is: during training it is the live real score.
        device = next(iter(teacher.denoiser.buffers()), torch.empty(0)).device
        return teacher.as_images(*sample_teacher(
            teacher, self.num_samples, self.sampler, self.steps, self.guidance_scale, seed=self.seed,
            batch_size=self.batch_size, device=device, progress=progress, spacing=self.spacing,
            purpose="teacher-reference"))


def reference_key(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]


class ReferenceStore:
    """Get-or-compute of reference tensors keyed by provenance (cache dir, then bundled dirs)."""

    def __init__(self, cache_dir: str | Path, bundled_dirs=()):
        self.cache_dir = Path(cache_dir)
        self.bundled_dirs = [Path(d) for d in bundled_dirs or ()]

    def path(self, provenance: dict, folder: Path | None = None) -> Path:
        return (folder or self.cache_dir) / f"{provenance['source']['kind']}-{reference_key(provenance)}.safetensors"

    def find(self, provenance: dict) -> dict[str, torch.Tensor] | None:
        """Stored tensors whose JSON provenance equals ``provenance``, or None."""
        for folder in [self.cache_dir, *self.bundled_dirs]:
            path = self.path(provenance, folder)
            meta = path.with_suffix(".json")
            if not (path.is_file() and meta.is_file()):
                continue
            try:
                stored = json.loads(meta.read_text())
                if stored != provenance:
                    log.warning("%s has another provenance than its key says: ignoring it.", meta)
                    continue
                return load_file(path)
            except (json.JSONDecodeError, SafetensorError, OSError) as err:
                log.warning("Reference %s is unreadable (%s): recomputing it.", path, err)
        return None

    def get(self, provenance: dict, compute) -> dict[str, torch.Tensor]:
        found = self.find(provenance)
        if found is not None:
            return found
        tensors = {k: (v.float() if v.is_floating_point() else v).contiguous()
                   for k, v in compute().items() if v is not None}
        path = self.path(provenance)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(provenance, indent=2, sort_keys=True))
        save_safetensors(tensors, path)  # the tensors last: found only once whole
        log.info("Reference %s: computed and cached at %s", provenance["source"], path)
        return tensors
