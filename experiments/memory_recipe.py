"""Per-GPU memory of DMD2 on Stable Diffusion 1.5 / XL / 3-medium and Flux-dev: the static part
(weights, gradients, optimizer states) from exact parameter counts, for full fine-tuning or
LoRA, DDP or FSDP.

    python experiments/memory_recipe.py [--gpus 8] [--lora-rank 64] [--out experiments/results/memory_recipe.md]

The UNets, transformers (SD3's MMDiT, Flux's) and VAEs are built on the meta device from the
published configs (no weights, no download), so the parameter counts are exact. Three networks are resident during training:
the frozen teacher (real score), the generator and the fake score (+ DMD2's small GAN head);
text encoders are not (embeddings are cached), the VAE only to decode evaluation samples.
Bytes per parameter (this implementation):

    frozen teacher        2 (bf16: teacher.dtype=bfloat16) or 4 (float32)
    trained, full         4 weights + 4 gradients + 8 AdamW moments = 16 (fp32 master weights
                          under bf16 autocast), + 4 with a generator EMA
    trained, LoRA         4 per base weight (a frozen float32 copy of the teacher's network)
                          + 16 per adapter weight
    DDP                   + 4 per trained parameter: DDP's gradient buckets (a second copy of the
                          gradients unless gradient_as_bucket_view)
    FSDP (trainer=fsdp)   the generator's and fake score's weights, gradients and AdamW states
                          divided over the GPUs (dmd.sharding: one FSDP unit per residual or transformer block); the
                          frozen teacher stays whole on every GPU; + the largest unit gathered
                          whole in float32, twice (the running unit and the prefetched next one)
    LoRA rows             adapters on both the generator and the fake score

Activations are NOT included: they depend on resolution, batch, gradient checkpointing and
attention kernels, and need a measurement on a GPU (not available where this was written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

UNETS = {
    "SD1.5": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
    "SDXL": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
# Flow-matching teachers (issue 16): the published transformer configs of
# stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-dev.
TRANSFORMERS = {
    "SD3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
    "Flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)
VAE16 = {**VAE, "latent_channels": 16}  # SD3's and Flux's VAE
GIB = 1024 ** 3


def parameter_counts(unet_config: dict, lora_rank: int, cls: str = "UNet2DConditionModel") -> tuple[int, int, int]:
    """(network parameters, LoRA adapter parameters at ``lora_rank``, parameters of the largest
    FSDP unit), counted on the meta device."""
    import diffusers

    from dmd.sharding import blocks
    from dmd.t2i.lora import add_lora

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = getattr(diffusers, cls)(**unet_config)
        base = count(unet)
        units = [count(b) for b in blocks(unet)]
        add_lora(unet, lora_rank)
    units.append(base - sum(units))  # the root unit: what no block holds
    return base, sum(p.numel() for p in unet.parameters() if p.requires_grad), max(units)


def vae_parameters(config: dict = VAE) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKL(**config).parameters())


def static_gib(base: int, lora: int, vae: int, unit: int, mode: str, shard: int, ema: bool) -> dict:
    """GiB per GPU of each resident network for one setting (``shard`` = FSDP world size, 1 = DDP)."""
    teacher = 2 * base  # replicated: rank 0 alone samples it for evaluation references
    buckets = 4 if shard == 1 else 0  # DDP's gradient buckets
    if mode == "full":
        trained = (16 + 4 * ema + buckets) * base / shard
        fake = (16 + buckets) * base / shard
    else:
        trained = (4 * base + (16 + 4 * ema + buckets) * lora) / shard
        fake = (4 * base + (16 + buckets) * lora) / shard
    gathered = 2 * 4 * unit if shard > 1 else 0
    parts = {"teacher (bf16)": teacher, "generator": trained, "fake score": fake,
             "FSDP gathered units": gathered, "VAE (fp32)": 4 * vae}
    return {k: v / GIB for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="FSDP world size of the sharded rows")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--out", default="experiments/results/memory_recipe.md")
    args = p.parse_args()
    lines = ["| model | training | sharding | teacher | generator | fake score | gathered units | VAE (decoding) "
             "| total static GiB/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    counts = []
    models = [(name, "UNet2DConditionModel", config, VAE) for name, config in UNETS.items()]
    models += [(name, cls, config, VAE16) for name, (cls, config) in TRANSFORMERS.items()]
    for name, cls, config, vae_config in models:
        base, lora, unit = parameter_counts(config, args.lora_rank, cls)
        vae = vae_parameters(vae_config)
        counts.append(f"{name} {cls} {base / 1e6:.1f} M parameters, LoRA rank {args.lora_rank} "
                      f"adapters {lora / 1e6:.1f} M, largest FSDP unit {unit / 1e6:.1f} M, VAE {vae / 1e6:.1f} M")
        for mode in ("full", f"LoRA r{args.lora_rank}"):
            for shard, label in ((1, "DDP"), (args.gpus, f"FSDP x{args.gpus}")):
                g = static_gib(base, lora, vae, unit, "full" if mode == "full" else "lora", shard, ema=False)
                cells = [f"{v:.1f}" for v in g.values()]
                lines.append(f"| {name} | {mode} | {label} | " + " | ".join(cells) + f" | {sum(g.values()):.1f} |")
    text = ("# Static memory per GPU, DMD2 (weights + gradients + AdamW states; activations not included)\n\n"
            f"Command: `python experiments/memory_recipe.py --gpus {args.gpus} --lora-rank {args.lora_rank}`\n\n"
            + "\n".join(f"- {c}" for c in counts) + "\n\n"
            + "\n".join(lines) + "\n\nFull SDXL under DDP needs ~100 GiB before any activation: more than an "
            "80 GB GPU, which is why DMD2 trains it with FSDP (or LoRA). Flux-dev (11.9 B) needs FSDP even "
            "with LoRA on 80 GB GPUs once activations are added, and full fine-tuning of both its students "
            "leaves ~10 GiB per H100 for activations under FSDP x8.\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
