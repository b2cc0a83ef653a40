"""One check of a command's whole configuration, before anything is built or written.

Each rule names a dotted key, what values it allows and a predicate. :func:`validate` applies
the rules of a command (``RULES[task]``) and the cross-key checks, and raises one
:class:`ConfigError` listing every problem as ``key=value: allowed``, so a user fixes them all
in one go. Keys a config does not have are skipped (presets differ); a key that must be there
and is not is Hydra's business (``???``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from dmd.losses import CONSISTENCY_DISTANCES, TIMESTEP_DISTRIBUTIONS
from dmd.methods import METHODS
from dmd.methods.cd import grid_problems
from dmd.methods.pd import plan_problems

_MISSING = object()


class ConfigError(CompactHydraException, ValueError):
    """Configuration values that cannot be meant (every problem in one message). Hydra prints
    its message alone: a user's mistake needs no stack trace."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def whole(lo: int | None = None, optional: bool = False) -> tuple[Callable, str]:
    text = "a whole number" + (f" >= {lo}" if lo is not None else "") + (" (or null)" if optional else "")
    return (lambda v: (optional and v is None) or (_is_int(v) and (lo is None or v >= lo))), text


def number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False,
           optional: bool = False) -> tuple[Callable, str]:
    def ok(v):
        if optional and v is None:
            return True
        if not _is_number(v):
            return False
        return ((lo is None or (v > lo if lo_open else v >= lo)) and
                (hi is None or (v < hi if hi_open else v <= hi)))
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        text = f"a number in {left}, {right}"
    elif lo is not None:
        text = f"a number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        text = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        text = "a number"
    return ok, text + (" (or null)" if optional else "")


def fraction_range() -> tuple[Callable, str]:
    """``[lo, hi]`` with 0 <= lo < hi <= 1 (a range of timesteps as fractions of T)."""
    def ok(v):
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v))
                and 0 <= v[0] < v[1] <= 1)
    return ok, "[lo, hi] with 0 <= lo < hi <= 1"


def whole_list(lo: int, nonempty: bool = True) -> tuple[Callable, str]:
    def ok(v):
        return (isinstance(v, (list, tuple)) and (len(v) > 0 or not nonempty)
                and all(_is_int(x) and x >= lo for x in v))
    return ok, f"a {'non-empty ' if nonempty else ''}list of whole numbers >= {lo}"


def one_of(*choices) -> tuple[Callable, str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def pair_in(lo: float, hi: float) -> tuple[Callable, str]:
    return (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) and lo <= x < hi for x in v),
            f"two numbers in [{lo:g}, {hi:g})")


def _samplers() -> tuple[Callable, str]:
    from dmd.sampling import SAMPLERS

    return one_of(*SAMPLERS)


def _sampler_rules(prefix: str = "sampler") -> list:
    return [(f"{prefix}.name", _samplers()), (f"{prefix}.steps", whole(1)),
            (f"{prefix}.guidance_scale", number(0)), (f"{prefix}.spacing", one_of("karras", "linspace", "trailing"))]


COMPILE_BACKENDS = ("inductor", "aot_eager", "cudagraphs", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SEED = [("seed", whole())]
DATA = [("data.batch_size", whole(1)), ("data.num_workers", whole(0))]
TRAINER = [("trainer.max_steps", whole(-1)), ("trainer.devices", (
    lambda v: v == "auto" or (_is_int(v) and v >= 1) or isinstance(v, (list, tuple)),
    "a whole number >= 1, a list of device ids, or auto"))]
DRAW = [("batch_size", whole(1)),  # the commands that draw samples in batches
        ("timesteps", (lambda v: v is None or (whole_list(0)[0](v) and all(a > b for a, b in zip(v, v[1:]))),
                       "null or a decreasing list of whole numbers >= 0"))]

EVAL = [("eval.num_samples", whole(2)), ("eval.every_n_generator_steps", whole(1)),
        ("eval.grid_size", whole(1)), ("eval.seed", whole())]

TRAIN = [
    ("data.num_samples", whole(1)),
    ("max_iterations", whole(1)), ("generator_steps", whole(1, optional=True)),
    ("max_network_passes", whole(1, optional=True)), ("finite_check_every", whole(1, optional=True)),
    ("algorithm.ttur_ratio", whole(1)), ("algorithm.guidance_scale", number(0)),
    ("algorithm.generator_timesteps", whole_list(0)), ("algorithm.dm_weight", number(0)),
    ("algorithm.dm_t_range", fraction_range()),
    ("algorithm.method", one_of(*METHODS)), ("algorithm.sid.alpha", number(0, optional=True)),
    ("algorithm.cd.num_ode_steps", whole(1)), ("algorithm.cd.target_decay", number(0, 1, hi_open=True)),
    ("algorithm.cd.distance", one_of(*CONSISTENCY_DISTANCES)), ("algorithm.cd.huber_c", number(0, lo_open=True)),
    ("algorithm.pd.start_steps", whole(2)),
    ("algorithm.timestep_distribution", one_of(*TIMESTEP_DISTRIBUTIONS)),
    ("algorithm.ema_decay", number(0, 1, hi_open=True, optional=True)),
    ("algorithm.backward_simulation", one_of(True, False)),
    ("algorithm.gan.generator_weight", number(0)), ("algorithm.gan.discriminator_weight", number(0)),
    ("algorithm.gan.t_range", fraction_range()), ("algorithm.gan.balance", one_of("fixed", "dimension", "adaptive")),
    ("algorithm.gan.reference_dim", whole(1)), ("algorithm.gan.grad_ratio", number(0, lo_open=True)),
    ("algorithm.regression.weight", number(0)), ("algorithm.regression.num_pairs", whole(1)),
    ("algorithm.regression.batch_size", whole(1)), ("algorithm.regression.steps", whole(1)),
    ("algorithm.regression.guidance_scale", number(0)), ("algorithm.regression.seed", whole()),
    ("algorithm.regression.distance", one_of("l2", "lpips", "perceptual", "features")),
    ("algorithm.regression.sampler", _samplers()),
    ("algorithm.lora.generator_rank", whole(0)), ("algorithm.lora.fake_score_rank", whole(0)),
    ("optim.lr_generator", number(0, lo_open=True)), ("optim.lr_fake", number(0, lo_open=True)),
    ("optim.betas", pair_in(0, 1)), ("optim.weight_decay", number(0)), ("optim.warmup_steps", whole(0)),
    ("optim.grad_clip", number(0, lo_open=True, optional=True)), ("optim.fused", one_of(False, True)),
    ("compile.enabled", one_of(False, True)), ("compile.backend", one_of(*COMPILE_BACKENDS)),
    ("compile.mode", one_of(None, *COMPILE_MODES)),
    ("callbacks.checkpoint.every_n_iterations", whole(1)),
    *EVAL,
]

TEACHER_TRAINING = [("lr", number(0, lo_open=True)), ("weight_decay", number(0)), ("warmup_steps", whole(0)),
                    ("ema_decay", number(0, 1, hi_open=True)), ("grad_clip", number(0, lo_open=True, optional=True)),
                    ("label_dropout", number(0, 1, hi_open=True)), ("checkpoint_every_n_steps", whole(1)),
                    ("grid.num_samples", whole(1)), ("grid.steps", whole(1)), ("grid.guidance_scale", number(0))]

RULES = {
    "train": SEED + DATA + TRAINER + TRAIN,
    "sample": SEED + DRAW + _sampler_rules() + [("num_samples", whole(1)), ("grid_size", whole(0)),
                                           ("out", (lambda v: isinstance(v, str) and v.endswith(".npz"),
                                                    "a file name ending in .npz"))],
    "evaluate": SEED + DRAW + _sampler_rules() + EVAL[:1] + EVAL[2:] + [
        ("latency.batch_sizes", whole_list(1, nonempty=False)), ("latency.repeats", whole(1)),
        ("latency.warmup", whole(0))],
    "pretrain": SEED + DATA + TRAINER + TEACHER_TRAINING,
    "train_classifier": SEED + DATA + TRAINER + [("lr", number(0, lo_open=True)), ("weight_decay", number(0)),
                                  ("feature_dim", whole(1)), ("channels", whole_list(1))],
}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def problems(cfg: DictConfig, rules) -> list[str]:
    """``key=value: must be ...`` for every rule the config breaks."""
    found = []
    for key, (ok, allowed) in rules:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        value = _plain(value)
        if not ok(value):
            found.append(f"{key}={value!r}: must be {allowed}")
    return found


def _training_length(cfg: DictConfig):
    """max_iterations as dmd.train will set it (generator_steps * TTUR ratio when given)."""
    steps, ratio = cfg.get("generator_steps"), OmegaConf.select(cfg, "algorithm.ttur_ratio")
    return steps * ratio if _is_int(steps) and _is_int(ratio) else cfg.get("max_iterations")


def cross_problems(cfg: DictConfig, task: str) -> list[str]:
    """Values fine alone but not together."""
    found = []
    a = cfg.get("algorithm") if task == "train" else None
    method = a.get("method", "dmd") if a is not None else None
    if method == "kd" and len(a.get("generator_timesteps") or []) != 1:
        found.append(f"algorithm.generator_timesteps={list(a.generator_timesteps)}: knowledge distillation "
                     "trains a one-step student (give one timestep, e.g. [999])")
    timesteps = _plain(a.get("generator_timesteps")) if a is not None else None
    planned = isinstance(timesteps, list) and timesteps and all(_is_int(t) for t in timesteps)
    if method == "cd" and planned and _is_int(OmegaConf.select(a, "cd.num_ode_steps")):
        found += grid_problems(timesteps, a.cd.num_ode_steps)
    if method == "pd" and planned and _is_int(OmegaConf.select(a, "pd.start_steps")):
        budget = cfg.get("max_network_passes")  # then the rounds' iterations come from the budget
        found += plan_problems(timesteps, a.pd.start_steps, None if budget else _training_length(cfg))
    if method in ("dmd", "sid"):
        weights = {"algorithm.dm_weight": a.get("dm_weight"), "algorithm.gan.generator_weight":
                   OmegaConf.select(a, "gan.generator_weight"), "algorithm.regression.weight":
                   OmegaConf.select(a, "regression.weight")}
        if all(_is_number(w) and w == 0 for w in weights.values()):
            found.append(f"{', '.join(weights)} are all 0: the generator would never move "
                         "(set at least one > 0)")
    if task in ("sample", "evaluate") and cfg.get("timesteps") is not None and not cfg.get("ckpt"):
        found.append(f"timesteps={_plain(cfg.timesteps)}: re-times a distilled generator (give ckpt=<run dir>); "
                     "the teacher's steps are sampler.steps")
    n, batch = OmegaConf.select(cfg, "data.num_samples"), OmegaConf.select(cfg, "data.batch_size")
    if task in ("train", "pretrain", "train_classifier") and _is_int(n) and _is_int(batch) and 0 < n < batch:
        found.append(f"data.num_samples={n} is smaller than data.batch_size={batch}: not one full "
                     "batch to train on")
    return found


def validate(cfg: DictConfig, task: str) -> None:
    """Raise one :class:`ConfigError` naming every problem of ``cfg`` for command ``task``."""
    found = problems(cfg, RULES[task]) + cross_problems(cfg, task)
    if found:
        raise ConfigError(f"Bad config ({len(found)} problem{'s' * (len(found) > 1)}); nothing was "
                          "written:\n  " + "\n  ".join(found))
