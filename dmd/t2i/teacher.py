"""A latent text-to-image pipeline (SD1.5, SDXL, SD3 or Flux; folder or hub id) as a
:class:`~dmd.teachers.Teacher`.

Distillation runs in the VAE's latent space: samples are latents (C, H/f, W/f), shifted by the
VAE's ``shift_factor`` (SD3, Flux) and scaled by its ``scaling_factor``, as the pipelines make them;
:meth:`TextToImageTeacher.to_images` decodes them to [-1, 1] images for evaluation and sample
grids. Conditions are dicts of text embeddings (:mod:`dmd.t2i.text`). The family (which pipeline,
which network, which encoders) comes from the folder's model_index.json (:mod:`dmd.t2i.families`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dmd.conditioning import condition_to, repeat_condition, select_condition
from dmd.denoisers import DiffusersUNetDenoiser
from dmd.schedule import load_scheduler, prediction_type_of, schedule_from_diffusers
from dmd.t2i.families import FAMILIES, Family, family_of
from dmd.t2i.text import PromptEncoder
from dmd.teachers import Teacher, _freeze, require_finite_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompts the sample grids and evaluations use when none are given (cycled to the sample count).
DEFAULT_PROMPTS = ("a photo of a cat", "a red apple on a table", "a mountain lake at sunrise",
                   "an astronaut riding a horse", "a bowl of soup", "a city street at night",
                   "a watercolor painting of a fox", "a vintage car")


@dataclass
class TextToImageTeacher(Teacher):
    """A frozen latent text-to-image network (UNet or diffusion transformer) with its VAE and
    prompt encoder."""

    vae: torch.nn.Module = None
    prompt_encoder: PromptEncoder = None
    null: dict = None                  # batch-1 null condition (CPU)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    path: str = ""                     # the pipeline folder or hub id (generators copy its parts)
    kind: str = "sd15"                 # the family: sd15 | sdxl | sd3 | flux
    _prompt_conditions: dict = field(default=None, repr=False)  # self.prompts encoded, once

    def condition(self, batch_condition):
        return batch_condition

    @property
    def guidance(self) -> float | None:
        """Guidance-distilled Flux: the guidance its network takes as input (None otherwise)."""
        return getattr(self.denoiser, "guidance", None)

    @property
    def family(self) -> Family:
        return FAMILIES[self.kind]

    @property
    def pipeline_class(self) -> str:
        return self.family.pipeline_class

    @property
    def network_subfolder(self) -> str:
        return self.family.network_subfolder

    def save_components(self, folder) -> None:
        """The VAE, tokenizer(s), text encoder(s) and model_index.json: with the network's and
        the scheduler's subfolders the folder loads as a diffusers pipeline."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        for i, (tok, enc) in enumerate(zip(self.prompt_encoder.tokenizers, self.prompt_encoder.text_encoders)):
            suffix = f"_{i + 1}" if i else ""
            tok.save_pretrained(folder / f"tokenizer{suffix}")
            enc.save_pretrained(folder / f"text_encoder{suffix}")
        (folder / "model_index.json").write_text(json.dumps(self.family.model_index(), indent=2))

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
        """This teacher with its network loaded again in float32: where a half-precision teacher's
        generator and fake score start (fp32 master weights, not rounded copies)."""
        network = _load_network(self.path, self.family, torch.float32)
        return replace(self, denoiser=_denoiser(network, self.family, self.denoiser.schedule,
                                                self.denoiser.prediction_type, self.guidance))

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
        out = [decode_latents(vae, chunk.to(device, vae.dtype)).float().clamp(-1, 1).to(latents.device)
               for chunk in latents.split(batch_size)]
        return torch.cat(out)


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the latents a pipeline denoises: (posterior mean - shift) * scale."""
    shift = vae.config.get("shift_factor") or 0.0
    return (vae.encode(images).latent_dist.mean - shift) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_latents` through the decoder (what the pipelines do at the end)."""
    shift = vae.config.get("shift_factor") or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift).sample


def load_text_to_image_teacher(path: str, dtype: str = "float32", prompts: list[str] | None = None,
                               prompts_file: str | None = None, image_size: int | None = None,
                               guidance: float = 3.5) -> TextToImageTeacher:
    """Load the network (``unet/`` or ``transformer/``), ``vae/``, ``scheduler/`` and every
    ``tokenizer[_k]/`` + ``text_encoder[_k]/`` of a pipeline (a local folder or a hub id, as
    diffusers resolves it), frozen, the network in ``dtype`` (VAE and text encoders stay float32;
    embeddings are computed once and cached). Evaluation prompts: ``prompts``, or the prompts of
    ``prompts_file`` (.txt/.jsonl/.json, e.g. COCO captions for the COCO protocol), or a small
    built-in list. ``guidance``: the input of a guidance-distilled Flux network (ignored by others)."""
    from diffusers import AutoencoderKL

    if dtype not in DTYPES:
        raise ValueError(f"teacher.dtype={dtype!r}; choose one of {sorted(DTYPES)}.")
    local = Path(path).expanduser()
    if (local.is_absolute() or str(path).startswith((".", "~"))) and not local.is_dir():
        raise FileNotFoundError(f"Pipeline folder {local} does not exist. Point teacher.path at a "
                                "diffusers text-to-image pipeline folder (model_index.json, unet/ or "
                                "transformer/, vae/, scheduler/, tokenizer*/, text_encoder*/) or a hub id.")
    path = str(local) if local.is_dir() else str(path)
    if prompts_file:
        from dmd.data.prompts import read_prompts

        prompts = read_prompts(prompts_file)[0]
    family = family_of(path)
    try:
        network = _load_network(path, family, DTYPES[dtype])
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")  # float32 (see to_images)
        require_finite_weights(network, Path(path) / family.network_subfolder)
        scheduler = load_scheduler(path)
    except (OSError, ValueError) as err:
        raise OSError(f"Could not load a {family.pipeline_class} from {path!r}: {err}. Expected "
                      f"{family.network_subfolder}/, vae/ and scheduler/ subfolders (a diffusers "
                      "pipeline layout).") from err
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    # Flux's transformer has no sample_size: its pipeline's default is 128 latents (1024 px).
    size = image_size or (network.config.get("sample_size") or 128) * factor
    encoder = PromptEncoder.from_pretrained(path, image_size=size)
    _check_text_widths(path, family, network, encoder)
    if family.name == "flux" and size % (2 * factor):
        raise ValueError(f"Flux latents enter the transformer as 2x2 patches: the image size ({size}) "
                         f"must be a multiple of {2 * factor}.")
    # Flux's dynamic shift: the one its pipeline uses at this size (latent 2x2 patches = tokens)
    tokens = {"image_seq_len": (size // factor // 2) ** 2} if family.flow else {}
    denoiser = _denoiser(network, family, schedule_from_diffusers(scheduler, **tokens),
                         prediction_type_of(scheduler), guidance)
    shape = (vae.config.latent_channels, size // factor, size // factor)
    return TextToImageTeacher(denoiser, shape, 0, scheduler, vae=_freeze(vae), prompt_encoder=encoder,
                              null=encoder.null_condition(), prompts=list(prompts or DEFAULT_PROMPTS),
                              path=str(path), kind=family.name)


def _load_network(path: str, family: Family, dtype: torch.dtype):
    import diffusers

    cls = getattr(diffusers, family.network_class)
    return _freeze(cls.from_pretrained(path, subfolder=family.network_subfolder, torch_dtype=dtype))


def _denoiser(network, family: Family, schedule, prediction_type: str, guidance: float | None):
    from dmd.t2i.denoisers import FluxDenoiser, SD3Denoiser

    if family.name == "flux":
        return FluxDenoiser(network, schedule, prediction_type, guidance)
    if family.name == "sd3":
        return SD3Denoiser(network, schedule, prediction_type)
    return DiffusersUNetDenoiser(network, schedule, prediction_type)


def _check_text_widths(path: str, family: Family, network, encoder: PromptEncoder) -> None:
    """The network's text input widths must be its encoders' (else: a mismatched folder)."""
    c = network.config
    widths = [e.config.hidden_size if hasattr(e.config, "hidden_size") else e.config.d_model
              for e in encoder.text_encoders]
    if family.name in ("sd15", "sdxl"):
        expected = {"cross_attention_dim": (c.cross_attention_dim, sum(widths))}
    elif family.name == "sd3":
        pooled = sum(e.config.projection_dim for e in encoder.text_encoders[:2])
        expected = {"joint_attention_dim": (c.joint_attention_dim, widths[2]),
                    "pooled_projection_dim": (c.pooled_projection_dim, pooled)}
    else:
        expected = {"joint_attention_dim": (c.joint_attention_dim, widths[1]),
                    "pooled_projection_dim": (c.pooled_projection_dim, widths[0])}
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(f"{path}: the {family.network_class}'s text inputs do not match its text encoders "
                         f"({', '.join(f'{k}={a}, encoders give {b}' for k, (a, b) in wrong.items())}): "
                         "a mismatched pipeline folder.")


def tiny_text_to_image_teacher(path: str, kind: str = "sd15", **kwargs) -> TextToImageTeacher:
    """The tiny random pipeline of :mod:`dmd.t2i.tiny` at ``path`` (written there first if
    missing), loaded like any pipeline. For tests and the ``t2i_tiny`` preset."""
    from dmd.t2i.tiny import IMAGE_SIZE, make_tiny_pipeline

    if not (Path(path) / "model_index.json").is_file():
        make_tiny_pipeline(path, kind)
    kwargs.setdefault("image_size", IMAGE_SIZE)  # the tiny Flux transformer has no sample size
    return load_text_to_image_teacher(str(path), **kwargs)
