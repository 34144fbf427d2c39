"""Pure-PyTorch reference implementations (float64-capable): the executable specification of every op."""
