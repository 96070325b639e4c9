"""Compute kernels, each beside its plain-torch reference (kernels/reference.py is the ground truth).

reference.py  the GRPO loss and log-softmax references (the ground truth)
chunked.py    log-probs from hidden states in row chunks, recomputed in the backward: the
              [N, V] logits never exist; pure torch, runs everywhere (`grpo.kernels: chunked`)
The fused Triton kernels come with issue #7; every fused path is tested against its reference
(under TRITON_INTERPRET=1 on CPU for Triton).
"""
