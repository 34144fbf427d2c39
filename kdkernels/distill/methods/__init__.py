"""Distillation methods, one module per category; each registers its builders with
:func:`kdkernels.distill.registry.register`."""
