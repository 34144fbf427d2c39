"""torch.library ops, one module per family: fake kernels, autograd registration and backend dispatch."""
from kdkernels.ops import contrastive, dist, logsoftmax_gather, pairwise, softmax_kl, target_split  # noqa: F401
