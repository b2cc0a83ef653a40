"""Flow-matching text-to-image teachers: tiny random SD3-like and Flux-like pipelines trained from
the CLI, their released generators sampled by the stock diffusers pipelines (the same latents as
dmd's own sampling, bit for bit), and their LoRA adapters read back by diffusers."""

import json
import math

import diffusers
import pytest
import torch

from dmd.generator import load_generator
from dmd.t2i.denoisers import pack_latents, patch_ids, unpack_latents
from dmd.t2i.families import family_of
from dmd.t2i.teacher import tiny_text_to_image_teacher

PROMPTS = ["a red square", "a blue circle"]


def pipeline_latents(run, kind):
    """(dmd's samples, the stock pipeline's) for the same noise and prompts, and the pipeline."""
    gen, info = load_generator(run)
    meta = json.loads((run / "generator" / "generator.json").read_text())
    pipe = getattr(diffusers, info.pipeline_class).from_pretrained(run / "generator")
    noise = torch.randn(2, *info.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = gen(noise, info.prompt_encoder(PROMPTS), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # the pipelines' scheduler steps draw their fresh noise from the global stream
    out = pipe(PROMPTS, latents=pack_latents(noise) if kind == "flux" else noise, output_type="latent",
               max_sequence_length=16, height=32, width=32, **meta["pipeline_call"]).images
    if kind == "flux":
        out = unpack_latents(out, *info.sample_shape)
    return ours, out, pipe, meta


@pytest.mark.parametrize("kind,timesteps,lora", [
    ("sd3", "[999]", 0),
    pytest.param("flux", "[999,499]", 4, marks=pytest.mark.slow),
    pytest.param("sd3", "[999,749,499,249]", 4, marks=pytest.mark.slow)])
def test_flow_pipelines_train_and_sample_through_stock_diffusers(cli, tmp_path, kind, timesteps, lora):
    run = tmp_path / "run"
    cli("dmd.train", f"experiment=t2i_tiny_{kind}", "max_iterations=6", f"algorithm.generator_timesteps={timesteps}",
        f"algorithm.lora.generator_rank={lora}", f"algorithm.lora.alpha={2 * lora or 'null'}",
        "optim.lr_generator=1e-3", "optim.warmup_steps=0", f"paths.cache_dir={tmp_path}/cache",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["generator_steps"] == 2
    assert results["metrics"]["clip_score"] > 0
    # The generator moved away from the teacher (the GAN head on the transformer's tokens trains too).
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("gan_head.") for k in state)

    ours, theirs, pipe, meta = pipeline_latents(run, kind)
    steps = len(json.loads(timesteps))
    assert meta["pipeline_call"]["num_inference_steps"] == steps
    assert (meta["guidance"] == 3.5) if kind == "flux" else ("guidance" not in meta)
    # Multi-step: the scheduler's stochastic sampling draws the same fresh noise as dmd's re-noising.
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    images = pipe(PROMPTS, output_type="pt", max_sequence_length=16, height=32, width=32,
                  **meta["pipeline_call"]).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    if lora:  # the adapters load into the teacher's pipeline and give the fused generator
        teacher = getattr(diffusers, pipe.__class__.__name__).from_pretrained(tmp_path / "cache" / "tiny_pipelines" / kind)
        teacher.scheduler = pipe.scheduler  # the generator's sampling (stochastic, fixed shift)
        kwargs = dict(output_type="latent", max_sequence_length=16, height=32, width=32, **meta["pipeline_call"])
        noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        latents = pack_latents(noise) if kind == "flux" else noise
        torch.manual_seed(1)
        before = teacher(PROMPTS, latents=latents, **kwargs).images
        teacher.load_lora_weights(run / "generator")
        torch.manual_seed(1)
        adapted = teacher(PROMPTS, latents=latents, **kwargs).images
        if kind == "flux":
            before, adapted = (unpack_latents(x, 4, 16, 16) for x in (before, adapted))
        assert (adapted - before).abs().max() > 1e-3
        assert torch.allclose(adapted, theirs, atol=1e-3)


def test_flux_patches_round_trip_in_the_pipelines_layout():
    x = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 12, 16) and torch.equal(unpack_latents(tokens, 4, 6, 8), x)
    assert torch.equal(tokens, diffusers.FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    # FluxPipeline's ids for a 12x16-pixel image (vae_scale_factor 2): patch (row, column) positions.
    assert torch.equal(patch_ids(6, 8), diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_pipeline_families_and_their_conditions(tmp_path):
    sd3 = tiny_text_to_image_teacher(str(tmp_path / "sd3"), "sd3")
    cond, null = sd3.labels(3), sd3.null_condition(3)
    net = sd3.denoiser.unet.config
    # SD3: CLIP states (padded to T5's width) then T5's tokens; pooled = both CLIP projections.
    assert cond["encoder_hidden_states"].shape == (3, 16 + 16, net.joint_attention_dim)
    assert cond["pooled_projections"].shape == (3, net.pooled_projection_dim)
    assert null["encoder_hidden_states"].abs().sum() > 0  # the empty prompt's encoding, not zeros
    assert not torch.equal(cond["encoder_hidden_states"][0], null["encoder_hidden_states"][0])
    assert family_of(sd3.path).pipeline_class == "StableDiffusion3Pipeline"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline pipeline; dmd distils"):
        family_of(str(tmp_path / "odd"))
    # Flux: a dynamic-shift scheduler, taken at the teacher's size (16x16 latents = 64 tokens).
    flux = tiny_text_to_image_teacher(str(tmp_path / "flux"), "flux")
    assert flux.scheduler.config.use_dynamic_shifting and flux.guidance == 3.5
    mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(64)
    assert flux.denoiser.schedule.shift == pytest.approx(math.exp(mu))
    assert flux.labels(2)["pooled_projections"].shape == (2, flux.denoiser.unet.config.pooled_projection_dim)
    # Its samples depend on that input: a cached teacher reference made at another guidance is not reused.
    from dmd.metrics.reference import TeacherReference

    before = TeacherReference().provenance(flux)
    flux.denoiser.guidance = 2.0
    assert TeacherReference().provenance(flux) != before
