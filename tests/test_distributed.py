"""Data parallel training on the CPU: two gloo processes train together, with DDP (replicas)
and with FSDP (shards), and end with the same generator."""

import json
import shutil

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

# The 2-D DMD2 preset (GAN head, EMA, TTUR 5) with a two-step generator (backward simulation).
GMM = ("experiment=gmm_dmd2", "algorithm.generator_timesteps=[999,500]", "data.num_samples=256",
       "data.batch_size=32", "eval.num_samples=200", "logger=none", "trainer.enable_progress_bar=false",
       "callbacks.checkpoint.every_n_iterations=5")


def released_weights(run) -> dict:
    return {f.name + "/" + k: v for f in sorted((run / "generator").rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    run_cli("dmd.train", *GMM, "trainer=ddp_cpu", "max_iterations=10", f"hydra.run.dir={run}")
    return run


@pytest.mark.slow
def test_two_processes_end_with_the_same_generator_and_backward_simulation_steps(cli, ddp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    results = json.loads((run / "results.json").read_text())
    ranks = results["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and results["iterations"] == 10
    # Gradients are synchronised (each rank drew its own noise, so unsynchronised weights would
    # differ), and backward simulation trained the same step at every iteration on both ranks.
    assert ranks[0]["rng_state_sha256"] != ranks[1]["rng_state_sha256"]
    assert ranks[0]["generator_sha256"] == ranks[1]["generator_sha256"]
    assert ranks[0]["backward_simulation_sha256"] == ranks[1]["backward_simulation_sha256"]
    # The checkpoint keeps every rank's random stream; resuming on another world size is refused.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ckpt["dmd_rng_states"]) == 2
    proc = cli("dmd.train", *GMM, "max_iterations=12", f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0 and "written by 2 process(es), this run has 1" in proc.stderr


@pytest.mark.slow
def test_fully_sharded_training_matches_ddp_and_resumes_from_its_shards(cli, ddp_run, tmp_path):
    run = tmp_path / "fsdp"
    cli("dmd.train", *GMM, "trainer=fsdp_cpu", "max_iterations=10", f"hydra.run.dir={run}")
    # Sharding changes where the weights live, not the arithmetic: each rank drew the same noise
    # and data as its DDP counterpart, and the gradients are averaged over both ranks in each case.
    fsdp, ddp = released_weights(run), released_weights(ddp_run)
    assert fsdp.keys() == ddp.keys() and len(fsdp) > 4
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6, msg=k)
    # The checkpoint is one shard per rank (+ metadata), and a rerun continues from it exactly
    # as DDP's continues from its file (EMA, optimizer states, counters and RNG restored).
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2 and (ckpt / "meta.pt").is_file()
    ddp_copy = tmp_path / "ddp"
    shutil.copytree(ddp_run, ddp_copy)
    for strategy, folder in (("fsdp_cpu", run), ("ddp_cpu", ddp_copy)):
        proc = cli("dmd.train", *GMM, f"trainer={strategy}", "max_iterations=15", f"hydra.run.dir={folder}")
        assert f"Resuming from {folder / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert not list((run / "checkpoints").glob("last.ckpt.*"))  # the sharded save's temporary folders
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["iterations"] == 15 and resumed["generator_steps"] == 3
    fsdp, ddp = released_weights(run), released_weights(ddp_copy)
    assert any(not torch.equal(fsdp[k], v) for k, v in released_weights(ddp_run).items())
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_fully_sharded_text_to_image_lora_matches_ddp(cli, tmp_path):
    """FSDP units inside a LoRA-adapted, gradient-checkpointed SDXL-like UNet (frozen base
    weights and trained adapters share units), released as a diffusers LoRA file."""
    args = ("experiment=t2i_tiny", "teacher.kind=sdxl", "algorithm.lora.generator_rank=4",
            "gradient_checkpointing=true", "max_iterations=6", "optim.warmup_steps=0",
            f"paths.cache_dir={tmp_path}/cache", "logger=none", "trainer.enable_progress_bar=false")
    for strategy in ("ddp_cpu", "fsdp_cpu"):
        cli("dmd.train", *args, f"trainer={strategy}", f"hydra.run.dir={tmp_path}/{strategy}")
    fsdp, ddp = (load_file(tmp_path / s / "generator" / "pytorch_lora_weights.safetensors")
                 for s in ("fsdp_cpu", "ddp_cpu"))
    trained = [k for k in ddp if "lora_B" in k or "lora.up" in k]  # zero at the start: all is update
    assert fsdp.keys() == ddp.keys() and trained

    def norm(tensors):
        return float(torch.stack([t.norm() for t in tensors]).norm())

    # The two reduce in different orders, and AdamW turns rounding-level differences of
    # near-zero gradients into different steps: compare the whole update, not single elements
    # (measured ~1e-4; unsynchronised or missing updates give ~1).
    update = norm([ddp[k] for k in trained])
    assert update > 0
    assert norm([fsdp[k] - ddp[k] for k in trained]) < 1e-2 * update


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gmm_cd", "gmm_pd"])
def test_consistency_and_progressive_distillation_shard_like_they_replicate(cli, tmp_path, preset):
    """CD's target network and PD's previous-round student are trained state beside the generator:
    under FSDP they are sharded with it (EMA steps and round copies on shards) and the released
    generator (PD: every round's too) matches two DDP replicas'."""
    args = (f"experiment={preset}", "algorithm.generator_timesteps=[999,499]", "algorithm.pd.start_steps=8"
            if preset == "gmm_pd" else "algorithm.cd.num_ode_steps=8", *GMM[2:], "max_iterations=6")
    for strategy in ("ddp_cpu", "fsdp_cpu"):
        cli("dmd.train", *args, f"trainer={strategy}", f"hydra.run.dir={tmp_path / strategy}")
    fsdp, ddp = released_weights(tmp_path / "fsdp_cpu"), released_weights(tmp_path / "ddp_cpu")
    assert fsdp.keys() == ddp.keys() and len(fsdp) > 4
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6, msg=k)
    if preset == "gmm_pd":
        for name in ("4step", "2step"):
            a, b = (load_file(tmp_path / s / "rounds" / name / "unet" / "diffusion_pytorch_model.safetensors")
                    for s in ("fsdp_cpu", "ddp_cpu"))
            assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_multi_gpu_and_multi_node_trainer_presets_compose(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        multi = compose("train", overrides=["trainer=multi_gpu"]).trainer
        nodes = compose("train", overrides=["trainer=multi_node"]).trainer
        fsdp = compose("train", overrides=["trainer=fsdp"]).trainer
    from datetime import timedelta

    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy

    strategy = instantiate(multi.strategy)  # constructing it needs no GPU or process group
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"]
    from dmd.sharding import FullyShardedStrategy

    sharded = instantiate(fsdp.strategy)
    assert isinstance(sharded, FullyShardedStrategy) and sharded._save_distributed_checkpoint
    assert (fsdp.accelerator, fsdp.devices, fsdp.precision) == ("gpu", -1, "bf16-mixed")
    assert strategy._timeout == timedelta(hours=2) and multi.precision == "bf16-mixed"
    assert (nodes.num_nodes, nodes.devices, nodes.accelerator) == (4, 8, "gpu")


def test_ckpt_path_last_falls_back_to_the_previous_sharded_save(tmp_path):
    from dmd.runs import resolve_ckpt_path

    assert resolve_ckpt_path("last", tmp_path) is None  # nothing saved yet: a fresh start
    ckpts = tmp_path / "checkpoints"
    (ckpts / "last.ckpt.old").mkdir(parents=True)  # stopped between moving it aside and the swap
    (ckpts / "last.ckpt.old" / "meta.pt").write_bytes(b"")  # Lightning writes it last: a whole save
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt.old")
    (ckpts / "last.ckpt").mkdir()  # a shard folder without meta.pt: its save never finished
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt.old")
    (ckpts / "last.ckpt" / "meta.pt").write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt")
