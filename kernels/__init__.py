"""Triton kernels: nif_decode (the fused decoder; reference pillow_nif.model), nif_train (the training forward and
backward; reference pillow_nif.subgrid) and sine_layer (one modulated sine layer; its own reference())."""
