"""Compute kernels, each beside its plain-torch reference (kernels/reference.py is the ground truth).

reference.py  the GRPO loss and log-softmax references (the ground truth)
chunked.py    log-probs from hidden states in row chunks, recomputed in the backward: the
              [N, V] logits never exist; pure torch, runs everywhere (`grpo.kernels: chunked`)
triton_logps.py  the same log-probs (and entropy) fused in Triton: vocabulary tiles with an online
              logsumexp, never a [rows, V] tensor in the forward (`grpo.kernels: triton`)
triton_loss.py  kernels/reference.py's grpo_loss fused in Triton, value and gradient in one pass
triton_support.py  whether the Triton kernels can run on a device
Every fused path is tested against its reference (tests/test_kernels.py, tests/test_triton_kernels.py;
Triton under TRITON_INTERPRET=1 on the CPU).
"""
