"""Colour transforms (pure float64 maths, shared by the encoder and the decoder's weight folding)."""

from __future__ import annotations

import numpy as np

from .bitstream import COLOUR_YCBCR

# Full-range BT.601 (JPEG) YCbCr on values in [0, 1]: decorrelates RGB so that the network spends
# its few parameters on luma, where the eye and PSNR look, instead of three near-copies of it.
_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168735892, -0.331264108, 0.5], [0.5, -0.418687589, -0.081312411]],
    dtype=np.float64,
)
_YCBCR_OFFSET = np.array([0.0, 0.5, 0.5])


def forward_matrix(colour: int):
    if colour != COLOUR_YCBCR:
        raise ValueError(f"unknown colour transform {colour}")
    return _YCBCR, _YCBCR_OFFSET


def inverse_matrix(colour: int):
    """(M, o) such that rgb = M @ ycc + o, as torch float64 tensors."""
    import torch

    m, off = forward_matrix(colour)
    inv = np.linalg.inv(m)
    return torch.from_numpy(inv), torch.from_numpy(-inv @ off)


def to_network_space(pixels01: np.ndarray, colour: int) -> np.ndarray:
    """(H, W, C) values in [0, 1] -> the network's targets in [-1, 1]."""
    x = pixels01.astype(np.float64, copy=True)
    if colour:
        m, off = forward_matrix(colour)
        x[..., :3] = x[..., :3] @ m.T + off
    return x * 2 - 1
