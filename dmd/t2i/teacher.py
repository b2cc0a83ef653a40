"""A Stable Diffusion pipeline (SD1.5 or SDXL; folder or hub id) as a latent text-to-image
:class:`~dmd.teachers.Teacher`.

Distillation runs in the VAE's latent space: samples are latents (C, H/f, W/f) scaled by the
VAE's ``scaling_factor``; :meth:`TextToImageTeacher.to_images` decodes them to [-1, 1] images for
evaluation and sample grids. Conditions are dicts of text embeddings (:mod:`dmd.t2i.text`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dmd.conditioning import condition_to, repeat_condition, select_condition
from dmd.denoisers import DiffusersUNetDenoiser
from dmd.schedule import VPSchedule
from dmd.t2i.text import PromptEncoder
from dmd.teachers import Teacher, _freeze, require_finite_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompts the sample grids and evaluations use when none are given (cycled to the sample count).
DEFAULT_PROMPTS = ("a photo of a cat", "a red apple on a table", "a mountain lake at sunrise",
                   "an astronaut riding a horse", "a bowl of soup", "a city street at night",
                   "a watercolor painting of a fox", "a vintage car")


@dataclass
class TextToImageTeacher(Teacher):
    """A frozen latent UNet2DConditionModel teacher with its VAE and prompt encoder."""

    vae: torch.nn.Module = None
    prompt_encoder: PromptEncoder = None
    null: dict = None                  # batch-1 null condition (CPU)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    path: str = ""                     # the pipeline folder or hub id (generators copy its parts)
    kind: str = "sd15"
    _prompt_conditions: dict = field(default=None, repr=False)  # self.prompts encoded, once

    def condition(self, batch_condition):
        return batch_condition

    @property
    def pipeline_class(self) -> str:
        return "StableDiffusionXLPipeline" if self.kind == "sdxl" else "StableDiffusionPipeline"

    def save_components(self, folder) -> None:
        """The VAE, tokenizer(s), text encoder(s) and model_index.json: with ``unet/`` and
        ``scheduler/`` the folder loads as a diffusers pipeline."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        for i, (tok, enc) in enumerate(zip(self.prompt_encoder.tokenizers, self.prompt_encoder.text_encoders)):
            suffix = f"_{i + 1}" if i else ""
            tok.save_pretrained(folder / f"tokenizer{suffix}")
            enc.save_pretrained(folder / f"text_encoder{suffix}")
        (folder / "model_index.json").write_text(json.dumps(pipeline_index(self.kind == "sdxl"), indent=2))

    def null_condition(self, n: int, device=None):
        return condition_to(repeat_condition(self.null, n), device)

    def labels(self, n: int, device=None):
        """Conditions of the evaluation prompts, cycled to ``n`` (with :meth:`prompt_list`); each
        distinct prompt is encoded once per teacher, not at every evaluation."""
        if self._prompt_conditions is None:
            self._prompt_conditions = self.prompt_encoder(self.prompts)
        index = torch.arange(n) % len(self.prompts)
        return condition_to(select_condition(self._prompt_conditions, index), device)

    def with_float32_unet(self) -> TextToImageTeacher:
        """This teacher with its UNet loaded again in float32: where a half-precision teacher's
        generator and fake score start (fp32 master weights, not rounded copies)."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", torch_dtype=torch.float32)
        d = self.denoiser
        return replace(self, denoiser=DiffusersUNetDenoiser(_freeze(unet), d.schedule, d.prediction_type))

    def prompt_list(self, n: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    @property
    def image_shape(self) -> tuple[int, ...]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.in_channels, self.sample_shape[1] * factor, self.sample_shape[2] * factor)

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Decode latents to images in [-1, 1] (float32, returned on the latents' device). The
        VAE (float32: SDXL's overflows in half precision) decodes where the teacher's UNet is."""
        device = next(self.denoiser.unet.parameters()).device
        vae = self.vae.to(device)
        scale = vae.config.scaling_factor
        out = [vae.decode(chunk.to(device, vae.dtype) / scale).sample.float().clamp(-1, 1).to(latents.device)
               for chunk in latents.split(batch_size)]
        return torch.cat(out)


def pipeline_index(xl: bool) -> dict:
    """model_index.json of a Stable Diffusion (XL) pipeline folder with a DDPM scheduler."""
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def load_text_to_image_teacher(path: str, dtype: str = "float32", prompts: list[str] | None = None,
                               prompts_file: str | None = None, image_size: int | None = None) -> TextToImageTeacher:
    """Load unet/, vae/, scheduler/, tokenizer[_2]/ and text_encoder[_2]/ of a Stable Diffusion
    pipeline (a local folder or a hub id, as diffusers resolves it), frozen, the UNet in ``dtype``
    (VAE and text encoders stay float32; embeddings are computed once and cached). Evaluation
    prompts: ``prompts``, or the prompts of ``prompts_file`` (.txt/.jsonl/.json, e.g. COCO
    captions for the COCO protocol), or a small built-in list."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if dtype not in DTYPES:
        raise ValueError(f"teacher.dtype={dtype!r}; choose one of {sorted(DTYPES)}.")
    local = Path(path).expanduser()
    if (local.is_absolute() or str(path).startswith((".", "~"))) and not local.is_dir():
        raise FileNotFoundError(f"Pipeline folder {local} does not exist. Point teacher.path at a "
                                "diffusers Stable Diffusion folder (unet/, vae/, scheduler/, "
                                "tokenizer/, text_encoder/) or a hub id.")
    path = str(local) if local.is_dir() else str(path)
    if prompts_file:
        from dmd.data.prompts import read_prompts

        prompts = read_prompts(prompts_file)[0]
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=DTYPES[dtype])
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")  # float32 (see to_images)
        require_finite_weights(unet, Path(path) / "unet")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise OSError(f"Could not load a Stable Diffusion pipeline from {path!r}: {err}. Expected "
                      "unet/, vae/ and scheduler/ subfolders (a diffusers pipeline layout).") from err
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = image_size or unet.config.sample_size * factor
    encoder = PromptEncoder.from_pretrained(path, image_size=size)
    if unet.config.cross_attention_dim != sum(e.config.hidden_size for e in encoder.text_encoders):
        raise ValueError(f"{path}: the UNet's cross_attention_dim ({unet.config.cross_attention_dim}) "
                         "does not match its text encoder(s): a mismatched pipeline folder.")
    denoiser = DiffusersUNetDenoiser(_freeze(unet), VPSchedule.from_diffusers(scheduler),
                                     scheduler.config.prediction_type)
    shape = (unet.config.in_channels, size // factor, size // factor)
    return TextToImageTeacher(denoiser, shape, 0, scheduler, vae=_freeze(vae), prompt_encoder=encoder,
                              null=encoder.null_condition(), prompts=list(prompts or DEFAULT_PROMPTS),
                              path=str(path), kind="sdxl" if encoder.xl else "sd15")


def tiny_text_to_image_teacher(path: str, kind: str = "sd15", **kwargs) -> TextToImageTeacher:
    """The tiny random pipeline of :mod:`dmd.t2i.tiny` at ``path`` (written there first if
    missing), loaded like any pipeline. For tests and the ``t2i_tiny`` preset."""
    from dmd.t2i.tiny import make_tiny_pipeline

    if not (Path(path) / "model_index.json").is_file():
        make_tiny_pipeline(path, kind)
    return load_text_to_image_teacher(str(path), **kwargs)
