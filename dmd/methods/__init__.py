"""Distillation methods besides DMD/DMD2 (:mod:`dmd.module`), each its own LightningModule on
:class:`dmd.student.StudentModule`, chosen by ``algorithm.method``:

- ``kd`` (:mod:`dmd.methods.kd`): knowledge distillation on cached teacher ODE pairs;
- ``sid`` (:mod:`dmd.methods.sid`): Score identity Distillation, DMD2's loop with SiD's loss;
- ``cd`` (:mod:`dmd.methods.cd`): consistency distillation against an EMA target network;
- ``pd`` (:mod:`dmd.methods.pd`): progressive distillation in step-halving rounds.
"""
