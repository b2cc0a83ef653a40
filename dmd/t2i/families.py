"""The latent text-to-image pipeline families dmd distils, and how to tell them apart.

A family says which diffusers pipeline a folder loads as, where its denoising network lives
(``unet/`` or ``transformer/``) and of which class, and which tokenizer / text encoder pairs it
has (``tokenizer``/``text_encoder``, ``tokenizer_2``/``text_encoder_2``, ...). The family of a
folder (or hub id) is read from its ``model_index.json``, as diffusers itself decides which
pipeline class to build.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    network_class: str              # a diffusers model class
    network_subfolder: str          # unet | transformer
    text_encoders: tuple            # ((encoder class, tokenizer class), ...) in subfolder order
    scheduler_class: str            # what the pipeline folder's scheduler/ holds
    flow: bool = False              # flow matching (FlowMatchEulerDiscreteScheduler)

    def model_index(self) -> dict:
        """model_index.json of a pipeline folder of this family (no optional image encoders)."""
        index = {"_class_name": self.pipeline_class, "_diffusers_version": "0.30.0",
                 self.network_subfolder: ["diffusers", self.network_class],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", self.scheduler_class]}
        for i, (encoder, tokenizer) in enumerate(self.text_encoders):
            suffix = f"_{i + 1}" if i else ""
            index[f"text_encoder{suffix}"] = ["transformers", encoder]
            index[f"tokenizer{suffix}"] = ["transformers", tokenizer]
        if self.name == "sd15":
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        elif self.name == "sdxl":
            index.update(force_zeros_for_empty_prompt=True)
        elif self.name in ("sd3", "flux"):
            index.update(image_encoder=[None, None], feature_extractor=[None, None])
        return index


CLIP, CLIP_PROJ, T5 = ("CLIPTextModel", "CLIPTokenizer"), ("CLIPTextModelWithProjection", "CLIPTokenizer"), \
    ("T5EncoderModel", "T5Tokenizer")
FAMILIES = {f.name: f for f in (
    Family("sd15", "StableDiffusionPipeline", "UNet2DConditionModel", "unet", (CLIP,), "DDPMScheduler"),
    Family("sdxl", "StableDiffusionXLPipeline", "UNet2DConditionModel", "unet", (CLIP, CLIP_PROJ), "DDPMScheduler"),
    # SD3: two CLIPs (penultimate states + pooled projections) and T5 (sequence) into an MMDiT.
    Family("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", "transformer", (CLIP_PROJ, CLIP_PROJ, T5),
           "FlowMatchEulerDiscreteScheduler", flow=True),
    # Flux: CLIP's pooled output and T5's sequence; latents enter the transformer as 2x2 patches.
    Family("flux", "FluxPipeline", "FluxTransformer2DModel", "transformer", (CLIP, T5),
           "FlowMatchEulerDiscreteScheduler", flow=True),
)}
BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def family_of(path: str) -> Family:
    """The family of a pipeline folder or hub id, from its model_index.json."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(str(path))
    except (OSError, ValueError) as err:
        raise OSError(f"Could not read model_index.json of {path!r} ({err}): point teacher.path at a "
                      "diffusers pipeline folder or hub id.") from err
    name = index.get("_class_name", "")
    if name not in BY_PIPELINE:
        raise ValueError(f"{path}: a {name or 'unnamed'} pipeline; dmd distils "
                         f"{', '.join(sorted(BY_PIPELINE))} folders.")
    return BY_PIPELINE[name]

