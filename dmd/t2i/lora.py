"""LoRA adapters (peft, through diffusers' PEFT integration) on the generator or fake score.

Only the adapters train; the base weights stay the teacher's. A released generator is saved
twice over: the network with the adapters fused (what ``dmd.sample`` / pipelines load as a
model) and ``pytorch_lora_weights.safetensors`` in the format the pipeline's
``load_lora_weights`` reads (to apply to the teacher's pipeline).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

# The attention projections, as in DMD2's and diffusers' LoRA training scripts.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             target_modules=TARGET_MODULES) -> nn.Module:
    """Freeze ``unet`` and give it trainable LoRA adapters of ``rank`` (B starts at zero, so the
    network starts as it was)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    return unet


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def fused_copy(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` with its adapters merged into the weights and removed."""
    fused = copy.deepcopy(unet)
    fused.fuse_lora()
    fused.unload_lora()
    return fused


def save_lora(unet: nn.Module, folder: str | Path, pipeline_class: str = "StableDiffusionPipeline",
              network: str = "unet") -> Path:
    """Write the adapters as ``<folder>/pytorch_lora_weights.safetensors`` (diffusers' format;
    ``network``: the pipeline's name for the adapted model, ``unet`` or ``transformer``)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    # The adapter's config (rank, alpha) goes along: without it diffusers assumes alpha = rank.
    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, weight_name=LORA_FILE, **{f"{network}_lora_layers": get_peft_model_state_dict(unet),
                                          f"{network}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})
    return folder / LORA_FILE
