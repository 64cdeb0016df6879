"""Fused Triton kernels for the MoE layer, each module one autograd op with its torch reference.

- ``moe.kernels.gating.topk_gating``: softmax + top-k + renormalisation + aux/z-loss statistics;
- ``moe.kernels.permute.permute``: token rows into expert-sorted order (dropless or capacity-padded);
- ``moe.kernels.unpermute.unpermute``: expert rows back to tokens, combined with the gates.

Each runs Triton on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before triton was first imported; elsewhere the torch reference. ``impl=`` forces either.
The functions are not re-exported here: the submodules share their names.
"""
