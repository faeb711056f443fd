"""Kernels for the StableLM ops: each module holds the Triton kernel(s), their launcher and the pure-PyTorch
reference they are tested against, and exports IMPLEMENTATIONS = {op_name: {impl_name: fn}} for stablelm.ops."""
