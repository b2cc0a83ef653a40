"""The iteration benchmark (experiments/iteration_benchmark.py): what it sums, what it counts."""

import importlib.util
import sys

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("iteration_benchmark",
                                                  ROOT / "experiments" / "iteration_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_sum_of_passes_is_dmd2s_iteration(bench):
    """A generator iteration: generator forward + backward, real score (CFG), fake score, the
    GAN loss through the discriminator to the sample, then the fake-score step (denoising pass +
    discriminator on real and generated samples); a fake-score iteration: a generator forward and
    the fake-score step."""
    costs = {"generator forward": 1, "generator forward+backward": 10, "real score forward (CFG)": 100,
             "fake score forward": 1000, "fake score forward+backward": 10_000,
             "discriminator forward+backward": 100_000, "discriminator forward+backward to the sample": 1_000_000}

    class Module:
        gan_generator_weight, gan_discriminator_weight = 1e-3, 1e-2

    assert bench.expected_passes(Module, costs) == {"generator": 1_211_110, "fake": 210_001}
    Module.gan_generator_weight = Module.gan_discriminator_weight = 0.0
    assert bench.expected_passes(Module, costs) == {"generator": 11_110, "fake": 10_001}


def test_a_preset_is_timed_and_its_host_reads_counted(bench):
    common = dict(iterations=10, warmup=2, probe=5, repeats=2)
    queued = bench.benchmark("gmm_dmd2", ["data.batch_size=64", "finite_check_every=1000"], **common)
    assert queued["timed_iterations"] == {"generator": 2, "fake": 8} and queued["ttur_ratio"] == 5
    assert queued["batch_size"] == 64 and queued["precision"] == "32-true"
    assert set(queued["passes_alone_s"]) >= {"generator forward+backward", "discriminator forward+backward",
                                             "AdamW step (generator)"}
    cycle = queued["iteration_s"]["mean_over_ttur_cycle"]
    assert cycle > 0 and queued["ratio_iteration_to_passes"]["mean_over_ttur_cycle"] == pytest.approx(
        cycle / queued["sum_of_passes_s"]["mean_over_ttur_cycle"])
    # Losses checked every 1000 iterations: dmd's code reads no tensor value on the host in
    # these iterations (on a GPU each read would be a sync); checked at every update (the CPU
    # default), one read per update: the fake score's at every iteration, the generator's at
    # every 5th. Lightning reads the CPU's progress-bar loss once per iteration (not on GPUs),
    # and the logged values on a logging step (at most one in these 5 iterations).
    assert queued["value_reads_in_dmd_per_iteration"] == 0
    assert 1 <= queued["value_reads_in_lightning_per_iteration"] <= 1.2
    every = bench.benchmark("gmm_dmd2", ["data.batch_size=64"], **common)
    assert every["value_reads_in_dmd_per_iteration"] == pytest.approx(1.2)
    md = bench.markdown([queued], "cmd")
    assert "| gmm_dmd2 data.batch_size=64 finite_check_every=1000 |" in md and "Command: `cmd`" in md


def test_sd15_rows_build_dmd2_on_a_text_unet_with_lora_and_checkpointing(bench):
    row = bench.sd15_benchmark(2, lora_rank=4, checkpointing=True, iterations=5, warmup=1, probe=0, repeats=1,
                               scale="tiny")
    assert row["preset"] == "SD1.5-size UNet (tiny), LoRA 4, gradient checkpointing"
    assert row["timed_iterations"] == {"generator": 1, "fake": 4} and row["peak_memory_mb"] > 0


def test_compiled_networks_train_like_eager_ones(bench):
    """compile.enabled (aot_eager here: the graph capture without code generation, which the CPU
    suite can afford; inductor is checked on GPUs by iteration_benchmark_gpu.sh) gives the same
    losses for 20 iterations, the same pass counts and the same weight names (checkpoints)."""
    check = bench.compile_check("t2i_tiny", iterations=20, backend="aot_eager")
    assert len(check["compiled"]["losses"]) == 20 and all(check["compiled"]["losses"])
    assert check["max_relative_loss_difference"] < 1e-5 and check["same_weight_names"]
    assert check["compiled"]["network_passes"] == check["eager"]["network_passes"] > 0


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(cli, tmp_path):
    import torch
    from safetensors.torch import load_file

    tiny = ["experiment=t2i_tiny", "compile.enabled=true", "compile.backend=aot_eager", "logger=none",
            "callbacks.checkpoint.every_n_iterations=3", f"paths.cache_dir={tmp_path}/cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli("dmd.train", *tiny, "max_iterations=8", f"hydra.run.dir={straight}")
    cli("dmd.train", *tiny, "max_iterations=8", "trainer.max_steps=4", f"hydra.run.dir={resumed}")
    proc = cli("dmd.train", *tiny, "max_iterations=8", f"hydra.run.dir={resumed}")
    assert "Resuming from" in proc.stdout + proc.stderr

    def weights(run):
        return load_file(run / "generator" / "unet" / "diffusion_pytorch_model.safetensors")

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
