"""Tiny random pipelines of every family dmd distils, built from configs and written with
``save_pretrained`` so that every load goes through the real diffusers/transformers loaders.

``kind="sd15"``: UNet2DConditionModel (cross-attention on one CLIP text encoder), AutoencoderKL,
DDPM scheduler (eps prediction). ``kind="sdxl"``: two text encoders (the second with a
projection, whose pooled output and the size/crop time ids form SDXL's added conditioning).
``kind="sd3"``: an MMDiT (SD3Transformer2DModel) on two projected CLIPs + T5, a VAE with a shift
factor, FlowMatchEulerDiscreteScheduler with SD3's shift 3. ``kind="flux"``: a
FluxTransformer2DModel with a guidance embedding (like FLUX.1-dev) on CLIP + T5, Flux's
resolution-dependent (dynamic) shift. The tokenizers are CLIP's BPE and T5's unigram over
character vocabularies written here (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("sd15", "sdxl", "sd3", "flux")
TEXT_DIM = 32
T5_DIM = 48  # not TEXT_DIM: a mix-up of the CLIP and T5 widths fails loudly
IMAGE_SIZE = 32  # pixels; the VAE halves it (two blocks) -> 16x16 latents


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2's mapping:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A CLIPTokenizer whose vocabulary is the byte-level characters (and their word-final
    forms) plus CLIP's start/end tokens; no merges, so every word is spelled out."""
    from transformers import CLIPTokenizer

    chars = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars]
                                            + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)


def write_t5_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A T5 (unigram) tokenizer over lower-case letters, digits and punctuation, each with and
    without the word-start mark; everything else is <unk>."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0),
             *((c, -3.0) for c in chars), *(("\u2581" + c, -2.5) for c in chars)]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(folder)


def _t5_encoder(tokenizer_dir: Path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(tokenizer_dir)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id))


def _text_encoder(tokenizer_dir: Path, projection: bool):
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    config = CLIPTextConfig(**_text_config(CLIPTokenizer.from_pretrained(tokenizer_dir)),
                            projection_dim=TEXT_DIM, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _text_config(tok) -> dict:
    """The tiny CLIP text transformer's settings for tokenizer ``tok`` (pipelines' and CLIP's)."""
    return dict(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_tiny_pipeline(folder: str | Path, kind: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny random pipeline folder (unet, vae, scheduler, tokenizer(s), text encoder(s),
    model_index.json last) that ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` load."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}.")
    folder = Path(folder)
    with torch.random.fork_rng():  # seeded weights without touching the caller's random stream
        torch.manual_seed(seed)
        _write_components(folder, kind)
    return folder


def _write_components(folder: Path, kind: str) -> None:
    from dmd.t2i.families import FAMILIES

    family = FAMILIES[kind]
    for i, (encoder, _) in enumerate(family.text_encoders):
        suffix = f"_{i + 1}" if i else ""
        tok_dir = folder / f"tokenizer{suffix}"
        if encoder == "T5EncoderModel":
            write_t5_tokenizer(tok_dir)
            _t5_encoder(tok_dir).save_pretrained(folder / f"text_encoder{suffix}")
        else:
            write_tokenizer(tok_dir)
            _text_encoder(tok_dir, projection=encoder.endswith("WithProjection")).save_pretrained(
                folder / f"text_encoder{suffix}")
    _write_network(folder, kind)
    _write_vae_and_scheduler(folder, kind)
    (folder / "model_index.json").write_text(json.dumps(family.model_index(), indent=2))


def _write_network(folder: Path, kind: str) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    latent = IMAGE_SIZE // 2
    if kind == "sd3":  # joint attention over T5's width; pooled = both CLIP projections
        SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                              attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM,
                              caption_projection_dim=32, pooled_projection_dim=2 * TEXT_DIM,
                              pos_embed_max_size=latent).save_pretrained(folder / "transformer")
        return
    if kind == "flux":  # 4 latent channels as 2x2 patches = 16 inputs; rope axes sum to the head dim
        FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                               attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM,
                               pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
                               axes_dims_rope=(4, 2, 2)).save_pretrained(folder / "transformer")
        return
    xl = kind == "sdxl"
    unet_kwargs = dict(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM * (2 if xl else 1), attention_head_dim=8)
    if xl:  # SDXL's added conditioning: pooled text embedding + 6 time ids, each embedded in 8
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8)
    UNet2DConditionModel(**unet_kwargs).save_pretrained(folder / "unet")


def _write_vae_and_scheduler(folder: Path, kind: str) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    flow = kind in ("sd3", "flux")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=IMAGE_SIZE,
                  # SD3's and Flux's VAEs shift latents before scaling (SD3: 0.0609, 1.5305)
                  shift_factor=0.0609 if flow else None,
                  scaling_factor=1.5305 if flow else 0.18215).save_pretrained(folder / "vae")
    if kind == "sd3":
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    elif kind == "flux":  # FLUX.1-dev's scheduler config
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(
            folder / "scheduler")
    else:
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="epsilon", clip_sample=False,
                      steps_offset=1).save_pretrained(folder / "scheduler")


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIPProcessor (32x32 images) written with save_pretrained."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer", max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = _text_config(tok)  # max_position_embeddings = the tokenizer's 77
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=TEXT_DIM, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(),
                            vision_config=CLIPVisionConfig(**vision).to_dict(), projection_dim=TEXT_DIM)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_clip(path: str | Path) -> str:
    """The tiny CLIP folder at ``path`` (written first if missing), for the t2i_tiny evaluation."""
    if not (Path(path) / "config.json").is_file():
        make_tiny_clip(path)
    return str(path)
