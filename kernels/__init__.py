"""Shared sparse kernels for dynamic networks (torch custom ops under ``torch.ops.dynnet``).

Each op has plain-PyTorch reference semantics, a fake implementation, a registered MAC formula, a CPU
path that really skips work and a Triton path on CUDA; ``kernels._backend`` picks between them.
Importing registers the ops; it never imports Triton or queries a device.
"""
