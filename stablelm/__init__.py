"""stablelm: a from-scratch PyTorch + Triton StableLM decoder."""
