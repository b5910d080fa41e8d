"""Triton kernels for decoding NIF images; each is tested against its torch reference in pillow_nif.model."""
