"""Compute kernels, each beside its plain-torch reference (kernels/reference.py is the ground truth).

The GRPO loss reference lands with the training stage (issue #4), the fused Triton kernels with
issue #7. Every fused path is tested against its reference under TRITON_INTERPRET=1 on CPU.
"""
