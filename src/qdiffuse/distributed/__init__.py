"""Runs spread over the ranks of a ``torchrun`` launch (NCCL on GPUs, gloo on CPUs)."""
