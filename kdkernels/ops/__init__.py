"""torch.library ops, one module per family: fake kernels, autograd registration and backend dispatch."""
from kdkernels.ops import softmax_kl  # noqa: F401
