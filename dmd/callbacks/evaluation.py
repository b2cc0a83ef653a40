"""Evaluation against the teacher during training.

Every ``every_n_generator_steps`` generator updates and once when training ends, the released
generator (EMA weights if EMA is on) draws ``num_samples`` samples (seeded noise, balanced
labels, the same at every evaluation) and the evaluator scores them. Each evaluation

- logs ``eval/<metric>`` (and, once, ``eval/<reference>/<metric>`` for as many of the teacher's
  reference samples, e.g. ``eval/teacher/class_consistency``) to every Lightning logger, at the trainer's global step, with
  ``eval/generator_step`` and ``eval/iteration`` beside them;
- writes ``samples/step_<generator step>.png``, a grid of the first ``grid_size`` samples
  (also sent to loggers that take images and tables, e.g. wandb: the grid and a metrics table);
- appends {iteration, generator_step, metrics} to ``evaluations`` in the run's
  ``results.json`` (the teacher's metrics go to ``teacher_metrics``).
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path

import pytorch_lightning as pl

from dmd.draw import sample_generator
from dmd.files import read_results, update_results, write_results
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)


class EvaluationCallback(pl.Callback):
    def __init__(self, evaluator, every_n_generator_steps: int = 100, num_samples: int = 1000,
                 grid_size: int = 100, seed: int = 0, batch_size: int = 500):
        if every_n_generator_steps < 1:
            raise ValueError(f"eval.every_n_generator_steps must be >= 1, got {every_n_generator_steps}.")
        if num_samples < 2:
            raise ValueError(f"eval.num_samples must be >= 2 (FID needs a covariance), got {num_samples}.")
        self.evaluator, self.every = evaluator, every_n_generator_steps
        self.num_samples, self.grid_size, self.seed = num_samples, grid_size, seed
        self.batch_size = batch_size
        self.last_step: int | None = None
        self.latest: dict = {}
        self.teacher_logged = False

    def results_path(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / "results.json"

    def on_fit_start(self, trainer, pl_module):
        if getattr(self.evaluator, "teacher", None) is None:
            self.evaluator.teacher = pl_module.teacher
        self.evaluator.check_sample_shape(pl_module.teacher.image_shape)  # fail now, not at step N
        if trainer.global_rank == 0:  # e.g. 10k teacher samples: once, while the others wait
            self.evaluator.prepare()
        trainer.strategy.barrier()

    def on_train_start(self, trainer, pl_module):
        # Counters are restored by now: a fresh run starts an empty record, a resumed one keeps
        # the evaluations up to where it resumes (a rerun from an earlier checkpoint redoes the rest).
        path = self.results_path(trainer)
        if trainer.global_rank == 0 and path.is_file():
            kept = [e for e in read_results(path).get("evaluations", [])
                    if e["generator_step"] <= pl_module.generator_steps]
            update_results(path, evaluations=kept)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.generator_steps
        if step > 0 and step % self.every == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if pl_module.generator_steps != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> dict:
        step, iteration = pl_module.generator_steps, pl_module.iteration
        generator = pl_module.release_generator()  # under FSDP a collective: every rank calls it
        self.last_step = step  # on every rank: all of them must take part in the same evaluations
        if trainer.global_rank != 0:
            return {}
        samples, labels = sample_generator(generator, pl_module.teacher, self.num_samples,
                                           seed=self.seed, batch_size=self.batch_size,
                                           device=pl_module.device, progress=False)
        teacher = pl_module.teacher
        images, labels = teacher.as_images(samples, labels)
        metrics = self.evaluator(images, labels, teacher.prompt_list(self.num_samples))
        out_dir = Path(trainer.default_root_dir)
        grid = save_sample_grid(images[: self.grid_size], out_dir / "samples" / f"step_{step:06d}.png")
        path = self.results_path(trainer)
        results = read_results(path)
        # A resumed run re-evaluates nothing it already has; a rerun of a step replaces it.
        evaluations = [e for e in results.get("evaluations", []) if e["generator_step"] != step]
        evaluations.append({"iteration": iteration, "generator_step": step, "metrics": metrics})
        entries = {"evaluations": evaluations}
        logged = {f"eval/{k}": float(v) for k, v in metrics.items()
                  if _scalar(v) and k != "num_samples"}
        if not self.teacher_logged:
            teacher = self.evaluator.teacher_metrics(self.num_samples)
            entries["teacher_metrics"] = teacher
            logged.update({f"eval/{k}": float(v) for k, v in teacher.items() if _scalar(v)})
            self.teacher_logged = True
        write_results(path, {**results, **entries})
        logged.update({"eval/generator_step": step, "eval/iteration": iteration})
        table = [[k, float(v)] for k, v in metrics.items() if _scalar(v)]
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
            if hasattr(logger, "log_image"):  # e.g. WandbLogger: the grid and a metrics table
                logger.log_image("eval/samples", [str(grid)], step=trainer.global_step)
            if hasattr(logger, "log_table"):
                logger.log_table(f"eval/metrics_step_{step}", columns=["metric", "value"],
                                 data=table, step=trainer.global_step)
        self.latest = metrics
        log.info("Evaluation at generator step %d: %s", step,
                 {k: round(v, 4) for k, v in metrics.items() if _scalar(v)})
        return metrics


def _scalar(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)
