"""Compression: the L0 gates and their sparsity constraint, the distillation terms, the
objective that sums them, slicing gated units out of the weights, and measuring the result."""
