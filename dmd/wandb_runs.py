"""The runs of one wandb group, pulled through wandb's public API (online runs only), as the run
records ``dmd.compare`` aggregates: ``dmd-compare --wandb <entity>/<project> --group <name>``.

Reads what the training run logged: ``config["overrides"]`` (the command-line values; see
``runs.build_trainer``), the ``eval/*`` scalars of its summary (the last evaluation) and the
history rows that carry ``eval/generator_step`` (one per evaluation). Offline runs are not on the
server until ``wandb sync``; for them compare the run dirs' results.json instead.
"""

from __future__ import annotations

EVAL = "eval/"


def _eval_metrics(row) -> dict:
    """``eval/<metric>`` scalars of a summary or history row, without the prefix; the teacher's
    yardstick (``eval/teacher/...``) and the counters are left out."""
    skip = {"generator_step", "iteration"}
    return {k[len(EVAL):]: v for k, v in row.items()
            if k.startswith(EVAL) and "/" not in k[len(EVAL):] and k[len(EVAL):] not in skip
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_record(run) -> dict:
    """One ``wandb.apis.public.Run`` as a compare record (same keys as ``compare.load_run``)."""
    overrides = list(run.config.get("overrides") or [])
    params = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    evaluations = [{"generator_step": int(row[EVAL + "generator_step"]), "metrics": _eval_metrics(row)}
                   for row in run.scan_history() if row.get(EVAL + "generator_step") is not None]
    status = {"finished": "completed"}.get(run.state, run.state)  # failed, crashed, running
    return {"dir": f"wandb:{run.path and '/'.join(run.path)}", "params": params, "status": status,
            "seed": params.get("seed"), "metrics": _eval_metrics(dict(run.summary)),
            "evaluations": evaluations, "error": None if status == "completed" else f"wandb state {run.state}"}


def group_runs(project: str, group: str, api=None) -> list[dict]:
    """Records of every run of ``group`` in ``project`` (``<entity>/<project>``)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = [run_record(r) for r in api.runs(project, filters={"group": group})]
    if not runs:
        raise LookupError(f"No wandb runs in group {group!r} of {project!r}: check the names "
                          "(the group is the experiment name unless logger.group was set) and "
                          "that offline runs were synced (`wandb sync <run dir>/wandb`).")
    return runs
