"""Prompts (and, for DMD2's GAN loss, real images) for text-to-image distillation.

Batches are (real latents, condition): the condition is the prompt's text embedding dict
(:mod:`dmd.t2i.text`), computed once for the whole prompt file and cached; real images from
``images`` (a folder) are VAE-encoded once and cached as latents. Under a Trainer the encoding
happens in ``prepare_data`` (one process per node); every rank then reads the caches
memory-mapped (:func:`dmd.files.load_arrays`), so no rank holds the whole set in memory.
Prompt files:

- ``.txt``: one prompt per line (blank lines skipped);
- ``.jsonl``: one JSON object per line with ``prompt`` (or ``caption`` / ``text``) and
  optionally ``image`` (a path relative to the file): such rows pair a real image with its
  caption, so the discriminator sees real images under their own captions;
- ``.json``: COCO captions (``{"annotations": [{"caption": ...}]}``) or a list of strings.

Real images can also come from webdataset tar shards (``shards``, a brace pattern; images are
read in order and encoded once), or pre-encoded: ``latents``, a safetensors file whose ``latents`` tensor
(N, C, H/f, W/f) holds VAE latents as the pipeline denoises them, (mean - shift_factor) x
scaling_factor (the format of this module's own latent cache). Without paired images, real image i is shown with prompt i
(cycling the shorter list). Real images come from one source: a .jsonl file pairing every row,
or a folder / shards / latents file.
Without any images the GAN loss cannot be used (the module refuses it before training).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from dmd.conditioning import select_condition
from dmd.data.loaders import resumable_loader
from dmd.files import atomic_path

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _prompt_text(value, where: str) -> str:
    """A prompt must be non-empty text: null, numbers and blank strings are mistakes, not prompts."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: a prompt must be non-empty text, got {value!r}.")
    return value.strip()


def read_prompts(path: str | Path) -> tuple[list[str], list[Path | None]]:
    """Prompts of a .txt / .jsonl / .json file and the image paired with each (or None)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist (data.prompts=<.txt|.jsonl|.json file>).")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    images: list[Path | None] = []
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
                prompt = next(row[k] for k in ("prompt", "caption", "text") if k in row)
            except (json.JSONDecodeError, StopIteration, TypeError) as err:
                raise ValueError(f"{where}: expected a JSON object with a 'prompt' (or "
                                 f"'caption' / 'text') field, got {line[:80]!r}.") from err
            prompts.append(_prompt_text(prompt, where))
            image = row.get("image")
            if image is not None and not (isinstance(image, str) and image.strip()):
                raise ValueError(f"{where}: 'image' must be a file name (a string), got {image!r}.")
            images.append(path.parent / image if image else None)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}).") from err
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            prompts = [_prompt_text(a["caption"], f"{path}, annotations[{i}]")
                       for i, a in enumerate(data["annotations"]) if isinstance(a, dict) and "caption" in a]
        elif isinstance(data, list) and all(isinstance(p, str) for p in data):
            prompts = [p.strip() for p in data if p.strip()]
        else:
            raise ValueError(f"{path}: expected COCO captions ({{'annotations': [{{'caption': ...}}]}}) "
                             "or a JSON list of prompt strings.")
    else:
        raise ValueError(f"Prompt file {path} must end in .txt, .jsonl or .json.")
    if not prompts:
        raise ValueError(f"Prompt file {path} holds no prompts: add one prompt per line (.txt), "
                         "one {\"prompt\": ...} object per line (.jsonl) or COCO captions (.json).")
    return prompts, images or [None] * len(prompts)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist: give a folder of {'/'.join(IMAGE_SUFFIXES)} images.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"Image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def to_tensors(images, size: int) -> torch.Tensor:
    """PIL images resized (shorter side) and centre-cropped to ``size``, in [-1, 1], (N, 3, size, size)."""
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    return torch.stack([tf(image.convert("RGB")) for image in images])


def load_images(files: list[Path], size: int) -> torch.Tensor:
    """:func:`to_tensors` of image files."""
    from PIL import Image

    return to_tensors([Image.open(f) for f in files], size)


def shard_files(urls: str) -> list[Path]:
    """The tar files of a webdataset brace pattern (``shards/{000000..000009}.tar``)."""
    from braceexpand import braceexpand

    files = [Path(u).expanduser() for u in braceexpand(urls)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards={urls}: {len(missing)} shard(s) missing, e.g. {missing[0]}.")
    return files


def shard_images(files: list[Path]):
    """The images of webdataset shards (first of jpg/jpeg/png/webp in each sample), in order."""
    import webdataset as wds

    for sample in wds.WebDataset([str(f) for f in files], shardshuffle=False).decode("pil"):
        image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if image is not None:
            yield image


class _PromptLatents(Dataset):
    def __init__(self, cond: dict, latents: torch.Tensor, index: list[int]):
        self.cond, self.latents, self.index = cond, latents, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.latents[self.index[i]], select_condition(self.cond, i)


class PromptDataModule(pl.LightningDataModule):
    """(real latents, text condition) batches for a latent text-to-image teacher at ``pipeline``."""

    def __init__(self, prompts: str, pipeline: str, images: str | None = None, latents: str | None = None,
                 shards: str | None = None, image_size: int | None = None, batch_size: int = 4,
                 num_workers: int = 0, seed: int = 0, cache_dir: str = ".cache"):
        super().__init__()
        if sum(bool(x) for x in (images, latents, shards)) > 1:
            raise ValueError("Give one source of real images: data.images (a folder), data.shards "
                             "(webdataset tars) or data.latents (pre-encoded).")
        self.prompts_path, self.pipeline, self.images, self.latents = prompts, pipeline, images, latents
        self.shards = shards
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.seed, self.cache_dir = seed, Path(cache_dir)
        self.prompts, self.paired = read_prompts(prompts)  # bad files fail at instantiation
        paired = [p is not None for p in self.paired]
        if any(paired) and not all(paired):
            raise ValueError(f"{prompts}: {paired.count(False)} of {len(paired)} rows have no 'image'; pair "
                             "every row with an image, or none (and give data.images / shards / latents).")
        if all(paired) and (images or latents or shards):
            raise ValueError(f"{prompts} pairs every prompt with an image already: drop data.images / "
                             "data.shards / data.latents (or use a prompt file without images).")
        self.has_real_images = bool(images or latents or shards) or all(paired)
        self.train_set = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before any setup: the text encoders and
        # the VAE run there only, and the other ranks read the caches this leaves.
        record = self._encode()
        if self.trainer is not None:
            with atomic_path(self._record_path()) as tmp:
                tmp.write_text(json.dumps(record))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from dmd.conditioning import unflatten_condition
        from dmd.files import load_arrays

        # Inside a Trainer, prepare_data has just written the record; used alone, encode here.
        record = json.loads(self._record_path().read_text()) if self.trainer is not None else self._encode()
        embeddings = load_arrays(record["embeddings"])
        rows = next(iter(embeddings.values())).shape[0]
        if rows != len(self.prompts):
            raise ValueError(f"The prompt embeddings at {record['embeddings']} hold {rows} rows for "
                             f"{len(self.prompts)} prompts in {self.prompts_path}: delete that folder "
                             "and rerun (it is rebuilt from the prompt file).")
        cond = unflatten_condition(embeddings)
        if record["latents"] is None:  # placeholders of the latent shape: never shown to a discriminator
            latents = torch.zeros(1, *record["shape"])
        elif record["latents_kind"] == "pre-encoded":  # read (and checked) here, by every rank
            latents = self._pre_encoded(tuple(record["shape"]))
        else:
            latents = load_arrays(record["latents"])["latents"]
        index = [i % latents.shape[0] for i in range(len(self.prompts))]  # cycle the shorter list
        self.train_set = _PromptLatents(cond, latents, index)

    def _record_path(self) -> Path:
        """Where prepare_data tells the other ranks of this run which caches hold the data (in
        the run dir: no other job writes there)."""
        return Path(self.trainer.default_root_dir) / "prompt_data.json"

    def _encode(self) -> dict:
        """Encode (or find cached) prompt embeddings and real-image latents; returns where they are."""
        from diffusers import AutoencoderKL

        from dmd.t2i.text import PromptEncoder, cache_embeddings

        vae = AutoencoderKL.from_pretrained(self.pipeline, subfolder="vae").eval()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = self.image_size or vae.config.sample_size
        encoder = PromptEncoder.from_pretrained(self.pipeline, image_size=size)
        embeddings = cache_embeddings(encoder, self.prompts, self.cache_dir)
        del encoder  # the embeddings are all training needs of the text encoders
        shape = (vae.config.latent_channels, size // factor, size // factor)
        latents, kind = None, "cache"
        if self.latents:
            latents, kind = str(Path(self.latents).expanduser()), "pre-encoded"
        elif self.shards:
            files = shard_files(self.shards)
            latents = self._latents(vae, files, size, lambda: shard_images(files))
        elif self.has_real_images:
            from PIL import Image

            files = ([p for p in self.paired] if all(p is not None for p in self.paired)
                     else image_files(self.images))
            latents = self._latents(vae, files, size, lambda: (Image.open(f) for f in files))
        return {"embeddings": str(embeddings), "latents": latents and str(latents), "latents_kind": kind,
                "shape": list(shape)}

    def _pre_encoded(self, shape: tuple) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(self.latents).expanduser()
        try:
            latents = load_file(path)["latents"]
        except (FileNotFoundError, SafetensorError, KeyError, OSError) as err:
            raise ValueError(f"data.latents={path}: expected a safetensors file with a 'latents' tensor "
                             f"(N, {', '.join(map(str, shape))}) ({type(err).__name__}: {err}).") from err
        if tuple(latents.shape[1:]) != shape:
            raise ValueError(f"data.latents={path} holds latents of shape {tuple(latents.shape[1:])}; this "
                             f"pipeline's VAE makes {shape} at this data.image_size.")
        return latents.float()

    def _latents(self, vae, files: list[Path], size: int, images) -> Path:
        """Cache folder of the VAE latents (posterior mean x scaling factor) of ``images()`` (PIL
        images read from ``files``), keyed by the files' identity, the VAE and the size."""
        from tqdm.auto import tqdm

        from dmd.files import save_arrays
        from dmd.t2i.teacher import encode_latents
        from dmd.teachers import weights_digest

        shift = vae.config.get("shift_factor")  # SD3/Flux VAEs; keys of older caches unchanged
        h = hashlib.sha256(f"{weights_digest(vae)}{size}{'' if shift is None else f's{shift}'}".encode())
        for f in files:
            h.update(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        folder = self.cache_dir / "latents" / h.hexdigest()[:16]
        if (folder / "arrays.json").is_file():
            return folder
        stream = iter(images())

        def encoded():  # 16 images at a time: the images are never all held as pixels or latents
            with torch.no_grad():
                while chunk := list(itertools.islice(stream, 16)):
                    yield {"latents": encode_latents(vae, to_tensors(chunk, size))}

        save_arrays(tqdm(encoded(), desc="Encoding real images", unit="x16"), folder,
                    what=f"images in {files[0].parent} ({len(files)} file(s))")
        log.info("Real images: encoded to latents and cached at %s", folder)
        return folder

    def train_dataloader(self):
        return resumable_loader(self.train_set, self.batch_size, self.seed, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)
