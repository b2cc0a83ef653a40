"""Distillation methods besides DMD/DMD2 (:mod:`dmd.module`), each its own LightningModule on
:class:`dmd.student.StudentModule`, chosen by ``algorithm.method``."""
