"""torch.library ops, one module per family: fake kernels, autograd registration and backend dispatch.

:data:`FAMILIES` is the one list of op families and of the ops each registers (``torch.ops.kdkernels.<op>_forward``,
its ``_backward`` where the backward is an op of its own, and the Triton twins ``triton_<op>_...``). A family is a
folder ``csrc/<family>/`` and a module in ``kdkernels/ops/``, ``kdkernels/triton/`` and ``kdkernels/reference/``.
"""
FAMILIES = {
    "softmax_kl": ("softmax_kl", "softmax_jsd"),
    "target_split": ("target_split",),
    "logsoftmax_gather": ("logsoftmax_gather",),
    "dist": ("dist",),
    "pairwise": ("pairwise",),
    "contrastive": ("crd_nce",),
}

# After FAMILIES, which backends reads: it decides what each backend can run, importing the Triton twins, whose ops
# the family modules below register.
from kdkernels import backends  # noqa: E402,F401
from kdkernels.ops import contrastive, dist, logsoftmax_gather, pairwise, softmax_kl, target_split  # noqa: E402,F401
