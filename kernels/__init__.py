"""Shared sparse kernels for dynamic networks (torch custom ops under ``torch.ops.dynnet``).

Each op has plain-PyTorch reference semantics, a fake implementation, a registered MAC formula, a CPU
path that really skips work and a Triton path on CUDA; ``kernels._backend`` picks between them.
Importing registers the ops; it never imports Triton or queries a device.
"""

from kernels.routed import routed_linear, routed_linear_macs  # noqa: E402,F401
from kernels.sliced import sliced_conv2d, sliced_conv2d_macs, sliced_linear, sliced_linear_macs  # noqa: E402,F401
from kernels.tokens import (  # noqa: E402,F401
    gather_tokens,
    pack_tokens,
    packed_attention,
    packed_attention_macs,
    scatter_tokens,
    unpack_tokens,
)

# isort: split
from kernels.block_conv import block_conv2d, block_conv2d_macs, reduce_mask  # noqa: E402,F401
from kernels.sparse_conv import conv2d_macs, sparse_conv2d, sparse_conv2d_macs  # noqa: E402,F401
