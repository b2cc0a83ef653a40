"""Distillation methods besides DMD/DMD2 (:mod:`dmd.module`), each its own LightningModule on
:class:`dmd.student.StudentModule`, chosen by ``algorithm.method``:

- ``kd`` (:mod:`dmd.methods.kd`): knowledge distillation on cached teacher ODE pairs;
- ``sid`` (:mod:`dmd.methods.sid`): Score identity Distillation, DMD2's loop with SiD's loss;
- ``cd`` (:mod:`dmd.methods.cd`): consistency distillation against an EMA target network;
- ``pd`` (:mod:`dmd.methods.pd`): progressive distillation in step-halving rounds.
"""

from dmd.methods.cd import CDModule
from dmd.methods.kd import KDModule
from dmd.methods.pd import PDModule
from dmd.methods.sid import SiDModule
from dmd.module import DMDModule

#: ``algorithm.method`` -> its LightningModule (each says how it is built: StudentModule.from_config)
METHODS = {"dmd": DMDModule, "kd": KDModule, "sid": SiDModule, "cd": CDModule, "pd": PDModule}


def method_module(name: str):
    """The LightningModule class of ``algorithm.method=name``."""
    if name not in METHODS:
        raise ValueError(f"algorithm.method={name!r} is not a method; choose one of {sorted(METHODS)}.")
    return METHODS[name]
