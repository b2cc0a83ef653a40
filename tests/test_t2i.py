"""Text-to-image distillation on tiny random SD1.5-like and SDXL-like pipelines: built from
configs, saved and loaded with save_pretrained/from_pretrained, trained a few DMD2 steps (with and
without LoRA), released as pipeline folders, and their LoRA weights read back by diffusers."""

import json
import math

import pytest
import torch
from conftest import ROOT

from dmd.data.prompts import read_prompts
from dmd.t2i.teacher import tiny_text_to_image_teacher

TINY_DATA = ROOT / "experiments" / "data" / "t2i_tiny" / "prompts.jsonl"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Both tiny pipelines, written once for the module."""
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: tiny_text_to_image_teacher(str(root / kind), kind) for kind in ("sd15", "sdxl")}


def test_null_conditions_follow_each_pipeline(pipelines):
    sd15, sdxl = pipelines["sd15"], pipelines["sdxl"]
    # SD1.5: CFG's null condition is the empty prompt's embedding.
    empty = sd15.prompt_encoder([""])["encoder_hidden_states"]
    assert torch.equal(sd15.null_condition(3)["encoder_hidden_states"], empty.expand(3, -1, -1))
    assert empty.abs().sum() > 0
    # SDXL: zeros for the text embeddings, the same size/crop time ids as real prompts.
    null, cond = sdxl.null_condition(2), sdxl.labels(2)
    assert not null["encoder_hidden_states"].any() and not null["added_cond_kwargs"]["text_embeds"].any()
    assert torch.equal(null["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])
    assert cond["encoder_hidden_states"].shape[-1] == sdxl.denoiser.unet.config.cross_attention_dim
    assert sd15.sample_shape == sdxl.sample_shape == (4, 16, 16)


def test_a_bf16_teacher_answers_in_the_callers_precision(tmp_path, pipelines):
    from dmd.t2i.teacher import load_text_to_image_teacher

    teacher = load_text_to_image_teacher(pipelines["sd15"].path, dtype="bfloat16")
    assert teacher.denoiser.unet.dtype == torch.bfloat16
    x = torch.randn(2, *teacher.sample_shape)
    x0 = teacher.denoiser(x, torch.tensor([500, 700]), teacher.labels(2))
    full = pipelines["sd15"].denoiser(x, torch.tensor([500, 700]), pipelines["sd15"].labels(2))
    assert x0.dtype == torch.float32 and torch.allclose(x0, full, atol=0.1, rtol=0.1)
    assert teacher.to_images(x0).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kind,lora", [("sd15", 0), *(pytest.param(k, r, marks=pytest.mark.slow)
                                                    for k, r in [("sd15", 4), ("sdxl", 0), ("sdxl", 4)])])
def test_t2i_tiny_trains_and_releases_a_pipeline(cli, tmp_path, kind, lora):
    run = tmp_path / "run"
    # A large step (lr 1e-3, no warmup) so that two generator updates visibly move the adapters.
    cli("dmd.train", "experiment=t2i_tiny", f"teacher.kind={kind}", "max_iterations=6",
        f"algorithm.lora.generator_rank={lora}", f"algorithm.lora.alpha={2 * lora or 'null'}",
        "optim.lr_generator=1e-3", "optim.warmup_steps=0", f"paths.cache_dir={tmp_path}/cache",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert (results["iterations"], results["generator_steps"]) == (6, 2) and results["status"] == "completed"
    # The evaluation callback scored decoded images: FID/KID in (tiny) CLIP space vs the real
    # images and the teacher's samples for the same prompts, and the CLIP score vs the prompts.
    assert [e["generator_step"] for e in results["evaluations"]] == [1, 2]
    metrics = results["metrics"]
    assert {"fid_clip_vs_data", "fid_clip_vs_teacher", "kid_clip_vs_data", "clip_score"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in metrics) and metrics["num_samples"] == 16
    assert metrics["fid_clip_vs_teacher"] < metrics["fid_clip_vs_data"]  # random nets: the student is its teacher
    assert (run / "samples" / "step_000002.png").is_file()
    losses = (run / "csv").glob("version_*/metrics.csv")
    assert (run / "samples.png").is_file() and list(losses)

    import diffusers

    pipeline_class = getattr(diffusers, "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    teacher_dir = tmp_path / "cache" / "tiny_pipelines" / kind

    def image(pipe):
        return pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    # The released generator folder is a pipeline diffusers loads as it is.
    released = image(pipeline_class.from_pretrained(run / "generator"))
    assert released.shape == (1, 3, 32, 32)
    if (kind, lora) == ("sd15", 0):  # dmd.evaluate scores the released generator the same way
        # The run dir brings its teacher (pipeline), data and evaluation preset.
        cli("dmd.evaluate", f"ckpt={run}", "eval.num_samples=16",
            "latency.batch_sizes=[1]", "latency.repeats=2", f"paths.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/evaluate")
        scored = json.loads((tmp_path / "evaluate" / "results.json").read_text())
        assert scored["nfe"] == 1 and scored["metrics"]["clip_score"] == pytest.approx(metrics["clip_score"], rel=1e-4)
    if lora:  # its adapters load into the teacher's pipeline, and they change its output
        pipe = pipeline_class.from_pretrained(teacher_dir)
        before = image(pipe)
        pipe.load_lora_weights(run / "generator")
        adapted = image(pipe)
        assert (adapted - before).abs().max() > 1e-3
        # ... and with the adapters' scale (alpha 2 x rank here): the teacher + LoRA = the fused generator
        assert torch.allclose(adapted, released, atol=2e-3)
        assert not (run / "generator" / "unet" / "adapter_config.json").exists()  # unet/ is fused
    else:
        assert not (run / "generator" / "pytorch_lora_weights.safetensors").exists()


def test_the_gan_loss_without_real_images_is_refused(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n" * 4)
    proc = cli("dmd.train", "experiment=t2i_tiny", f"data.prompts={prompts}", "max_iterations=2",
               f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "The GAN loss needs real images" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_prompt_files_are_read_and_bad_ones_refused(tmp_path):
    prompts, images = read_prompts(TINY_DATA)
    assert len(prompts) == 16 and all(p.is_file() for p in images)
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    assert read_prompts(tmp_path / "p.txt") == (["a cat", "a dog"], [None, None])
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [{"caption": "a cat "}, {"caption": "a dog"}]}))
    assert read_prompts(tmp_path / "coco.json")[0] == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text" "broken"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="data.prompts"):
        read_prompts(tmp_path / "missing.txt")
    # Null, blank or non-text prompts and non-string image fields are named by file and line.
    for n, row in enumerate(['{"prompt": null}', '{"prompt": "  "}', '{"caption": 5}', '{"prompt": "a", "image": 3}'], 2):
        (tmp_path / "rows.jsonl").write_text('{"prompt": "ok"}\n' * (n - 1) + row + "\n")
        with pytest.raises(ValueError, match=rf"rows.jsonl, line {n}: (a prompt must be non-empty text|'image' must be)"):
            read_prompts(tmp_path / "rows.jsonl")
    (tmp_path / "nulls.json").write_text(json.dumps({"annotations": [{"caption": "a"}, {"caption": None}]}))
    with pytest.raises(ValueError, match=r"annotations\[1\]: a prompt must be non-empty text, got None"):
        read_prompts(tmp_path / "nulls.json")
    # Real images come from one place: the prompt file's pairs or a separate source, never both.
    from dmd.data.prompts import PromptDataModule

    with pytest.raises(ValueError, match="pairs every prompt with an image already"):
        PromptDataModule(str(TINY_DATA), "unused", images=str(tmp_path))
    (tmp_path / "half.jsonl").write_text('{"prompt": "a", "image": "x.png"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match="1 of 2 rows have no 'image'"):
        PromptDataModule(str(tmp_path / "half.jsonl"), "unused")


@pytest.mark.slow
def test_bf16_autocast_and_gradient_checkpointing_train_the_tiny_pipeline(cli, tmp_path):
    run = tmp_path / "run"
    cli("dmd.train", "experiment=t2i_tiny", "max_iterations=2", "trainer.precision=bf16-mixed",
        "gradient_checkpointing=true", "teacher.dtype=bfloat16", f"paths.cache_dir={tmp_path}/cache",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    config = json.loads((run / "results.json").read_text())["config"]
    assert config["trainer"]["precision"] == "bf16-mixed" and config["gradient_checkpointing"]
    # fp32 master weights: the released generator is saved in float32.
    from safetensors.torch import load_file

    weights = load_file(run / "generator" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.parametrize("preset,expected", [
    ("sd15_dmd2", {"ttur_ratio": 10, "guidance_scale": 1.75, "generator_timesteps": [999], "gan": 1e-3, "lr": 5e-7}),
    ("sdxl_dmd2_4step", {"ttur_ratio": 5, "guidance_scale": 8.0,
                         "generator_timesteps": [999, 749, 499, 249], "gan": 5e-3, "lr": 5e-7}),
    ("sd3_dmd2", {"ttur_ratio": 5, "guidance_scale": 7.0,
                  "generator_timesteps": [999, 749, 499, 249], "gan": 5e-3, "lr": 5e-7}),
    # FastGen's Flux recipe: embedded guidance 3.5 instead of CFG.
    ("flux_dmd2", {"ttur_ratio": 5, "guidance_scale": 1.0,
                   "generator_timesteps": [999, 749, 499, 249], "gan": 3e-2, "lr": 1e-5}),
])
def test_paper_presets_compose_with_dmd2s_hyperparameters(preset, expected):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", "data.prompts=captions.txt"])
    a = cfg.algorithm
    assert (a.ttur_ratio, a.guidance_scale, list(a.generator_timesteps), a.gan.generator_weight) == (
        expected["ttur_ratio"], expected["guidance_scale"], expected["generator_timesteps"], expected["gan"])
    assert a.regression.weight == 0 and a.gan.discriminator_weight == 1e-2
    assert cfg.trainer.precision == "bf16-mixed" and cfg.teacher.dtype == "bfloat16"
    assert cfg.gradient_checkpointing and cfg.data.pipeline == cfg.teacher.path
    assert cfg.optim.lr_generator == cfg.optim.lr_fake == expected["lr"]
    assert cfg.teacher.get("guidance") == (3.5 if preset == "flux_dmd2" else None)
    if preset in ("sd3_dmd2", "flux_dmd2"):  # the teacher samples at the data's size (Flux: 512, not 1024)
        assert cfg.teacher.image_size == cfg.data.image_size


def test_memory_recipe_counts_the_published_unets_exactly():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_recipe", ROOT / "experiments" / "memory_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    base, lora, unit = recipe.parameter_counts(recipe.UNETS["SD1.5"], lora_rank=4)
    assert base == 859_520_964  # SD1.5's UNet, as published
    assert 0 < lora < base / 100 and 0 < unit < base / 5
    ddp = recipe.static_gib(base, lora, 0, unit, "full", shard=1, ema=False)
    assert ddp["generator"] == pytest.approx(20 * base / 1024 ** 3)  # 16 B/param + DDP's buckets
    sharded = recipe.static_gib(base, lora, 0, unit, "full", shard=8, ema=False)
    assert sharded["generator"] == pytest.approx(16 * base / 8 / 1024 ** 3)
    assert sharded["teacher (bf16)"] == ddp["teacher (bf16)"]  # the frozen teacher is not sharded
    assert sharded["FSDP gathered units"] == pytest.approx(8 * unit / 1024 ** 3)


@pytest.fixture
def unpaired_prompts(tmp_path):
    """The bundled prompts as a .txt file: no images paired, real images come from elsewhere."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts(TINY_DATA)[0]))
    return prompts


def test_pre_encoded_latents_serve_as_real_images(tmp_path, pipelines, unpaired_prompts):
    from safetensors.torch import save_file

    from dmd.data.prompts import PromptDataModule

    path = pipelines["sd15"].path
    prompts = unpaired_prompts  # the real images are the latents file
    good = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(3, 4, 16, 16)}, good)
    data = PromptDataModule(str(prompts), path, latents=str(good), batch_size=4, cache_dir=str(tmp_path))
    data.setup()
    real, cond = next(iter(data.train_dataloader()))
    assert data.has_real_images and real.shape == (4, 4, 16, 16)
    assert cond["encoder_hidden_states"].shape[0] == 4
    bad = tmp_path / "bad.safetensors"
    save_file({"latents": torch.randn(3, 4, 8, 8)}, bad)
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8\).*\(4, 16, 16\)"):
        PromptDataModule(str(prompts), path, latents=str(bad), cache_dir=str(tmp_path)).setup()


def test_webdataset_shards_serve_as_real_images(tmp_path, pipelines, unpaired_prompts):
    import tarfile

    from dmd.data.prompts import PromptDataModule

    images = sorted((TINY_DATA.parent / "images").glob("*.png"))
    for shard in range(2):  # 2 shards x 3 images, each sample an image and its caption
        with tarfile.open(tmp_path / f"shard-{shard:06d}.tar", "w") as tar:
            for i, png in enumerate(images[3 * shard: 3 * shard + 3]):
                tar.add(png, arcname=f"{shard:02d}{i:04d}.png")
                caption = tmp_path / "caption.txt"
                caption.write_text(png.stem.replace("_", " "))
                tar.add(caption, arcname=f"{shard:02d}{i:04d}.txt")
    prompts = unpaired_prompts  # real images come from the shards / folder
    data = PromptDataModule(str(prompts), pipelines["sd15"].path, shards=str(tmp_path / "shard-{000000..000001}.tar"),
                            batch_size=4, cache_dir=str(tmp_path / "cache"))
    data.setup()
    folder = PromptDataModule(str(prompts), pipelines["sd15"].path, images=str(TINY_DATA.parent / "images"),
                              cache_dir=str(tmp_path / "cache"))
    folder.setup()
    shards = data.train_set.latents
    assert shards.shape == (6, 4, 16, 16)  # every image of both shards, in order
    assert torch.allclose(shards, folder.train_set.latents[:6], atol=1e-5)  # the same pixels as the files
    with pytest.raises(FileNotFoundError, match="shard"):
        PromptDataModule(str(prompts), pipelines["sd15"].path, shards=str(tmp_path / "none-{0..1}.tar")).setup()


def test_prompt_data_is_encoded_once_per_node_and_read_memory_mapped(tmp_path, pipelines, monkeypatch):
    """prepare_data (one process per node) runs the encoders; setup on every rank only maps the
    caches it names, and they hold what the encoders answer."""
    import types

    import diffusers

    from dmd.conditioning import unflatten_condition
    from dmd.data.prompts import PromptDataModule
    from dmd.files import load_arrays
    from dmd.t2i.text import PromptEncoder, cache_embeddings

    path = pipelines["sdxl"].path
    data = PromptDataModule(str(TINY_DATA), path, batch_size=4, cache_dir=str(tmp_path))
    data.trainer = types.SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    data.prepare_data()
    rank1 = PromptDataModule(str(TINY_DATA), path, batch_size=4, cache_dir=str(tmp_path))
    rank1.trainer = data.trainer  # inside the same Trainer (run dir): prepare_data ran elsewhere

    def no_models(*args, **kwargs):
        raise AssertionError("setup loaded a model")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_models)
    monkeypatch.setattr(PromptEncoder, "from_pretrained", no_models)
    rank1.setup()
    monkeypatch.undo()
    cond = rank1.train_set.cond
    hidden = cond["encoder_hidden_states"]
    # The tensor's memory is the cache file mapped into this process (Linux: /proc/self/maps).
    maps = [line.split() for line in open("/proc/self/maps")]
    assert any(len(m) > 5 and m[5].endswith("encoder_hidden_states.bin")
               and int(m[0].split("-")[0], 16) <= hidden.data_ptr() < int(m[0].split("-")[1], 16) for m in maps)
    prompts, _ = read_prompts(TINY_DATA)
    expected = PromptEncoder.from_pretrained(path, image_size=32)(prompts)
    torch.testing.assert_close(hidden, expected["encoder_hidden_states"])
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], expected["added_cond_kwargs"]["text_embeds"])
    # Written a few prompts at a time (a large file never is in memory whole): the same rows.
    chunked = unflatten_condition(load_arrays(cache_embeddings(PromptEncoder.from_pretrained(path, image_size=32),
                                                               prompts, tmp_path / "chunked", chunk=5)))
    torch.testing.assert_close(chunked["encoder_hidden_states"], hidden, rtol=0, atol=0)
    real, batch_cond = next(iter(rank1.train_dataloader()))
    assert real.shape == (4, 4, 16, 16) and real.abs().sum() > 0  # the paired images' latents
    assert batch_cond["added_cond_kwargs"]["time_ids"].shape == (4, 6)


def _image(i: int):
    """Real image i: noise seeded by i (constant images would lose their value in the VAE's norms)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("source,kind", [("jsonl", "sdxl"), ("folder", "sd15"), ("shards", "sd15"),
                                         ("latents", "sdxl")])
def test_batches_pair_each_prompt_with_its_own_real_image(tmp_path, pipelines, source, kind):
    """Every row of a shuffled training batch holds prompt j's embedding (as the encoder answers
    it) next to the real image / latent that belongs to prompt j, for each source of real images:
    a misalignment would make the GAN loss see real images under other captions."""
    import tarfile

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from dmd.conditioning import flatten_condition
    from dmd.data.prompts import PromptDataModule, to_tensors
    from dmd.t2i.text import PromptEncoder

    path = pipelines[kind].path
    # Short prompts: the bundled ones differ only past the tiny tokenizer's 16 tokens.
    prompts = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle", "star")]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts))
    n = {"folder": 6, "latents": 5}.get(source, len(prompts))  # fewer real images than prompts: cycled
    kwargs = dict(batch_size=4, seed=1, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "img").mkdir()
    if source == "jsonl":  # row j's file names are not in row order: sorting them would misalign
        rows = [{"prompt": p, "image": f"img/{(5 * j + 3) % n:02d}.png"} for j, p in enumerate(prompts)]
        for j, row in enumerate(rows):
            _image(j).save(tmp_path / row["image"])
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        data = PromptDataModule(str(tmp_path / "p.jsonl"), path, **kwargs)
    elif source == "folder":  # image k (sorted by name) goes with prompts k, k + n, ...
        for k in range(n):
            _image(k).save(tmp_path / "img" / f"{k:02d}.png")
        data = PromptDataModule(str(txt), path, images=str(tmp_path / "img"), **kwargs)
    elif source == "shards":  # two shards, read in order
        for s in range(2):
            with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
                for k in range(s * n // 2, (s + 1) * n // 2):
                    _image(k).save(tmp_path / "x.png")
                    tar.add(tmp_path / "x.png", arcname=f"{k:06d}.png")
        data = PromptDataModule(str(txt), path, shards=str(tmp_path / "shard-{0..1}.tar"), **kwargs)
    else:  # pre-encoded latent k is filled with k
        filled = torch.arange(n, dtype=torch.float)[:, None, None, None].expand(n, 4, 16, 16)
        save_file({"latents": filled.clone()}, tmp_path / "latents.safetensors")
        data = PromptDataModule(str(txt), path, latents=str(tmp_path / "latents.safetensors"), **kwargs)
    data.setup()

    # References computed here, one prompt / image at a time (no batch to misorder).
    encoder = PromptEncoder.from_pretrained(path, image_size=32)
    each = [flatten_condition(encoder([p])) for p in prompts]
    expected = {key: torch.cat([c[key] for c in each]) for key in each[0]}
    torch.testing.assert_close(flatten_condition(encoder(prompts, batch_size=5)), expected)  # chunks in order
    hidden = expected["encoder_hidden_states"].flatten(1)
    assert torch.cdist(hidden, hidden).add(torch.eye(len(prompts)) * 1e9).min() > 1e-2  # distinguishable
    if source == "latents":
        reference = filled
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
        with torch.no_grad():
            means = [vae.encode(to_tensors([_image(k)], 32)).latent_dist.mean for k in range(n)]
        reference = torch.cat(means) * vae.config.scaling_factor

    seen = []
    for real, cond in data.train_dataloader():
        cond = flatten_condition(cond)
        for b in range(real.shape[0]):  # which prompt's condition, which image's latent
            j = int(torch.cdist(cond["encoder_hidden_states"][b].flatten()[None], hidden).argmin())
            k = int(torch.cdist(real[b].flatten()[None], reference.flatten(1)).argmin())
            for key, rows in expected.items():  # every part of the condition is prompt j's
                torch.testing.assert_close(cond[key][b], rows[j], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(real[b], reference[k], atol=1e-3, rtol=1e-3)
            assert k == j % n, f"prompt {j} was paired with the real image of prompt {k}"
            seen.append(j)
    assert sorted(seen) == list(range(len(prompts))) and seen != sorted(seen)  # one shuffled epoch
