"""DDP on the CPU: two gloo processes train the 2-D preset's two-step generator together."""

import json

import torch
from conftest import ROOT


def test_two_processes_end_with_the_same_generator_and_backward_simulation_steps(cli, tmp_path):
    run = tmp_path / "run"
    cli("dmd.train", "experiment=gmm_dmd2", "trainer=ddp_cpu", "max_iterations=10",
        "algorithm.generator_timesteps=[999,500]", "data.num_samples=256", "data.batch_size=32",
        "eval.num_samples=200", "logger=none", "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_iterations=5", f"hydra.run.dir={run}")
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
    proc = cli("dmd.train", "experiment=gmm_dmd2", "max_iterations=12", "logger=none",
               "data.num_samples=256", "algorithm.generator_timesteps=[999,500]", f"hydra.run.dir={run}",
               check=False)
    assert proc.returncode != 0 and "written by 2 process(es), this run has 1" in proc.stderr


def test_multi_gpu_and_multi_node_trainer_presets_compose(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        multi = compose("train", overrides=["trainer=multi_gpu"]).trainer
        nodes = compose("train", overrides=["trainer=multi_node"]).trainer
    from datetime import timedelta

    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy

    strategy = instantiate(multi.strategy)  # constructing it needs no GPU or process group
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"]
    assert strategy._timeout == timedelta(hours=2) and multi.precision == "bf16-mixed"
    assert (nodes.num_nodes, nodes.devices, nodes.accelerator) == (4, 8, "gpu")
