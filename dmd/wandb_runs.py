"""The runs of one wandb group, pulled through wandb's public API (online runs only), as the run
records ``dmd.compare`` aggregates: ``dmd-compare --wandb <entity>/<project> --group <name>``.

Reads what the training run logged: ``config["overrides"]`` (the command-line values; see
``runs.build_trainer``), the ``eval/*`` scalars of its summary (the last evaluation) and the
history rows that carry ``eval/generator_step`` (one per evaluation). Offline runs are not on the
server until ``wandb sync``; for them compare the run dirs' results.json instead.
"""

from __future__ import annotations

from dmd.compare import is_number, run_record

EVAL = "eval/"


def _eval_metrics(row) -> dict:
    """``eval/<metric>`` scalars of a summary or history row, without the prefix; the teacher's
    yardstick (``eval/teacher/...``) and the counters are left out."""
    skip = {"generator_step", "iteration"}
    return {k[len(EVAL):]: v for k, v in row.items()
            if k.startswith(EVAL) and "/" not in k[len(EVAL):] and k[len(EVAL):] not in skip
            and is_number(v)}


def record_of(run) -> dict:
    """One ``wandb.apis.public.Run`` as a compare record (:func:`dmd.compare.run_record`)."""
    evaluations = [{"generator_step": int(row[EVAL + "generator_step"]), "metrics": _eval_metrics(row)}
                   for row in run.scan_history() if row.get(EVAL + "generator_step") is not None]
    status = {"finished": "completed"}.get(run.state, run.state)  # failed, crashed, running
    return run_record(f"wandb:{run.path and '/'.join(run.path)}", run.config.get("overrides"), status,
                      _eval_metrics(dict(run.summary)), evaluations,
                      None if status == "completed" else f"wandb state {run.state}")


def group_runs(project: str, group: str, api=None) -> list[dict]:
    """Records of every run of ``group`` in ``project`` (``<entity>/<project>``)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = [record_of(r) for r in api.runs(project, filters={"group": group})]
    if not runs:
        raise LookupError(f"No wandb runs in group {group!r} of {project!r}: check the names "
                          "(the group is the experiment name unless logger.group was set) and "
                          "that offline runs were synced (`wandb sync <run dir>/wandb`).")
    return runs
