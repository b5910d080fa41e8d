"""Encoding: fit a NIF network to an image, quantise, entropy code, and honour the bit budget.

The recipe follows NIF: training in stages, each warming its rate up, holding it, then a cosine decay, with a
partial weight restart (perturbation) between stages (and on large images a last, gentle stage without one), a
log-cosh loss (NIF's small SSIM term is optional), then quantisation-aware tuning. AdamW trains every parameter,
except that Muon (optim.py) trains the hidden and output matrices of modulated networks while they are fitted. The
architecture follows from the budget (and, for small budgets, from the effort's stage length); per-tensor
quantisation steps are allocated by measured distortion per bit, and one global factor on them lands the *whole
file* just under ``bpp * width * height`` bits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import time
from typing import Callable

import numpy as np

from . import bitstream, entropy
from .bitstream import METADATA, Architecture, Header, NifFile, TensorCoding
from .imaging import fill_hidden, prepare_image, split_constant_alpha, storage_mode
from .render import on_device, resolve_device

DEFAULT_BPP = 0.5


ALLOC_PIXELS = 1 << 15  # the step allocation's pixels a measurement at efforts 3-9 (Effort.alloc_pixels)


@dataclasses.dataclass(frozen=True)
class Effort:
    """What one effort level spends. Iterations are optimiser steps on batches of `batch` pixels."""

    stages: int  # fitting stages, with a weight restart between consecutive ones
    iters: int  # optimiser steps per stage
    qat_stages: int
    qat_iters: int
    batch: int  # pixels per step, on every device (a strided subgrid when the image is larger)
    # Pixels of each of the step allocation's measurements (allocate_steps: every tensor at up to 31 steps, each a
    # pass of the network from that tensor's layer on). At 768x512, effort 1, 1.0 bpp, the 32k of efforts 3-9 took
    # a quarter of the encode; 16k (efforts 1-2) gave the same files' PSNR to -0.005 dB (8 images; 8k: -0.03)
    # (NOTES.md #199). Measuring the output's change (alloc_change), 8k gave effort 1's files within 0.002 dB of 16k's
    # on the mean (16 encodes) in half the allocation's time (NOTES.md #204).
    alloc_pixels: int = ALLOC_PIXELS
    # Pixels, at least, of the fit's whole-image MSEs (Fitter.mse: the stages', the tuning's, rounding_loss's), on a
    # strided grid (mse_stride); 0: every pixel. Each is a pass of the network over the image: at 768x512 five of
    # them took 2.1 s of effort 1's 16 s. Every 2nd row and column there made the same files at efforts 1, 3 and 4
    # (28 encodes) in 0.89-0.96x the time (NOTES.md #202); efforts 5-9 (1-2 % of their time) keep every pixel.
    mse_pixels: int = 0
    # The allocation measures a rounding by the output's change (_OneTensorCost), not the MSE's: effort 1's files
    # +0.012 / +0.008 dB at 0.3 / 1.0 bpp (8 images each, 13 of 16 up or even) and 8k pixels enough; effort 2's -0.008 /
    # -0.005 (4 images: 6 of 8 up, two -0.04), effort 5's +0.004 / -0.002 (8 256x256 crops), so they keep the MSE's
    # and their files (NOTES.md #204).
    alloc_change: bool = False
    # The MSE's change with its first-order part, noise of either sign on a subgrid, swapped for the whole image's
    # (a control variate, _OneTensorCost's `slope`), where the subgrid is at most 1/9 of the image (CONTROL_STRIDE):
    # it predicted each rounding's cost over the image best on all 5 allocations measured; effort 5's files at
    # 768x512 +0.017 dB at 0.3 bpp (6 of 8 up), even at 1.0 (4), same time (NOTES.md #205). On 256x256 (a quarter
    # of the pixels measured) there was little noise to take: crops even, so they keep their files.
    alloc_control: bool = False
    # What the level spends instead where a step of `batch` pixels would sample less than FitConfig.decay_fraction of
    # the image (effort_for): full-size photos and tiles, where the recipe turns sparse (sparseness). None: the same.
    large: Effort | None = None


# Measured on a 256x256 Kodak crop (CPU): strided batches of 4k pixels and lr 3e-3 reach a given PSNR
# with the least compute; 16k-pixel batches gain ~0.7 dB for 4x the time, so only high efforts use them.
# Few long stages beat many short ones at equal steps (benchmarks/NOTES.md #16: 2 x 900 steps were
# +0.14 dB over 4 x 450 on 4 crops at 0.6/1.0 bpp; each stage re-warms the learning rate).
# Effort 5, the default, is at or over the CPU target (a 256x256 image in a minute on 2 cores): the README's 0.5 bpp
# encode took 62-69 s on an idle 2-core AMD EPYC before the step's rework (NOTES.md #105-#106: 0.72x, then 0.91x of
# the step time), and 82-124 s on a slower VM after it; in fresh-clone CI runs 67.7-72.8 s (session 46) and 32.5 s
# (session 47: these VMs differ ~2x). A shorter second stage lost 0.08-0.10 dB (#107). Each raise paid, at 0.3 /
# 0.6 / 1.0 bpp on 8 crops: 2 x 1250 over 2 x 900 +0.20 dB (NOTES.md #33), 2 x 2000 +0.13 / +0.29 / +0.28 (#62),
# 2 x 3000 +0.19 / +0.10 / +0.28 (#69), 2 x 4000 +0.17 / +0.15 / +0.22 (#97; +0.11 / +0.14 / +0.22 on all 24
# crops). More steps of 4k pixels beat fewer of 8k (#62), so from effort 5 up every stage has 4000 steps and the
# levels add pixels per step and stages.
# Effort 4 is the middle of the ladder, where effort 5 had taken 5x its time: 2 x 1500 steps (the long stages'
# recipe, FitConfig.matrix_decay_iters, with the short stages' fast period offset, period_lr_iters) beat 2 x 600 by
# +0.81 / +0.98 / +1.19 dB on 8 crops at 0.3 / 0.6 / 1.0 bpp in 1.5-1.65x the time (24 of 24 up), and at 768x512 by
# +0.98 dB at 0.3 bpp (8 images, 0.38 of effort 5's time for 0.47 dB less), +1.48 / +2.61 at 0.5 / 1.0 (4 images)
# in 2.2 / 3.0x the time (NOTES.md #192-#193).
# Effort 3 then took a quarter of effort 4's time for 1.5 dB less. 2 x 800 steps with the long stages' recipe beat
# 2 x 400 with the short one by +0.70 / +0.93 / +1.10 dB on all 24 crops at 0.3 / 0.6 / 1.0 bpp (72 of 72 up) in
# 1.6-1.7x the time, and by +0.99 dB at 768x512, 0.3 bpp (8 of 8 up) in 2.0x, half of effort 4's (NOTES.md #194).
# Effort 2 had one stage of 500 steps; 2 x 400 (a restart to fall back from, as effort 3 had before) beat it by
# +0.18 / +0.37 / +0.52 dB on all 24 crops at 0.3 / 0.6 / 1.0 bpp (70 of 72 up) in 1.35-1.40x the time, by +0.53 dB
# at 768x512, 0.3 bpp (8 of 8 up) in 1.19x, and on the mean of 4 seeds at each of 18 centres of 128-256 pixels
# (+0.10 ... +1.01 dB; the worst seed higher on 17; kodim20's 128x128 at 2.0 bpp: 32.9-37.9 dB, now 37.2-37.9, two
# seeds by the refit, FitConfig.refit_loss).
# 2 x 300 gained a fifth as much at 768x512, 2 x 250 lost (NOTES.md #195).
# Effort 1's one stage of 300 steps became 400: +0.49 dB at 768x512, 0.3 bpp (8 of 8 up) in 1.07x the time, +0.36 /
# +0.41 / +0.49 on the 24 crops (71 of 72 up) in 1.75 / 1.17 / 1.16x (at 0.3 bpp its networks now modulate,
# SHORT_STAGE), and on the mean of 4 seeds at each of 10 centres of 128-192 pixels (+0.46 ... +1.31 dB); 2 x 200
# gained less for more time (NOTES.md #196).
# Efforts 8 and 9 were set on 256x256 crops, where their 16k pixels a step are a quarter of the image. On 768x512
# photos at 0.3 bpp they fitted 0.14 dB worse than effort 7 on the mean of 4 images (3 down; kodim23 +0.08 / +0.14)
# in 1.4-2.5x its time (NOTES.md #237), and no longer recipe tried beat effort 7 there: 3 x 6000 steps of 8k -0.07 dB
# (2 images), 4 x 4000 of 8k -0.06 (3 images, all down), both with the levels' 150-step tuning stages, which alone
# cost effort 7 0.10 dB; with effort 7's tuning, 4 x 4000 came out even (+0.01, 2 images; 3 x 60 tuning: +0.03;
# NOTES.md #239, and at effort 5 the tuning's length was even on 8 images, #240). So where their step would sample
# less than 1/16 of the pixels (effort_for: over 262 144 pixels, tiles of the default size) they fit as effort 7
# does. Only 0.3 bpp was measured at full size.
_EFFORT_7 = Effort(3, 4000, 3, 100, 1 << 13, alloc_control=True)
EFFORTS = {
    1: Effort(1, 400, 1, 40, 1 << 12, 1 << 13, 1 << 16, alloc_change=True),
    2: Effort(2, 400, 1, 60, 1 << 12, 1 << 14, 1 << 16),
    3: Effort(2, 800, 1, 80, 1 << 12, mse_pixels=1 << 16),
    4: Effort(2, 1500, 2, 80, 1 << 12, mse_pixels=1 << 16),
    5: Effort(2, 4000, 2, 80, 1 << 12, alloc_control=True),
    6: Effort(2, 4000, 2, 100, 1 << 13, alloc_control=True),
    7: _EFFORT_7,
    8: Effort(3, 4000, 3, 150, 1 << 14, alloc_control=True, large=_EFFORT_7),
    9: Effort(4, 4000, 4, 150, 1 << 14, alloc_control=True, large=_EFFORT_7),
}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Defaults of the training recipe, in one place."""

    lr: float = 3e-3  # 1e-3 is 0.4 dB worse after 2400 steps, 1e-2 diverges (256x256 Kodak crop)
    lr_floor: float = 0.05  # cosine decays to lr * lr_floor within a stage
    warmup: float = 0.1  # fraction of a stage spent warming the learning rate up
    # A fitting stage holds its peak rate until this fraction of its steps, then decays (warm-up, stable, decay).
    # Holding to 0.5 beat a decay that starts at the end of the warm-up by +0.05 / +0.08 / +0.04 dB at 0.3 / 0.6 /
    # 1.0 bpp on 8 crops (0.7: the same; benchmarks/NOTES.md #78). Quantisation-aware tuning keeps the plain decay.
    lr_hold: float = 0.5
    # Plain networks (no modulation: budgets below DEEP_PARAMS) train more gently. At lr 3e-3 some images'
    # fits land in a poor optimum that also quantises badly (kodim20 at 0.3 bpp: 28.2 dB fitted, 26.3 dB
    # coded; 29.6 / 29.2 dB with this schedule): 2e-3 with 30 % warm-up was +0.76 dB on 8 crops at 0.3 bpp,
    # while the same change on the modulated networks of 0.6/1.0 bpp was -0.02 dB (benchmarks/NOTES.md #53).
    plain_lr: float = 2e-3
    plain_warmup: float = 0.3
    # Where a step samples less than `decay_fraction` of the image, a fitting stage warms its rate up over at least
    # this many steps, or half the stage if shorter. Effort 3's 400-step stages warmed up in 40, and the large
    # networks of full-size images left the basin at the peak: at 768x512 (1/64 of the image a step), 1.0 bpp,
    # kodim02 came out at 20.6 dB and kodim19 at 14.6; over 200 steps, 31.8 and 28.4 dB. On 256x256 crops (1/16 a
    # step) the same 200 steps cost 0.06-0.15 dB at effort 3, so they keep the short warm-up (NOTES.md #129).
    # Stages of 4000 steps (effort 5 up) warm up over 400 steps either way.
    min_warmup_steps: int = 400
    weight_decay: float = 1e-4
    # Gradient-norm clipping. Without it a large network could leave the basin for good while the learning
    # rate warms up: kodim02 (768x512, 0.6 bpp, 57k parameters, effort 7) stalled at 25 dB (network units)
    # with gradient norms of 1-2 where they are 0.01-0.1; clipped at 0.1 it reached 37 dB (NOTES.md #36).
    grad_clip: float = 0.1
    # NIF adds 0.01 SSIM to log-cosh; measured, it costs 0.6-0.7 dB of PSNR (benchmarks/NOTES.md).
    ssim_weight: float = 0.0
    # A least-squares post-filter on the decoded image where the budget affords one (format version 6, NOTES.md
    # #138). False: the network alone (the file is then version 4 or 5).
    post_filter: bool = True
    # Quantisation-aware tuning nudges weights across rounding boundaries; larger rates make the straight-through
    # weights wander and the best quantised state is often the untuned one. 1e-5 beat 1e-4 by +0.16 dB at 0.3 bpp
    # and +0.06 at 0.6/1.0 (4 crops each, same fits; 3e-6 lost at 0.6/1.0: benchmarks/NOTES.md #37).
    qat_lr: float = 1e-5
    # Weight restart between stages: perturb a fraction `amount` of weights (not the first layer)
    # by uniform noise of +-range * mean|w|; amount grows and range shrinks over the fit (NIF).
    restart_amount: tuple[float, float] = (0.125, 0.5)
    restart_range: tuple[float, float] = (0.5, 0.1)
    # Peak learning rate of the stages after a restart, relative to `lr`: the restart perturbs a few weights,
    # and re-warming all of them to the first stage's rate undid more than it found. 0.5 and 0.25 beat 1.0 by
    # +0.06 and +0.09 dB, each on all 8 points of 4 crops at 0.6/1.0 bpp (benchmarks/NOTES.md #46).
    restart_lr: float = 0.25
    # What the architecture choice assumes a parameter will cost: 5.5 beat 6 by 0.07 dB and 5 by 0.05 dB
    # with measured step allocation (4 crops at 0.6/1.0 bpp; without it 6 was best).
    bits_per_param: float = 5.5
    # Large images do better with more parameters at fewer bits each. At 768x512 and effort 5, 4.75 bits against
    # 5.5 (benchmarks/NOTES.md #146, #148): +0.12 dB in the file at 0.3 bpp (21k parameters at 5.5 bits; +0.13
    # without the post-filter: the gain is the fit's), +0.23 at 0.45, +0.28 at 0.6 (2 images each), +0.29 at 1.0 (4
    # images); at 1.0 bpp 4.0 bits lost 0.26 dB to 4.75 and 6.5 bits 0.56 to 5.5. At 4.75 the wider network fits
    # 0.46-0.71 dB better in the same steps and loses 0.3-0.4 dB of that to its coarser rounding. On 256x256
    # crops 5.0 lost 0.05-0.08 dB at 0.3 / 0.6 / 1.0 bpp (#137g): the best cost follows the image's size, not the
    # network's (a crop's 1.0 bpp network has 12k parameters, 768x512's 0.3 bpp one 21k). Between the pixel counts
    # of `large_image` it falls from bits_per_param to large_bits_per_param, linearly in log2 of the pixels: at
    # 512x512 and 0.6 bpp (~5.0 bits) +0.25 dB over 5.5 and 0.04 below 4.75 (#148e). All on the CPU. Measured again
    # with the later recipe (#241, #243): 4.25 bits -0.17 dB at 0.3 bpp (4 images); 5.25 -0.03 at 0.3 bpp (4), -0.04
    # at 1.0 bpp (4).
    large_bits_per_param: float = 4.75
    large_image: tuple[int, int] = (256 * 256, 768 * 512)
    # Rounding a network too large for its bits: where the coded network is more than `refit_loss` dB below the fit
    # (network space, before the post-filter), the encoder fits again a network chosen at `refit_bits` more bits a
    # parameter and keeps the better file. The bits a parameter can bear depend on the image: on 12 centre crops
    # of 96x64 at 2.0 bpp (effort 5) 5.5 bits lost 0.6-5.6 dB to rounding, 7 bits 0.02-0.2; the smaller network was
    # +1.7 / +2.5 / +4.3 dB better on the three crops that lost 2.3 / 3.7 / 5.6 dB, and 0.4-1.8 dB worse on the
    # nine that lost 0.6-2.2 (benchmarks/NOTES.md #170). inf: never.
    refit_loss: float = 2.0
    refit_bits: float = 1.5
    # The network is fitted to its target scaled by up to 2^output_gain_octaves (a power of two, folded exactly into
    # the output layer's steps; OutputGain): data of a narrow range, such as 10- or 12-bit values in I;16, is then
    # the full-range problem the fit was tuned on. 0: never.
    output_gain_octaves: int = 12
    # Images of more pixels are stored as a grid of tiles (format version 9, tiles.py), each tile of at most this
    # many. One network's fitting work grows as the square of the pixels at a given bpp (its parameters and its
    # step's share of 1/64 of the image both grow with them): by the steps' arithmetic, 1920x1080 at 0.5 bpp and
    # effort 5 is 28x a 768x512 encode, 4032x3024 965x; as 2x2 and 7x3 tiles, 5.7x and 48x (NOTES.md #189).
    # 768 x 768 keeps every image the recipe was tuned on (Kodak's 768x512) in one network. 0: never tile.
    tile_pixels: int = 768 * 768
    # Each tile's network also covers this many pixels beyond each edge it shares with another tile, and the decoder
    # blends the two across those 2 x tile_margin pixels: tiles fitted apart otherwise meet at a visible step.
    tile_margin: int = 8
    # The tiles' bits follow their content (tiles.tile_rates): a tile's bpp is proportional to the error of a JPEG
    # of it at quality 30 raised to this power, within `tile_rate_range` of the mean. 0: one bpp for all tiles.
    tile_rate_exponent: float = 0.75
    tile_rate_range: tuple[float, float] = (0.5, 2.0)
    pe_scale: float = 1.4
    omega: float = 45.0  # sine factor of genesis and modulation layers: 45 beat 30 by 0.2-0.4 dB, 60 lost
    mod_sigma: float = 10.0
    # The period's offset (the modulation's last bias b: period = omega + mod_sigma (W h + b)) learns at period_lr x
    # the stage's rate. A smooth image wants a far shorter period than omega (kodim20's 160x160 centre: ~11). At the
    # common rate b moves ~0.3 of a period in 100 steps, so short stages lowered the period through W h instead,
    # unevenly: at some seeds it spread over 23-63 across the pixels, the genesis features turned to noise, and the
    # file came out near a flat image (17.2 / 20.4 dB at 2.0 bpp, effort 2, where other seeds gave 36-37). Stages
    # under period_lr_iters steps only: effort 5's lost 0.13 dB with it (NOTES.md #188). Effort 4's 1500-step stages
    # with the long stages' recipe but without it fitted smooth small images erratically (kodim02's centre, 160x160 at
    # 2.0 bpp: 37.1-39.1 dB over 4 seeds); with it 39.2-39.5 and +0.6 dB on the mean of 6 such points (#193).
    period_lr: float = 10.0
    period_lr_iters: int = 4000
    # The fitting stages of modulated networks train the genesis hidden and output matrices with Muon (optim.py), the
    # rest with AdamW: +0.15 / +0.10 dB at 0.6 / 1.0 bpp on 8 crops (benchmarks/NOTES.md #84); where the input
    # layer's decay applies (long stages), the input layer too (#112). False: AdamW for all.
    muon: bool = True
    # Networks with an alpha channel (LA, RGBA) train the output matrix with AdamW (at the biases' decay), the other
    # genesis matrices with Muon: Muon's orthogonalised update gives each of the output's few singular directions a
    # step of the same size, and the alpha's row is steered unlike the colours'. On 5 cut-outs (256x256, 59-68 %
    # transparent, 0.5 and 1.0 bpp) the premultiplied PSNR moved, RGBA: +0.66 / +0.18 / +0.01 / +0.13 dB at efforts
    # 1 / 2 / 3 / 5 (9, 7, 7, 7 of 10 up); LA: +1.09 / +0.14 / +0.31 at efforts 1 / 3 / 5 (10 of 10, 6 of 10, 4 of 5,
    # 0.5 bpp only at 5). The gain is the low rates': at 768x512 +0.29 / +0.13 dB at 0.3 bpp (efforts 1 / 3, 6 of 6),
    # -0.14 / -0.02 at 1.0 (1 of 6); 256x256 at 2.0 bpp -0.08 (2 of 5): even from 1 bpp on, where it is kept for one
    # rule. RGB crops, as a check: +0.03 / -0.02 at efforts 1 / 3, so they keep Muon (NOTES.md #211).
    alpha_output_adamw: bool = True
    # Decoupled weight decay of the Muon matrices (p <- p (1 - lr decay) a step). Muon's updates have a fixed size
    # whatever the gradient, so without decay the weights keep growing, and a larger weight turns the same relative
    # rounding error into a larger phase error of the sine. On 8 crops at 0.6 / 1.0 bpp, 1.0 fitted 0.12 / 0.07 dB
    # worse but cut the quantisation cost by 0.19 / 0.27 dB: +0.07 / +0.20 dB in the files (0.1: +0.03 / +0.11;
    # 0.3: +0.07 / +0.13; 3.0 starves the fit: -0.44 / +0.00; benchmarks/NOTES.md #85).
    muon_decay: float = 1.0
    # Decoupled decays of the genesis input layer (AdamW; Muon in modulated networks' long stages) and of the
    # modulation network's weights (AdamW). On 8 crops, against 1e-4 (input layer on AdamW): the input layer alone
    # at 1.0, +0.09 dB at 0.3 bpp and +0.19 / +0.09 at 0.6 / 1.0 (0.1: +0.12 / +0.07; 3.0: +0.06 / -0.20); with the
    # modulation at 1.0 too, +0.42 / +0.26, at 3.0 +0.46 / +0.26, fitting better as well (benchmarks/NOTES.md #87).
    # The period and the genesis weights share one scale; decayed, the fit keeps a larger period (29 instead of 16
    # on one crop) and smaller genesis weights. On Muon (#112) the input layer's 1.0 beat 3.0 by 0.11 dB (#115).
    input_decay: float = 1.0
    modulation_decay: float = 3.0
    # In modulated networks these two need long stages: at effort 3 (2 x 400 steps) they cost 0.29 / 0.91 dB at
    # 0.6 / 1.0 bpp on the 8 crops (0.3 bpp, plain: +0.12). Shorter stages keep `weight_decay` there. Stages of 1500
    # steps (effort 4) take the long stages' recipe (these decays, Muon on the input layer, the polish and longer
    # tuning of sparse steps): with the period's offset at the common rate, +0.39 / +0.47 / +0.25 dB over the short
    # stages' recipe at 0.3 / 0.6 / 1.0 bpp on 8 crops (23 of 24 up) in 0.82 of the time, and +0.33 on 8 Kodak images
    # at 768x512 in 1.2x (NOTES.md #193). With the period's offset at its fast rate (#188) the recipe gains in
    # shorter stages too (2 x 400: +0.18 / +0.37 / +0.35 dB on those crops, +0.29 at 768x512), but below 800 steps it
    # fits smooth small images erratically (kodim20's 160x160 centre at 2.0 bpp, 4 seeds: 2 x 400 36.8-38.9 dB,
    # 1 x 500 33.2-37.7, the short recipe 37.4-38.5; 2 x 800 39.6-39.9), so it starts at effort 3's 800 (#194).
    matrix_decay_iters: int = 800
    # Both were measured where a step samples 1/16 of the image (256x256, 4k pixels). A step that samples less
    # carries less of the image's gradient against the same pull to zero, so the decays scale down in proportion:
    # at full Kodak size (768x512, 1/64 a step at effort 5) the full decays cost 0.15 / 0.56 dB at 0.6 / 1.0 bpp
    # (2 images; 0.26 / 1.02 dB at effort 7 on 4 others); a quarter of them gained 0.10 / 0.02 (NOTES.md #92).
    decay_fraction: float = 1 / 16
    # Where a step samples a quarter of that (768x512 on the CPU, 1/64 of the image a step), modulated networks fit
    # at lr x sparse_lr with every decay / sparse_lr, so that a step shrinks the weights by the same lr x decay:
    # 2e-3 with the decays x 1.5 beat 3e-3 by +0.06 dB on 18 of 22 points of 8 images at 0.3 / 0.6 / 1.0 bpp
    # (NOTES.md #152, #152b, #153b; 0.6 bpp +0.02 ... +0.40 on 6 of 6), where 2e-3 alone, decays kept, was -0.01 dB
    # over 10 points: it fitted better but lost 0.09-0.13 dB more to rounding (#151); 0.5 instead of 2/3 was +0.02
    # on 6 points (#154). Crops (a step samples decay_fraction) and short stages keep lr.
    sparse_lr: float = 2 / 3
    # Sparse steps (`sparseness` 1: 768x512) leave the large networks short of converged. A stage of polish x a
    # stage's steps after the last one, without a restart, from the best weights at lr x polish_lr, fitted +0.33 ...
    # +0.47 dB better at 1.0 bpp (network space; +0.23 / +0.28 at 0.5, +0.14 at 0.3), of which rounding took
    # 0.1-0.2 back (lr x 0.2 fitted less: +0.03 ... +0.07 dB in the file). The tuning, sparse_qat_iters times as long
    # at qat_lr x sparse_qat_lr, rounded 0.02-0.09 dB better (twice the steps at qat_lr: less; on crops neutral,
    # #67). Together +0.24 ... +0.29 dB at 1.0 bpp on 4 images, +0.10 / +0.16 at 0.5, +0.06 at 0.3 (NOTES.md #172).
    # The larger the network for its pixels, the longer the polish: a whole stage's steps (4000 at effort 5) instead
    # of half gave +0.07 / +0.13 dB more at 1.0 bpp (kodim05, 08: 0.21 parameters a pixel; fit +0.27 / +0.25, half
    # of it lost to rounding), but +0.01 / +0.02 at 0.5 bpp (0.10) and -0.00 / +0.04 at 0.3 (0.06), for 19 % more
    # steps; lr x 0.05 gained the same, stronger decays in the polish lost 0.2 dB (NOTES.md #173). A stage and a half
    # (6000) gave +0.06 ... +0.12 dB more again at 1.0 bpp (kodim05, 08, 21, 23: mean +0.09; fit +0.15 ... +0.19) for
    # 16 % more steps (#175); end to end on 18 Kodak images +0.064 (17 up, #178). So polish[0] stages up to
    # polish_params[0] parameters a pixel (0.5 bpp's networks at 768x512 keep #172's half stage), polish[1] from
    # polish_params[1], linear between; (0, 0) turns it off.
    polish: tuple[float, float] = (0.5, 1.5)
    polish_params: tuple[float, float] = (0.11, 0.2)
    polish_lr: float = 0.1
    # The tuning's schedule measured again at effort 5 on cached fits (benchmarks/cached_fit.py, NOTES.md #240): at
    # 0.3 bpp (8 images) 1, 1.5 or 3x the steps, or 0.5 / 1.0 of the rate, moved the files by -0.02 ... +0.01 dB on
    # the mean (sd 0.02-0.04); at 0.5 bpp (3 images) every one of them lost, by 0.003-0.071 dB.
    sparse_qat_iters: float = 2.0
    sparse_qat_lr: float = 0.7
    # Where a fitting or tuning step samples part of the image, draw its pixels in proportion to their last measured
    # loss ** importance_power, mixed with a uniform share 1 - importance, each pixel's loss weighted back to an
    # unbiased estimate (sampling.py); 0: the strided grid alone.
    importance: float = 0.5
    importance_power: float = 0.5
    # Per-tensor steps by measured distortion (allocate_steps) instead of one factor times each
    # tensor's rms: +0.18 dB on 4 crops at 0.6/1.0 bpp (benchmarks/NOTES.md #17).
    rd_steps: bool = True
    # Fitting steps replayed from CUDA graphs (stepgraph.py): None on CUDA only, True also on the CPU (uncaptured, the
    # same buffers: for tests), False never (the eager loop).
    step_graph: bool | None = None
    # The network's part of a fitting step by the fused Triton kernels (kernels/nif_train.py: two launches instead of
    # ~60), in place of subgrid.py's torch ops: False (the default until a GPU has timed it), True (CUDA, or the CPU
    # under TRITON_INTERPRET=1, for tests), None on CUDA only.
    fused_network: bool | None = False
    # TF32 products on CUDA: operands cut to 10 mantissa bits on the tensor cores, ~8x the fp32 rate on an H100.
    # "all": every product of the fitting and tuning steps (torch's matmuls, the fused kernels' tl.dot); "muon": Muon's
    # Newton-Schulz iterations only (torch.optim.Muon runs them in bfloat16); "off". Emulated on the CPU
    # (benchmarks/tf32_fit.py, the 24 Kodak crops at 1.0 bpp, NOTES.md #183): "all" cost ~0.02 dB at equal bpp
    # (-0.014 +- 0.013 truncated, -0.032 +- 0.015 rounded), "muon" -0.010 +- 0.015. Off until a GPU has timed them; the
    # CPU ignores it.
    tf32: str = "off"

    def __post_init__(self):
        if self.tf32 not in ("off", "muon", "all"):
            raise ValueError(f"tf32 must be 'off', 'muon' or 'all', got {self.tf32!r}")


@dataclasses.dataclass
class EncodeResult:
    data: bytes
    bpp: float
    psnr: float | None  # of the quantised network against the input, at the input's bit depth (None: not measured)
    seconds: float
    fit_psnr: float | None  # of the network before quantisation (what quantisation cost: fit_psnr - psnr)
    arch: Architecture  # a tiled file's: its first tile's
    tiles: tuple[int, int] = (1, 1)  # (columns, rows) of a tiled file (format version 9)


def step_stride(h: int, w: int, effort: Effort) -> int:
    """The stride of a training step's subgrid: about effort.batch pixels, at least 1/64 of a large image (so that
    huge images are still sampled densely). The same on every device: the recipe was tuned on these steps, and the
    GPU's own 256k a step fitted kodim23 0.71 / 0.58 dB worse at 0.3 / 1.0 bpp on an H200 (benchmarks/NOTES.md #163)."""
    return max(1, math.ceil(math.sqrt(h * w / max(effort.batch, h * w // 64))))


def mse_stride(h: int, w: int, effort: Effort) -> int:
    """The row and column stride of a fit's whole-image MSEs: at least effort.mse_pixels pixels (1: all)."""
    return max(1, math.isqrt(h * w // effort.mse_pixels)) if effort.mse_pixels else 1


def tile_grid(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(columns, rows) of the tiles an image is stored as (FitConfig.tile_pixels): (1, 1) up to max_pixels pixels;
    beyond, the fewest tiles of at most max_pixels each that are no more elongated than 2:1 (or than the image),
    the squarest of those. Tiles differ by at most a pixel a side (bitstream.TileGrid)."""
    if not max_pixels or width * height <= max_pixels:
        return 1, 1
    limit = max(2.0, width / height, height / width)
    best = None
    for columns in range(1, min(width, bitstream.MAX_TILES) + 1):
        tw = -(-width // columns)
        for rows in range(1, min(height, bitstream.MAX_TILES // columns) + 1):
            th = -(-height // rows)
            aspect = max(tw / th, th / tw)
            if tw * th <= max_pixels and aspect <= limit:
                if best is None or (columns * rows, aspect) < best[0]:
                    best = (columns * rows, aspect), (columns, rows)
                break  # more rows: more tiles
    if best is None:
        raise ValueError(f"a {width}x{height} image needs more than {bitstream.MAX_TILES} tiles")
    return best[1]


def long_stages(effort: Effort, cfg: FitConfig) -> bool:
    """Whether `effort`'s stages take the long stages' recipe (FitConfig.matrix_decay_iters: efforts 3 up)."""
    return effort.iters >= cfg.matrix_decay_iters


def sparseness(h: int, w: int, arch: Architecture, effort: Effort, cfg: FitConfig) -> float:
    """How much sparser than the recipe's tuning a fitting step samples the image: 0 where a step samples
    cfg.decay_fraction of it or more (256x256 crops at 4k pixels a step), 1 where a quarter of that or less (768x512,
    on every device), linear in the share between (only the ends are measured). Only modulated networks with long
    stages (effort 3 up) were measured at full size; the rest keep the crops' recipe (0)."""
    if not arch.mod_widths or not long_stages(effort, cfg):
        return 0.0
    share = 1 / (step_stride(h, w, effort) ** 2 * cfg.decay_fraction)
    return min(1.0, max(0.0, (1 - share) / 0.75))


def effort_for(level: int, width: int, height: int, cfg: FitConfig) -> Effort:
    """Effort `level` as it fits one network to a width x height image (or tile): the level's `large` recipe where a
    step of its `batch` pixels would sample less than cfg.decay_fraction of the pixels."""
    eff = EFFORTS[level]
    if eff.large is not None and step_stride(height, width, eff) ** 2 * cfg.decay_fraction > 1:
        return eff.large
    return eff


def sparse_schedule(sparse: float, effort: Effort, cfg: FitConfig, arch: Architecture,
                    pixels: int) -> tuple[int, int, float]:
    """(polishing steps, tuning steps a stage, tuning rate) at a step's `sparseness`, for `arch` on an image of
    `pixels` (FitConfig.polish)."""
    lo, hi = cfg.polish_params
    size = min(1.0, max(0.0, (arch.num_params() / pixels - lo) / (hi - lo)))
    small, large = cfg.polish
    polish = round((small + (large - small) * size) * effort.iters * sparse)
    qat_iters = round(effort.qat_iters * (1 + (cfg.sparse_qat_iters - 1) * sparse))
    return polish, qat_iters, cfg.qat_lr * (1 - (1 - cfg.sparse_qat_lr) * sparse)


def fit_work(header: Header, effort: Effort, cfg: FitConfig) -> int:
    """The optimiser steps of one fit of header's network and its tuning (what the progress bar counts)."""
    sparse = sparseness(header.height, header.width, header.arch, effort, cfg)
    polish, qat_iters, _ = sparse_schedule(sparse, effort, cfg, header.arch, header.width * header.height)
    return effort.stages * effort.iters + polish + effort.qat_stages * qat_iters


def check_options(bpp=None, quality=None, effort=5, device="auto", seed=0) -> tuple[float | None, int]:
    """Validate user options before any work; return (target bpp, effort), the bpp None where quality sets it from
    the image (quality_bpp). NumPy's scalars count as numbers."""
    if bpp is not None:
        if isinstance(bpp, bool) or not isinstance(bpp, numbers.Real) or not math.isfinite(bpp) or bpp <= 0:
            raise ValueError(f"bpp must be a positive number, got {bpp!r}")
    if quality is not None:
        if isinstance(quality, bool) or not isinstance(quality, numbers.Real) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {quality!r}")
    if isinstance(effort, bool) or not isinstance(effort, numbers.Integral) or effort not in EFFORTS:
        raise ValueError(f"effort must be an integer from 1 to 9, got {effort!r}")
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}")
    # torch.Generator.manual_seed's range; past it torch raised an overflow deep in the fit
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}")
    target = float(bpp) if bpp is not None else None if quality is not None else DEFAULT_BPP
    return target, int(effort)


def quality_bpp(image, quality: float, metadata: dict, colour: str, cfg: FitConfig) -> float:
    """The bpp `quality` asks of `image` (as it is fitted: hidden colours filled, a constant alpha split off): the
    network's bits that quality.py predicts from a JPEG of it, plus the file's fixed bytes (its header and metadata;
    a large image's tiles' each), so that it never asks for less than a file needs."""
    from . import quality as q

    w, h = image.size
    _check_size(w, h)
    mode = storage_mode(image)  # OSError for modes NIF cannot hold
    metadata = {k: bytes(v) for k, v in metadata.items() if v}
    payload = math.ceil(q.payload_bpp(image, quality) * w * h / 8)
    if tile_grid(w, h, cfg.tile_pixels) == (1, 1):
        # a stream of at least 16 bytes (plan_encode's least), and a byte for the budget's float rounding
        return 8 * (_least_overhead(w, h, mode, colour, metadata, cfg) + max(16, payload) + 1) / (w * h)
    from .tiles import grid_of

    outer, per_tile = bitstream.tiled_overhead(metadata)
    sizes = [(x1 - x0, y1 - y0) for x0, y0, x1, y1 in grid_of(w, h, mode, cfg).extents()]
    heads = {s: _least_overhead(*s, mode, colour, {}, cfg) for s in set(sizes)}  # tiles differ by a pixel at most
    area = sum(a * b for a, b in sizes)
    # tiles.plan_tiles shares the networks' bytes out by the tiles' content, or where a share is too small by their
    # areas: each tile's part of the share holds its header, 16 bytes of stream and a byte of rounding
    share = max(sum(heads[s] for s in sizes) + payload, max((heads[s] + 17) * area / (s[0] * s[1]) for s in sizes))
    return 8 * (outer + len(sizes) * (per_tile + 1) + math.ceil(share) + 1) / (w * h)


def metadata_of(image, icc_profile=None, exif=None, xmp=None, alpha: int | None = None,
                alpha_ends: bool = True) -> dict[str, bytes]:
    """The metadata a file of `image` stores: each option as given, None taking the image's own (`im.info`, as
    Image.save keeps it), b"" none. Bytes-like values, an Image.Exif for exif, text for xmp; else ValueError.
    `alpha`: the one value of an alpha channel not fitted (imaging.split_constant_alpha; bitstream.CHUNK_ALPHA).
    `alpha_ends`: a fitted alpha's aEND chunk is held a place in the budget (add_alpha_ends fills it in)."""
    from PIL import Image

    info = getattr(image, "info", {})
    out = {}
    for key, value in zip(METADATA, (icc_profile, exif, xmp)):
        value = info.get(key) if value is None else value
        if value is None:
            continue
        if key == "exif" and isinstance(value, Image.Exif):
            value = value.tobytes()
        elif key == "xmp" and isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"{key} must be bytes{' or Image.Exif' if key == 'exif' else ''}"
                             f"{' or str' if key == 'xmp' else ''}, got {type(value).__name__}")
        out[key] = bytes(value)
    if alpha is not None:
        out["alpha"] = bytes([alpha])
    elif alpha_ends and storage_mode(image) in ("LA", "RGBA"):
        out["alpha_ends"] = b"\0\0"  # its 14 bytes counted in every plan; add_alpha_ends sets or drops it
    return out


# The largest alpha end the encoder searches: any that keeps lo + hi < 255. #214 saw 5-18 on cut-outs and logos
# and the cap, then 32, on hard-edged holes; #215 84-127 there (a decoder applies at most 32 away from the stored size).
MAX_ALPHA_END = 127


def add_alpha_ends(data: bytes, pixels: np.ndarray, device: str = "cpu") -> bytes:
    """`data` (a finished file, tiled or not) with the aEND chunk its metadata holds a place for set to the ends
    that bring its decoded alpha closest to the image's (`pixels`, (H, W, C) in [0, 1], the alpha last), or dropped
    where none helps."""
    from .render import render_file

    f = bitstream.loads(data)
    if "alpha_ends" not in f.metadata:
        return data
    # The chunk is the file's last (bitstream.METADATA_CHUNKS' order), so it is cut off and put back without
    # writing the rest again.
    placeholder = bitstream.chunk(bitstream.CHUNK_ALPHA_ENDS, f.metadata["alpha_ends"])
    if not data.endswith(placeholder):
        raise AssertionError("the alpha ends chunk is not the file's last")
    data = data[: -len(placeholder)]
    raw = dataclasses.replace(f, metadata={k: v for k, v in f.metadata.items() if k != "alpha_ends"})
    alpha = render_file(raw, None, device, "torch")[..., -1].astype(np.int64).ravel()
    true = np.round(pixels[..., -1] * 255).astype(np.int64).ravel()
    # The change in squared error of showing each decoded value as 0 (as 255), summed by that value: the best lo
    # (hi) is where the running sum from 0 (from 255) is lowest.
    to_zero = np.bincount(alpha, true**2 - (alpha - true) ** 2, 256)[: MAX_ALPHA_END + 1].cumsum()
    to_full = np.bincount(255 - alpha, (255 - true) ** 2 - (alpha - true) ** 2, 256)[: MAX_ALPHA_END + 1].cumsum()
    lo, hi = int(np.argmin(to_zero)), int(np.argmin(to_full))
    lo, hi = (lo if to_zero[lo] < 0 else 0), (hi if to_full[hi] < 0 else 0)
    return data + bitstream.chunk(bitstream.CHUNK_ALPHA_ENDS, bytes([lo, hi])) if lo or hi else data


# ---- architecture from the budget ------------------------------------------------------------------

# Genesis widths relative to the first (wide) sine layer, by budget. Small networks: halving bottlenecks.
# From DEEP_PARAMS parameters up, modulation and a fourth sine layer with a floor of a quarter width (as NIF25
# narrows to a floor): +0.23 dB over (1, .5, .25) on 4 crops at 0.6/1.0 bpp, for ~4 % more step time; (1, .5,
# .3, .2) gave +0.15, (1, .45, .3, .3) +0.13, five layers (1, .45, .25, .18, .18) +0.13 (benchmarks/NOTES.md #35).
# Below 5000 parameters they first lost 0.8 dB (#35), but the modulated networks' recipe (Muon, the decays:
# #84-#87, #112) later gained ~0.9 dB that plain networks never could: on 8 crops at 0.3 bpp (3.5k parameters),
# effort 5, the deep shape with modulation (16, 8) gained +0.65 dB, all 8 up (modulation alone on (1, .5, .25):
# +0.35 to +0.39); on 4 crops +0.65 at 0.22 bpp (2.6k), +0.43 at 0.18 (2.1k), -0.14 at 0.15 (1.8k) (#137).
# Efforts 2-4 gained +0.14 to +0.25 at 0.3 bpp; effort 1's single 300-step stage lost 0.56, so shorter stages
# keep plain networks to 5000 parameters (at 0.6 bpp, 7k parameters, plain ones lost 0.39 dB there too). Since
# effort 1 has 400 steps (#196) no level's stages are that short: there modulation was +0.14 dB (17 of 24 crops up at
# 0.3 bpp against 1 x 400 plain; 1.54x the time).
# Small images are another matter: where a step samples a quarter of the image or more (up to 16k pixels at 4k a
# step: 128x128, 96x96), the short stages of efforts 2-4 fitted modulated networks of 2000-5000 parameters worse
# and erratically, and rounded them worse. The plain networks' files were better on 11 of 12 points at effort 2 (6
# images, 128x128 at 1.0 bpp and 96x96 at 2.0, 2 seeds each: mean +0.94 dB, up to +3.8), on 4 of 4 at effort 3
# and 3 of 4 at effort 4 (128x128, 1.0 bpp: +0.48 ... +3.92, 0.00 ... +0.93 dB); kodim20's centre (half flat sky)
# fitted at 19 to 42 dB with the seed (sd 3.7-6.2 dB over 12 seeds; the plain network 0.2). NOTES.md #187.
# Effort 4's 1500-step stages (#193) fitted the modulated ones better on textured centres (kodim15, 05: +0.4 ... +1.0
# dB on the mean of 2 seeds) but still worse and unevenly on smooth ones (kodim02's 96x96 at 2.0 bpp: 37.2-38.3 dB
# over 4 seeds, plain 38.2-38.6), so effort 4 keeps the plain ones here too.
_GENESIS_SHAPE = (1.0, 0.5, 0.25)
_DEEP_SHAPE = (1.0, 0.45, 0.25, 0.25)
DEEP_PARAMS = 2000
SHORT_STAGE = 400  # steps: fits with shorter stages modulate from SHORT_DEEP_PARAMS
DENSE_SHORT_STAGE = 3000  # steps: the same where a step samples a quarter of the image or more (efforts 1-4)
SHORT_DEEP_PARAMS = 5000


def params_for(bits: float, pixels: int, cfg: FitConfig) -> float:
    """The parameters a network may have for `bits` of weights on an image of `pixels` pixels: cfg.bits_per_param
    bits each up to cfg.large_image[0] pixels, falling to cfg.large_bits_per_param at cfg.large_image[1]."""
    lo, hi = cfg.large_image
    share = 0.0 if pixels <= lo else 1.0 if pixels >= hi else math.log2(pixels / lo) / math.log2(hi / lo)
    return bits / (cfg.bits_per_param + share * (cfg.large_bits_per_param - cfg.bits_per_param))


def choose_architecture(width: int, height: int, channels: int, param_budget: float, cfg: FitConfig,
                        effort: Effort = EFFORTS[5]) -> Architecture:
    """The largest NIF-shaped network that fits `param_budget` parameters, for a fit at `effort` (its stages' steps
    and pixels a step).

    Encoding frequencies grow with the parameters per pixel: a larger network can use finer ones.
    Measured on 4 Kodak crops of 256x256 (13 frequencies reach periods of ~4 pixels; benchmarks/NOTES.md
    #27): the best count was 10 at 0.054 parameters per pixel (0.3 bpp), 10-12 at 0.11 (0.6 bpp) and 12
    at 0.18 (1.0 bpp), i.e. about nyquist - 3 + 1.25 log2(params per pixel / 0.054); two more cost 0.09 / 0.11
    dB at 0.6 / 1.0 bpp in session 28 (#137). Both axes share the frequencies while each spans [-1, 1], so
    nyquist counts them to ~4 pixels along the longer side, where a period covers the most pixels: at 768x512
    that is one more than the shorter side's count: +0.12 dB at 1.0 bpp (4 of 4 images up), +0.03 at 0.6, +0.05
    at 0.3 (2 images each; NOTES.md #157).
    Modulation and a fourth sine layer pay from DEEP_PARAMS up; from SHORT_DEEP_PARAMS in stages under SHORT_STAGE
    steps (no level's since effort 1 has 400), and in the stages of efforts 1-4 where a step samples a quarter of the
    image or more (small images).
    """
    n = max(width, height)
    nyquist = int(math.log(max(n, 8) / 4) / math.log(cfg.pe_scale)) + 1  # periods down to ~4 pixels
    per_pixel = max(param_budget, 1.0) / (width * height)
    freqs = round(nyquist - 3 + 1.25 * math.log2(per_pixel / 0.054))
    freqs = max(2, min(nyquist, bitstream.MAX_FREQS, freqs, int(param_budget / 120)))
    dense = step_stride(height, width, effort) <= 2  # a step samples a quarter of the image or more
    short = effort.iters < (DENSE_SHORT_STAGE if dense else SHORT_STAGE)
    if param_budget >= (SHORT_DEEP_PARAMS if short else DEEP_PARAMS):
        mod = (32, 16, 8) if param_budget >= 40000 else (16, 8)
        mod_freqs, shape = 4, _DEEP_SHAPE
    else:
        mod, mod_freqs = (), 0
        shape = _GENESIS_SHAPE if param_budget >= 800 else _GENESIS_SHAPE[:2]

    def build(w0: float) -> Architecture:
        widths = tuple(max(channels + 1, int(round(w0 * s))) for s in shape)
        return Architecture(channels, widths, freqs, cfg.pe_scale, cfg.omega, mod, mod_freqs, cfg.omega, cfg.mod_sigma)

    lo, hi = 2.0, float(bitstream.MAX_WIDTH)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if build(mid).num_params() <= param_budget else (lo, mid)
    return build(lo)


# ---- losses ----------------------------------------------------------------------------------------


def log_cosh_terms(x):
    """log(cosh(x)) elementwise, in a form that cannot overflow."""
    import torch.nn.functional as F

    return x + F.softplus(-2 * x) - math.log(2)


def _gaussian_band(n: int, size: int, device, dtype):
    """(n - size + 1, n) matrix applying a valid 1-D Gaussian window (sigma 1.5) along an axis."""
    import torch

    g = torch.exp(-((torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    m = torch.zeros(n - size + 1, n, device=device, dtype=dtype)
    for k in range(size):
        m.diagonal(k).copy_(g[k].expand(n - size + 1))
    return m


def ssim(a, b, data_range: float = 2.0):
    """Mean SSIM of two (H, W, C) images with Wang et al.'s 11-tap Gaussian window.

    The window is applied as two band-matrix products: on the CPU these are several times
    faster than conv2d, above all in the backward pass.
    """
    import torch

    h, w, c = a.shape
    size = min(11, h, w)
    gh = _gaussian_band(h, size, a.device, a.dtype)
    gw = _gaussian_band(w, size, a.device, a.dtype)
    x = torch.stack([a, b, a * a, b * b, a * b])  # (5, H, W, C)
    x = torch.einsum("ih,khwc,jw->kijc", gh, x, gw)
    mu_a, mu_b, saa, sbb, sab = x
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    va, vb, cov = saa - mu_a**2, sbb - mu_b**2, sab - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean()


# ---- the fitter ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputGain:
    """The fit's target is gain * (target - centre): the network-space target (H, W, C) scaled so that its widest
    channel spans more than half of [-1, 1], each channel where the same values of full range would be.

    The fit's rates, decays, gradient clip and restarts are absolute and were tuned on targets spanning [-1, 1]. A
    12-bit image in I;16 spans 1/16 of it, and at 1.0 bpp on a 256x256 Kodak crop it came out 8.4 dB under the same
    picture at full range (own-range PSNR), 10-bit 12 dB under. After the fit the centre goes into the output
    bias (`offsets`, Fitter.shift_output: the model then fits gain * target), and the file stores the output layer's
    steps divided by the gain (scale_output_steps): exact, since the gain is a power of two, and the symbols, so the
    bits, stay the same. A decoder needs nothing new. Gain 1 (an image of full range): centre 0, the fit as before.
    """

    gain: float
    centre: np.ndarray  # (C,) network space

    @classmethod
    def of(cls, target: np.ndarray, cfg: FitConfig) -> OutputGain:
        lo, hi = target.min(axis=(0, 1)), target.max(axis=(0, 1))
        span = float((hi - lo).max())
        octaves = min(cfg.output_gain_octaves, math.floor(math.log2(2 / span))) if span > 0 else 0
        if octaves <= 0:
            return cls(1.0, np.zeros(target.shape[2]))
        gain = 2.0**octaves
        # Each channel's values in a window of 1/gain of [0, 1] that holds them, scaled onto all of it: of the
        # windows within [0, 1] starting at multiples of 1/(2 gain), the one centred nearest the values' mid-range.
        # 8-bit values in I;16 then become what the same picture in L is, 12-bit ones what 16-bit is, a grey
        # picture's chroma stays at 0. Fitted centred on their mid-range instead, 64x48 crops at effort 1 came out
        # 1.5 dB below (6 seeds, sd 2 dB; effort 2 at 128x96: -0.15). A channel no such window holds is centred.
        first = np.maximum(np.ceil((hi + 1) * gain) - 2, 0)  # windows k: [k / gain - 1, (k + 2) / gain - 1]
        last = np.minimum(np.floor((lo + 1) * gain), 2 * gain - 2)
        k = np.clip(np.round((hi + lo + 2) / 2 * gain - 1), first, last)
        return cls(gain, np.where(first <= last, (k + 1) / gain - 1, (hi + lo) / 2))

    def normalise(self, target: np.ndarray) -> np.ndarray:
        """The target the network is fitted to."""
        return target if self.gain == 1 and not self.centre.any() else (target - self.centre) * self.gain

    @property
    def offsets(self) -> np.ndarray:
        """What the output bias takes after the fit (Fitter.shift_output)."""
        return self.centre * self.gain


def scale_output_steps(data: bytes, gain: float) -> bytes:
    """The file `data` of a network fitted to gain x its target (OutputGain, after shift_output): the output
    layer's steps divided by the gain, a power of two, so the stored weights are exactly the fitted ones / gain."""
    if gain == 1:
        return data
    f = bitstream.loads(data)
    out = 2 * len(f.header.arch.widths)  # genesis.{n}.weight, then its bias (Architecture.tensor_shapes' order)
    codings = [dataclasses.replace(c, step=c.step / gain) if i in (out, out + 1) else c
               for i, c in enumerate(f.codings)]
    return bitstream.dumps(dataclasses.replace(f, codings=codings))


class Fitter:
    """Holds the target image on the device and trains one NIF model on it."""

    def __init__(self, target: np.ndarray, arch: Architecture, device: str, effort: Effort, cfg: FitConfig, seed: int):
        import torch

        from .model import blank_nif

        self.torch = torch
        self.cfg, self.effort, self.device = cfg, effort, device
        self.h, self.w, _ = target.shape
        self.target = torch.from_numpy(target).float().to(device)  # (H, W, C) in [-1, 1] (shift_output moves it)
        self.gen = torch.Generator().manual_seed(seed)  # every random draw of the fit comes from here
        self.model = blank_nif(arch).initialize(self.gen).to(device)
        plain = not arch.mod_widths
        self.stride = step_stride(self.h, self.w, effort)
        self.mse_stride = mse_stride(self.h, self.w, effort)
        # The decays of the input layer and the modulation, and the sparse steps' rate, were measured with long
        # stages only; short ones (efforts 1-2) keep the rates and decays they were tuned with.
        self.long_stages = long_stages(effort, cfg)
        sparse = sparseness(self.h, self.w, arch, effort, cfg)
        self.step_scale = 1 - (1 - cfg.sparse_lr) * sparse  # the optimizer divides the decays by it
        # Sparse steps also end the fit with a gentle stage and tune longer at a lower rate (FitConfig.polish).
        self.polish_iters, self.qat_iters, self.qat_lr = sparse_schedule(sparse, effort, cfg, arch, self.h * self.w)
        self.lr, self.warmup = (cfg.plain_lr, cfg.plain_warmup) if plain else (cfg.lr * self.step_scale, cfg.warmup)
        self.subgrid = None  # built on first use: BatchFitter evaluates its stacked networks its own way
        # Steps that sample part of the image draw their pixels (sample), except for SSIM, which needs the grid's
        # neighbours.
        self.sampler = self.new_sampler() if cfg.importance and self.stride > 1 and not cfg.ssim_weight else None
        self.weights = None  # the loss weights of a drawn sample

    def new_sampler(self, count: int | None = None):
        """An importance sampler of this image's pixels (or of `count` images' at once), drawing from the fit's
        generator (sampling.py)."""
        from .sampling import ImportanceSampler

        return ImportanceSampler(self.h, self.w, math.ceil(self.h / self.stride), math.ceil(self.w / self.stride),
                                 self.cfg.importance, self.cfg.importance_power, self.device, self.gen, count=count)

    def sampled_share(self) -> float:
        """The share of the image a step samples, relative to cfg.decay_fraction (under 1: sparser than a
        256x256 crop's steps of 4k pixels, where the decays and the warm-up were tuned)."""
        return 1 / (self.stride**2 * self.cfg.decay_fraction)

    def axes(self, rows, cols):
        return pixel_axes(self.h, self.w, rows, cols, self.device)

    def sample(self, drawn: bool = False, left: int | None = None):
        """The rows and columns of one step: the whole image, or every s-th row and column from a random phase,
        or (`drawn`, where there is a sampler) rows and each row's columns drawn by error (sampling.py; `left`:
        the draws the stage will still take).

        A strided grid spreads the batch over the whole image, so each step's gradient is an
        unbiased estimate of the full-image one; random crops fit one region at a time and, measured
        on a 256x256 Kodak crop, lost 6 dB against full-image steps of the same compute.
        """
        self.weights = self.drawn_pixels = None
        if drawn and self.sampler is not None:
            return self.use_draw(*self.sampler.draw(left))
        s = self.stride
        if s == 1:
            return range(self.h), range(self.w)
        py, px = torch_randint(self.gen, s), torch_randint(self.gen, s)
        return range(py, self.h, s), range(px, self.w, s)

    def use_draw(self, rows, cols, weights):
        """Makes a draw of the sampler (rows, cols, loss weights) the step's pixels; returns (rows, cols)."""
        self.weights = weights
        # Flat indices row * w + column: the step gathers its targets and records its losses by them
        # ((R * K,), or (B, R * K) for BatchFitter's stack).
        self.drawn_pixels = (rows[..., None] * self.w + cols).flatten(-2)
        return rows, cols

    def predict(self, rows: range, cols: range, weights=None):
        """(prediction, target) on the grid rows x cols, each (rows, cols, channels): subgrid.SubgridNetwork,
        whose output is channel-major (the views permute it, and the target is stored that way to match)."""
        from .subgrid import SubgridNetwork, as_slice

        if self.subgrid is None:
            if self.target.is_cuda if self.cfg.fused_network is None else self.cfg.fused_network:
                from .kernels.nif_train import FusedNetwork  # the same forward, by two Triton kernels

                self.subgrid = FusedNetwork(self.model.arch, self.h, self.w, self.device,
                                            precision="tf32" if self.cfg.tf32 == "all" else "ieee")
            else:
                self.subgrid = SubgridNetwork(self.model.arch, self.h, self.w, self.device)
            self.target_cm = self.target.permute(2, 0, 1).contiguous()
        pred = self.subgrid.forward(weights if weights is not None else dict(self.model.named_tensors()), rows, cols)
        if isinstance(rows, range):
            target = self.target_cm[:, as_slice(rows), as_slice(cols)]
        else:  # a drawn sample: row r's own columns, gathered by flat index (faster than by (rows, cols))
            flat = self.target_cm.view(len(self.target_cm), -1)
            target = flat.index_select(1, self.drawn_pixels).view(-1, *cols.shape)
        return pred.reshape(target.shape).permute(1, 2, 0), target.permute(1, 2, 0)

    def loss(self, rows, cols, weights=None):
        pred, target = self.predict(rows, cols, weights)
        terms = log_cosh_terms(pred - target)
        self.terms = terms.detach()  # the step's per-pixel losses, for image_losses
        if self.weights is not None:  # a drawn sample
            self.sampler.observe(self.drawn_pixels, self.terms.sum(2))
            return (terms * self.weights[:, :, None]).mean()
        loss = terms.mean()
        if self.cfg.ssim_weight and min(target.shape[:2]) >= 7:
            loss = loss + self.cfg.ssim_weight * (1 - ssim(pred, target))
        return loss

    def mse(self, weights=None) -> float:
        """The model's MSE over the image (every mse_stride-th row and column), in network units (times the
        output gain's square: OutputGain)."""
        return image_mse(self.model, self.target, weights, self.mse_stride)

    def state(self):
        return copy.deepcopy(self.model.state_dict())

    def run_stage(self, iters: int, lr: float, tick: Callable[[int], None], weights_fn=None):
        """`iters` optimiser steps at peak rate `lr` (a fitting stage, or with `weights_fn` a tuning stage)."""
        from .optim import tf32_products

        with tf32_products(self.cfg.tf32 == "all" and self.target.is_cuda):
            self._run_stage(iters, lr, tick, weights_fn)

    def _run_stage(self, iters: int, lr: float, tick: Callable[[int], None], weights_fn=None):
        params = list(self.model.parameters())
        decay = self.cfg.weight_decay if weights_fn is None else 0.0
        opt = self.optimizer(lr, decay, tuning=weights_fn is not None)
        hold = self.cfg.lr_hold if weights_fn is None else 0.0
        warmup = self.warmup
        if weights_fn is None and self.sampled_share() < 1:  # not the tuning's tiny rate
            warmup = max(warmup, min(self.cfg.min_warmup_steps / iters, 0.5))
        guard = CollapseGuard(params, opt)
        graph = self.step_graph(opt, weights_fn)
        for it in range(iters):
            f = lr_factor(it, iters, warmup, hold, self.cfg.lr_floor)
            if graph is not None:  # the same step, replayed from CUDA graphs (stepgraph.py)
                guard.step(graph.gradients(lr * f, iters - it))
                with guard.paced():
                    graph.update()
                tick(1)
                continue
            for g in opt.param_groups:
                g["lr"] = lr * f
            # The tuning draws too: +0.028 dB at 768x512, 1.0 bpp (6 of 6 images), +-0.01 elsewhere (NOTES.md #160d).
            rows, cols = self.sample(drawn=True, left=iters - it)
            loss = self.loss(rows, cols, weights_fn() if weights_fn else None)
            opt.zero_grad()
            loss.backward()
            self.clip_gradients()
            guard.step(self.image_losses(loss))  # before the update: these weights are the ones just measured
            with guard.paced():
                opt.step()
            tick(1)
        opt.zero_grad()  # a graph's gradients live in its memory pool: let it go with the stage

    def step_graph(self, opt, weights_fn=None):
        """A stepgraph.StepGraph for a stage's steps where cfg.step_graph asks for one (None: on CUDA) and every
        step has the same shapes; captured on CUDA, run uncaptured on the CPU (tests)."""
        from .stepgraph import StepGraph

        wanted = self.target.is_cuda if self.cfg.step_graph is None else self.cfg.step_graph
        if not wanted or not StepGraph.graphable(self):
            return None
        return StepGraph(self, opt, capture=self.target.is_cuda, weights_fn=weights_fn)

    def optimizer(self, lr: float, decay: float, tuning: bool):
        """Fitting stages: the weight matrices decay strongly, since smaller weights quantise with smaller phase
        errors. In modulated networks Muon trains the genesis matrices (cfg.muon): the hidden and output ones at
        cfg.muon_decay (the output one of an image with an alpha channel on AdamW, cfg.alpha_output_adamw), the
        input layer at cfg.input_decay. AdamW trains the rest: the modulation's weights at
        cfg.modulation_decay, the biases at `decay`. The input layer's and the modulation's decays apply from
        cfg.matrix_decay_iters steps a stage, scaled down where a step samples less than cfg.decay_fraction of the
        image; shorter stages keep the input layer on AdamW and both at `decay`. Plain (small) networks train with
        AdamW alone, the input layer at cfg.input_decay: Muon fitted the plain networks 0.3 bpp had then better
        (+0.08 dB) but their files came out 0.40 dB worse (kodim20: quantisation cost 2.6 dB instead of 0.8;
        benchmarks/NOTES.md #84). Quantisation-aware tuning: AdamW at `decay`; its few tiny steps only nudge
        weights across rounding boundaries."""
        from .optim import AdamW, Chain, Muon

        adamw = lambda groups: AdamW(groups, lr=lr, weight_decay=decay)  # noqa: E731  (torch's fused AdamW, leaner)
        if tuning:
            return adamw(list(self.model.parameters()))
        grow = 1 / self.step_scale  # a smaller rate keeps each step's shrinkage lr x decay (cfg.sparse_lr)
        decay *= grow
        tensors = self.model.named_tensors()  # every parameter, by name
        modulated = bool(self.model.arch.mod_widths)
        long = not modulated or self.long_stages
        own = {}  # the tensors with a decay of their own
        if long:
            scale = min(1.0, self.sampled_share()) * grow
            own = {n: scale * self.cfg.modulation_decay for n, _ in tensors
                   if n.startswith("modulation.") and n.endswith(".weight")}
            own["genesis.0.weight"] = scale * self.cfg.input_decay
        muon = {}  # the tensors Muon trains -> their decay
        if modulated and self.cfg.muon:
            arch = self.model.arch
            output = len(arch.widths)  # genesis.{output} maps the last width to the channels
            alpha = self.cfg.alpha_output_adamw and arch.channels in (2, 4)
            hidden = range(1, output if alpha else output + 1)
            muon = {f"genesis.{i}.weight": grow * self.cfg.muon_decay for i in hidden}
            if long:  # the input layer too: +0.13 / +0.17 dB at 0.6 / 1.0 bpp on 8 crops (NOTES.md #112)
                muon["genesis.0.weight"] = own["genesis.0.weight"]

        # Stages under cfg.period_lr_iters steps train the period's offset at its own rate (cfg.period_lr: the
        # optimiser scales its group's rate by lr_scale, optim.group_rate). Effort 5's were steady without it
        # (kodim20's centre: 40.6-41.0 dB over 4 seeds), and with it lost 0.13 dB on 8 crops at 1.0 bpp (1 of 8 up):
        # they keep the rate they were tuned with.
        rates = {}
        if modulated and self.effort.iters < self.cfg.period_lr_iters:
            rates[f"modulation.{len(self.model.arch.mod_widths)}.bias"] = self.cfg.period_lr

        def by_decay(names: dict) -> list[dict]:
            groups: dict[tuple, list] = {}  # (decay, rate's scale) -> its tensors, in the model's order
            for n, t in tensors:
                if n in names:
                    groups.setdefault((names[n], rates.get(n, 1.0)), []).append(t)
            return [{"params": ps, "weight_decay": d} | ({"lr_scale": s} if s != 1 else {})
                    for (d, s), ps in groups.items()]

        rest = adamw(by_decay({n: own.get(n, decay) for n, _ in tensors if n not in muon}))
        if not muon:
            return rest
        return Chain(Muon(by_decay(muon), lr=lr, tf32=self.cfg.tf32 in ("muon", "all")), rest)

    def shift_output(self, offsets: np.ndarray):
        """Adds `offsets` ((C,), or BatchFitter's (B * C,)) to the output bias and to the target alike: the fit's
        error is the same, and the model now fits the uncentred target (OutputGain)."""
        if not np.any(offsets):
            return
        torch = self.torch
        shift = torch.from_numpy(np.asarray(offsets, dtype=np.float64)).float().to(self.device)
        bias = dict(self.model.named_tensors())[f"genesis.{len(self.model.arch.widths)}.bias"]
        with torch.no_grad():
            bias.add_(shift.reshape(bias.shape))
            self.target.add_(shift)  # in place: a captured step graph reads this tensor
            cm = getattr(self, "target_cm", None)  # one channel's is a view of the target (permute of (H, W, 1))
            if cm is not None and cm.untyped_storage().data_ptr() != self.target.untyped_storage().data_ptr():
                cm.add_(shift[:, None, None])

    def image_losses(self, loss):
        """The step's loss per image (one here; BatchFitter has one per image of the stack)."""
        return loss.detach().reshape(1)

    def clip_gradients(self):
        """clip_grad_norm_'s arithmetic in three calls: its checks and grouping took half of its 0.17 ms a step."""
        if self.cfg.grad_clip:
            torch = self.torch
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, (self.cfg.grad_clip / (norm + 1e-6)).clamp_(max=1.0))

    def stage_lr(self, stage: int) -> float:
        return self.lr * (self.cfg.restart_lr if stage else 1.0)

    def restart(self, progress: float):
        """Perturb a fraction of the weights (all layers but the genesis input layer)."""
        torch = self.torch
        c = self.cfg
        amount = c.restart_amount[0] + (c.restart_amount[1] - c.restart_amount[0]) * progress
        rng = c.restart_range[0] + (c.restart_range[1] - c.restart_range[0]) * progress
        with torch.no_grad():
            for name, t in self.model.named_tensors():
                if name.startswith("genesis.0.") or not name.endswith("weight"):
                    continue
                noise = (torch.rand(t.shape, generator=self.gen) * 2 - 1) * rng * float(t.abs().mean())
                mask = (torch.rand(t.shape, generator=self.gen) < amount).float()
                t.add_((noise * mask).to(t.device))

    def fit(self, tick):
        """Staged fitting; returns the best full-image MSE reached (the model holds those weights)."""
        e = self.effort
        # Start from the initialisation, so that a diverged stage (NaN) can never be what is kept.
        best_mse, best_state = self.mse(), self.state()
        for stage in range(e.stages):
            if stage:
                self.restart(stage / max(1, e.stages - 1))
            self.run_stage(e.iters, self.stage_lr(stage), tick)
            mse = self.mse()
            if mse < best_mse:
                best_mse, best_state = mse, self.state()
            else:
                self.model.load_state_dict(best_state)
        self.model.load_state_dict(best_state)
        if self.polish_iters:  # no restart: the best weights go on at a low rate (FitConfig.polish)
            self.run_stage(self.polish_iters, self.lr * self.cfg.polish_lr, tick)
            mse = self.mse()
            if mse < best_mse:
                return mse
            self.model.load_state_dict(best_state)
        return best_mse


def lr_factor(it: int, iters: int, warmup: float, hold: float, floor: float) -> float:
    """Learning rate of step `it` of a stage, relative to its peak: a linear warm-up over `warmup` of the
    steps, the peak held until `hold` of them, then a cosine decay to `floor` at the last step."""
    warm = max(1, int(iters * warmup))
    if it < warm:
        return (it + 1) / warm
    start = max(warm, int(iters * hold))
    if it < start:
        return 1.0
    p = (it - start) / max(1, iters - start)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


class CollapseGuard:
    """Keeps each image's best weights of a stage and goes back to them, at half the pace, if its loss blows up
    or drifts up.

    A sine network trained at a high rate now and then leaves the basin for good: kodim03's 256x256 crop at
    1.0 bpp with 2 x 3000 steps went from a loss of 3.5e-4 to 3e-2 within 250 steps, at the peak of the
    first stage's rate, and ended at the flat image (14.7 dB instead of 35.7; benchmarks/NOTES.md #68).
    A large network whose rate warms up fast can also creep out of it: kodim19 at 768x512, 1.0 bpp, effort 3
    (290-wide, a 40-step warm-up) went from 7e-3 at the peak of the rate to 4e-2 in 150 steps, never 4 times its
    best window, and ended at the flat image (14.6 dB; NOTES.md #129).
    Every `window` steps, before the update, the mean loss is compared with the best window's: lower (and
    the last step's loss, that of the weights at hand, not `spike` times higher), and the weights and the
    optimiser's moments are saved; `rise` times higher (or not finite), and they are restored, the step's
    gradient dropped, and the image's updates are halved from then on (`paced`: a lower rate for the rest
    of the stage, since the one it had just failed). Tensors whose first dimension is the image (BatchFitter's
    stacks) are saved, restored and paced per image.
    """

    def __init__(self, params, opt, window: int = 50, rise: float = 2.0, spike: float = 4.0):
        self.params, self.opt, self.window, self.rise, self.spike = params, opt, window, rise, spike
        self.total, self.count = None, 0
        self.best = self.saved = None
        self.restores = 0
        self.pace = None  # each image's share of its updates; None while every image keeps all of them

    def tensors(self):
        """Parameters and the optimiser's per-element state (its step counters are shared: left alone)."""
        state = [v for p in self.params for v in self.opt.state.get(p, {}).values() if v.dim()]
        return self.params + state

    def step(self, losses):
        self.total = losses if self.total is None else self.total + losses
        self.count += 1
        if self.count < self.window:
            return
        import torch

        mean, self.total, self.count = self.total / self.window, None, 0
        if self.best is None:  # the first window: everything finite is better than nothing
            self.best, self.saved = torch.full_like(mean, math.inf), [t.detach().clone() for t in self.tensors()]
        collapsed = ~(mean <= self.rise * self.best)  # NaN counts as a collapse
        better = (mean < self.best) & (losses <= self.spike * self.best)
        self.restores += int(collapsed.sum())
        with torch.no_grad():
            for t, s in zip(self.tensors(), self.saved):
                s.copy_(torch.where(per_image(better, t), t, s))
                t.copy_(torch.where(per_image(collapsed, t), s, t))
                if t.grad is not None:
                    t.grad.copy_(torch.where(per_image(collapsed, t), 0.0, t.grad))
        self.best = torch.where(better, mean, self.best)
        if collapsed.any():
            pace = torch.ones_like(mean) if self.pace is None else self.pace
            self.pace = torch.where(collapsed, pace / 2, pace)

    @contextlib.contextmanager
    def paced(self):
        """Around the optimiser's step: scales each image's update by its pace (the step at a rate times the
        pace: AdamW's and Muon's updates and decays are all proportional to the rate). Costs nothing until an
        image has been restored, so a fit that never is trains exactly as it would without the guard."""
        if self.pace is None:
            yield
            return
        import torch

        with torch.no_grad():
            before = [p.detach().clone() for p in self.params]
        yield
        with torch.no_grad():
            for p, b in zip(self.params, before):
                p.lerp_(b, 1 - per_image(self.pace, p))


def per_image(m, t):
    """Per-image values `m` shaped to broadcast over `t`, whose first dimension is the image (one image: any shape)."""
    return m.reshape(-1, *([1] * (t.dim() - 1)))


def pixel_axes(h: int, w: int, rows, cols, device):
    """Pixel-centre coordinates (float32, as model.pixel_grid) of row and column indices (ranges or tensors)."""
    import torch

    def centres(idx, n):
        # A range made on the device, not copied from a Python list: a CUDA graph's capture refuses host copies.
        t = (torch.arange(idx.start, idx.stop, idx.step, device=device, dtype=torch.float64) if isinstance(idx, range)
             else torch.as_tensor(idx, device=device, dtype=torch.float64))
        return ((2 * t + 1) / n - 1).float()

    return centres(rows, h), centres(cols, w)


def _bands(target, stride: int):
    """(ys, xs, target) of image_mse's bands of rows: every `stride`-th row and column, ~64k pixels a band."""
    h, w = target.shape[:2]
    cols = range(0, w, stride)
    rows = max(1, (1 << 16) // len(cols))
    for r0 in range(0, h, rows * stride):
        r1 = min(h, r0 + rows * stride)
        yield *pixel_axes(h, w, range(r0, r1, stride), cols, target.device), target[r0:r1:stride, ::stride]


def _mean_square(pairs) -> float:
    """The MSE over (prediction, target) pairs of bands, summed band by band in float64 on the host."""
    total, n = 0.0, 0
    for pred, t in pairs:
        total += float(((pred - t) ** 2).sum())
        n += t.numel()
    return total / n


def image_mse(model, target, weights=None, stride: int = 1) -> float:
    """MSE of `model` against `target` (H, W, C) in network units, over every `stride`-th row and
    column, in bands of rows to bound memory."""
    import torch

    with torch.no_grad():
        return _mean_square((model(ys, xs, weights), t) for ys, xs, t in _bands(target, stride))


class _OneTensorCost:
    """What replacing one tensor of `model` costs over a subgrid (every stride-th row and column): the change of
    the image's MSE against the target (image_mse's values), or with `change` the mean square change of the
    model's output. Evaluated from that tensor's layer on: the layers before it are the model's own, kept per band
    from one pass (model.grid_layers; the same operations, so the same values). The step allocation measures every
    tensor at up to 31 steps; a tensor after the genesis network's wide first layers then costs a fraction of a
    whole pass. Past KEEP kept floats (a huge image's wide network) every measurement is a whole pass.

    The MSE's change holds a cross term, 2 x the residual times the output's change, whose mean over the whole
    image is ~0 for a fitted network (its gradient times a rounding) and whose mean over a subgrid is noise; noise
    at a fine step can win a coarse one: one 8-value tensor of a kodim23 network went 5.7x coarser on it. Without
    it effort 1's files gained ~0.01 dB and 8k pixels became enough (the MSE's change had lost 0.03 dB on 8k); at
    efforts 2 and 5 the two were even within the tuning's noise (NOTES.md #204; Effort.alloc_change).
    That noise is the cross term's first-order part; its second-order part (the residual times the network's
    curvature) is no noise: positive at the coarse steps of large tensors (7 % of a first layer's cost at twice its
    step), and the output's change misses it. `slope` (the image's gradient less the subgrid's, by name) swaps the
    first-order part for the whole image's: the MSE's change then predicted the image's best on all 5 captured
    allocations (NOTES.md #205; Effort.alloc_control)."""

    KEEP = 1 << 26  # 256 MB of float32 activations

    def __init__(self, model, target, stride: int, change: bool = False, slope: dict | None = None):
        import torch

        from .model import grid_layers

        self.arch, self.tensors = model.arch, dict(model.named_tensors())
        self.bands, fits = [], []
        h, w = target.shape[:2]
        width = sum(self.arch.widths) + sum(self.arch.mod_widths) + 1
        keep = math.ceil(h / stride) * math.ceil(w / stride) * width <= self.KEEP
        with torch.no_grad():
            for ys, xs, t in _bands(target, stride):
                inputs: list | None = [] if keep else None
                own = grid_layers(self.arch, self.tensors, ys, xs, inputs=inputs)
                fits.append((own, t))
                self.bands.append((ys, xs, own if change else t, inputs))  # what a replaced tensor's output meets
        self.base = _mean_square(fits)  # the model's own MSE on the subgrid, image_mse's value, from the same pass
        self.zero = 0.0 if change else self.base
        self.slope = slope  # by name: added to the cost times the tensor's change (the control variate)

    def __call__(self, name: str, tensor) -> float:
        import torch

        from .model import grid_layers, layer_index

        p = {**self.tensors, name: tensor}
        k = layer_index(self.arch, name) if self.bands[0][3] is not None else 0
        with torch.no_grad():
            cost = _mean_square((grid_layers(self.arch, p, ys, xs, k, *(inputs[k] if inputs else (None, None))), ref)
                                for ys, xs, ref, inputs in self.bands) - self.zero
            if self.slope is not None:
                cost += float((self.slope[name].double() * (tensor - self.tensors[name]).double()).sum())
        return cost


def mse_gradients(model, target, stride: int = 1) -> dict:
    """The gradient of image_mse (every stride-th row and column) by each of `model`'s tensors, by name; summed
    over _bands, so that memory is one band's activations."""
    import torch

    from .model import grid_layers

    names, tensors = zip(*model.named_tensors())
    p = {n: t.detach().requires_grad_() for n, t in zip(names, tensors)}
    grads = [torch.zeros_like(t) for t in tensors]
    count = math.ceil(target.shape[0] / stride) * math.ceil(target.shape[1] / stride) * target.shape[2]
    with torch.enable_grad():
        for ys, xs, t in _bands(target, stride):
            loss = ((grid_layers(model.arch, p, ys, xs) - t) ** 2).sum() / count
            for g, d in zip(grads, torch.autograd.grad(loss, list(p.values()), allow_unused=True)):
                if d is not None:
                    g += d
    return dict(zip(names, grads))


def torch_randint(gen, high: int) -> int:
    import torch

    return int(torch.randint(high, (1,), generator=gen)) if high > 1 else 0


# ---- quantisation + rate control --------------------------------------------------------------------


def _quantise_tensor(t: np.ndarray, step: float) -> tuple[float, int, np.ndarray]:
    """(step, qmax, symbols) of tensor t at a requested step; the step is widened so |symbol| <= MAX_QMAX."""
    peak = float(np.abs(t).max()) if t.size else 0.0
    if peak == 0.0:
        return 1.0, 0, np.zeros(t.shape, dtype=np.int64)
    step = bitstream.bf16_ceil(max(step, peak / bitstream.MAX_QMAX))  # what a version-2 record holds
    qmax = min(bitstream.MAX_QMAX, int(math.ceil(peak / step)))
    return step, qmax, np.clip(np.round(t / step), -qmax, qmax).astype(np.int64)


def _rms(t: np.ndarray) -> float:
    return float(np.sqrt(np.mean(t * t))) if t.size else 0.0


def _coding(i: int, sym: np.ndarray, step: float, qmax: int) -> tuple[TensorCoding, float]:
    """The cheapest coding of tensor i's symbols and its estimated stream bits: the genesis input layer (tensor 0,
    a matrix) may grade its decay by frequency (version 5; the slope's record byte is not in the bits)."""
    if i == 0:
        model, param, slope, bits = entropy.choose_graded(sym, qmax)
        return TensorCoding(step, qmax, model, param, slope), bits
    model, param, bits = entropy.choose_model(sym, qmax)
    return TensorCoding(step, qmax, model, param), bits


def _codings_for(
    tensors: list[np.ndarray], factor: float, scales=None
) -> tuple[list[TensorCoding], list[np.ndarray], float]:
    """Quantise tensor t with step = factor * scales[t] (default: its rms); return codings, symbols, estimated bits."""
    codings, syms, bits = [], [], 0.0
    for i, t in enumerate(tensors):
        step, qmax, sym = _quantise_tensor(t, factor * (_rms(t) if scales is None else scales[i]))
        c, b = _coding(i, sym, step, qmax)
        codings.append(c)
        syms.append(sym)
        bits += b
    return codings, syms, bits


def _file(header: Header, codings, syms, metadata) -> bytes:
    stream = entropy.encode(syms, codings, header.arch.sine_layers())  # version 3
    return bitstream.dumps(NifFile(header, codings, stream, metadata))


def _check_size(w: int, h: int) -> None:
    if w < 1 or h < 1:  # Pillow's PNG and TIFF savers' words for it
        raise ValueError(f"cannot write empty image ({w}x{h})")


def _colour_of(channels: int, colour: str) -> int:
    """The header's colour transform for an image of `channels` under the `colour` option."""
    return bitstream.COLOUR_YCBCR if channels >= 3 and colour in ("auto", "ycbcr") else bitstream.COLOUR_IDENTITY


def _least_overhead(w: int, h: int, mode: str, colour: str, metadata: dict, cfg: FitConfig) -> int:
    """The bytes but the stream of a w x h file of the smallest network: what every budget must cover."""
    c = bitstream.MODES[bitstream.MODE_CODES[mode]][1]
    return _overhead_bytes(Header(w, h, mode, _colour_of(c, colour), choose_architecture(w, h, c, 1, cfg)), metadata)


def _overhead_bytes(header: Header, metadata: dict, codings=None) -> int:
    """The file's bytes but the stream: exact with `codings` (a record holds qmax in 1 or 2 bytes), else
    with 1-byte qmax."""
    if codings is None:
        codings = [TensorCoding(1.0, 0, 0, 0)] * len(header.arch.tensor_shapes())
    return len(bitstream.dumps(NifFile(header, codings, b"", metadata)))


def _estimate_factor(header: Header, tensors, budget_bytes: int, metadata: dict, scales=None, lo_factor: float = 1e-4):
    """Smallest step factor whose *estimated* file fits (bisection on log(factor); no coding)."""
    layers = header.arch.sine_layers()
    lo, hi = math.log(lo_factor), math.log(64.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        codings, syms, bits = _codings_for(tensors, math.exp(mid), scales)
        bits -= entropy.arrangement_bits(syms, layers)  # the bits the neurons' arrangement carries
        # ANS costs a little over the estimate: leave a word of slack plus 0.5 %.
        if _overhead_bytes(header, metadata, codings) + bits * 1.005 / 8 + 8 <= budget_bytes:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def rate_control(
    header: Header, tensors: list[np.ndarray], budget_bytes: int, metadata: dict, scales=None, lo_factor: float = 1e-4
):
    """Smallest step factor whose file fits `budget_bytes`; returns (factor, bytes, codings, symbols)."""
    factor = _estimate_factor(header, tensors, budget_bytes, metadata, scales, lo_factor)

    def attempt(f):
        codings, syms, _ = _codings_for(tensors, f, scales)
        data = _file(header, codings, syms, metadata)
        return (f, data, codings, syms) if len(data) <= budget_bytes else None

    for _ in range(200):  # confirm with the real coder
        best = attempt(factor)
        if best:
            break
        factor *= 1.01
    else:
        raise ValueError("cannot meet the bit budget")  # unreachable in practice: a coarse enough step fits
    # The estimate leaves ~0.5 % of slack: spend it by bisecting down to 2 % finer with the real coder.
    lo, hi = math.log(factor / 1.02), math.log(factor)
    for _ in range(6):
        mid = (lo + hi) / 2
        found = attempt(math.exp(mid))
        lo, hi, best = (lo, mid, found) if found else (mid, hi, best)
    return best


SMALL_TENSOR = 64  # values: allocate_steps gives tensors this small a finer ladder of steps
CONTROL_STRIDE = 3  # allocate_steps' control variate from a subgrid of every 3rd row and column (1/9) on


def allocate_steps(model, target, header: Header, budget_bytes: int, metadata: dict, factor: float,
                   pixels: int = ALLOC_PIXELS, change: bool = False, control: bool = False) -> list[float]:
    """Per-tensor quantisation steps from measured distortion (a Lagrangian over tensors).

    For every tensor and a ladder of steps around `factor` * rms, quantise that tensor alone and
    measure what it costs the image (on a subgrid of about `pixels`: the MSE's change, or with `change` the output's
    mean square change; _OneTensorCost; with `control` and a subgrid of at most 1/9 of the image, the MSE's change
    with the whole image's first-order part, Effort.alloc_control) and the bits it takes; then pick, for one
    multiplier lambda, the step minimising cost + lambda * bits per tensor, with lambda bisected so that the
    estimated file fits the budget.
    """
    import torch

    named = model.named_tensors()
    h, w = target.shape[:2]
    stride = max(1, math.ceil(math.sqrt(h * w / pixels)))
    slope = None
    if control and not change and stride >= CONTROL_STRIDE:  # the subgrid's first-order part out, the image's in
        image, sub = mse_gradients(model, target), mse_gradients(model, target, stride)
        slope = {k: image[k] - sub[k] for k in image}
    cost = _OneTensorCost(model, target, stride, change, slope)
    # 1/32 .. 8 times the uniform step: small tensors (biases, the output layer) go fine. Tensors of a few values
    # cost a few bits at any step and go on down to 1/4096 while rounding them still costs something: the period's
    # offset (one scalar, scaled into every sine) at 1/32 alone cost 8 % of one fit's MSE (kodim02 crop, 0.6 bpp;
    # NOTES.md #117). Steps not measured are never picked.
    mults = 2.0 ** (np.arange(-24, 7) / 2)
    first_large = list(mults).index(1 / 32)  # where the ladder of tensors over SMALL_TENSOR values starts
    n, k = len(named), len(mults)
    dist, bits, steps = np.full((n, k), np.inf), np.full((n, k), np.inf), np.ones((n, k))
    for i, (name, t) in enumerate(named):
        a = t.detach().double().cpu().numpy()
        if not np.any(a):
            dist[i] = bits[i] = 0.0
            continue
        uniform = factor * _rms(a)  # this tensor's step in the uniform allocation
        first = k  # from the coarsest step down: to 1/32, then on while a small tensor's rounding still costs
        while first > first_large or (first > 0 and a.size <= SMALL_TENSOR and dist[i, first] > 1e-3 * cost.base):
            first -= 1
            steps[i, first], qmax, sym = _quantise_tensor(a, uniform * mults[first])
            bits[i, first] = _coding(i, sym, steps[i, first], qmax)[1]
            quantised = torch.from_numpy(sym * steps[i, first]).to(t.dtype).to(t.device)
            dist[i, first] = cost(name, quantised)
        # Coarser never helps: make distortion non-decreasing in the step (measurement noise).
        dist[i, first:] = np.maximum.accumulate(np.maximum(dist[i, first:], 0.0))
    # Plus the bits the neurons' arrangement carries (all of them unless neurons tie, which is rare).
    free = entropy.untied_arrangement_bits((*header.arch.widths, *header.arch.mod_widths))
    target_bits = (budget_bytes - _overhead_bytes(header, metadata) - 8) * 8 / 1.005 + free

    def pick(lam):
        j = np.argmin(dist + lam * bits, axis=1)
        return j, float(bits[np.arange(n), j].sum())

    lo, hi = -40.0, 10.0  # log lambda
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pick(math.exp(mid))[1] <= target_bits else (mid, hi)
    j, _ = pick(math.exp(hi))
    return [float(steps[i, j[i]]) for i in range(n)]


def _tensors(model) -> list[np.ndarray]:
    return [t.detach().double().cpu().numpy() for _, t in model.named_tensors()]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the encoder decides before reading pixels: the header (with the architecture), the budget."""

    header: Header
    budget: int  # bytes of the file without its post-filter: what the network may take
    metadata: dict
    filter_taps: int = 0  # the post-filter's size (postfilter.py); 0: none
    filter_classes: int = 1  # its sets of coefficients, one per class of activity (format version 8)
    total: int = 0  # bytes of the whole file, the post-filter's included (0: the budget)


def check_encode_options(bpp, quality, effort, device, seed, colour, exact=False,
                         progress=False) -> tuple[float, int, str]:
    """Every option checked before any work; returns (target bpp, effort, resolved device)."""
    target_bpp, effort = check_options(bpp, quality, effort, device, seed)
    if colour not in ("auto", "rgb", "ycbcr"):
        raise ValueError(f"colour must be 'auto', 'rgb' or 'ycbcr', got {colour!r}")
    # Flags by their truth alone would take exact="false" as True: a string, or 2, is a mistake to name.
    if not (isinstance(exact, (bool, np.bool_)) or (isinstance(exact, numbers.Integral) and exact in (0, 1))):
        raise ValueError(f"exact must be True or False, got {exact!r}")
    if not (progress is None or isinstance(progress, (bool, np.bool_)) or callable(progress)):
        raise ValueError(f"progress must be True, False or a callable(done, total), got {progress!r}")
    return target_bpp, effort, resolve_device(device)


def plan_encode(image, target_bpp: float, colour: str, metadata: dict, cfg: FitConfig, effort: Effort) -> Plan:
    """Storage mode, colour transform, byte budget and architecture of `image` for a fit at `effort`, without its
    pixels."""
    w, h = image.size
    _check_size(w, h)
    mode = storage_mode(image)  # OSError for modes NIF cannot hold
    _, c, depth = bitstream.MODES[bitstream.MODE_CODES[mode]]
    col = _colour_of(c, colour)
    metadata = {k: bytes(v) for k, v in metadata.items() if v}
    budget = int(target_bpp * w * h // 8)
    overhead = _least_overhead(w, h, mode, colour, metadata, cfg)
    if budget < overhead + 16:
        raise ValueError(
            f"bpp={target_bpp} gives {budget} bytes for a {w}x{h} image, but a NIF file needs at least "
            f"{overhead + 16} bytes: ask for bpp >= {least_bpp(overhead + 16, w, h):g}"
        )
    # Weights are never given more bits than the pixels' own (8 a channel, 16 for I;16): past that a network stores
    # nothing PNG would not, in far more time (bpp=100 at 768x512 had sized 2.76 M parameters, hours of fitting),
    # and the rate control would spend the rest on finer rounding of that network (a file 2.5x the raw pixels).
    budget = min(budget, overhead + max(16, (w * h * c * depth + 7) // 8))
    arch = choose_architecture(w, h, c, params_for((budget - overhead) * 8, w * h, cfg), cfg, effort)
    # The post-filter's bytes come out of the weights' budget, not the architecture's: the same network is fitted
    # with and without one, and only its rounding is a little coarser (1-2 % of the bytes).
    classes, taps = choose_filter(budget, c, w * h) if cfg.post_filter else (1, 0)
    return Plan(Header(w, h, mode, col, arch), budget - filter_reserve(c, taps, classes), metadata, taps, classes, budget)


# ---- the post-filter ------------------------------------------------------------------------------------

# The largest share of the file each post-filter size may take (its reserve, below). On 8 crops of 256x256 at effort
# 5 (NOTES.md #138) the filter gained +0.10 / +0.20 / +0.28 dB at 0.3 / 0.6 / 1.0 bpp and the coarser rounding of
# the network that paid for it cost 0.04 / 0.05 / 0.03: 3x3 at 0.3 bpp (2.3 % of the file) +0.05 net, 5x5 at 0.6
# (2.2 %) +0.15 against 3x3's +0.11, 5x5 at 1.0 (1.3 %) +0.20. The same counts of pairs, chosen per image among 40
# (#139), added +0.025 / +0.032 / +0.041 dB more. 256x256 RGB: 4 pairs from 0.21 bpp, 12 from 0.56 bpp.
FILTER_SHARE = {(4, 20): 0.013, (4, 12): 0.02, (2, 12): 0.02, (1, 12): 0.025, (1, 4): 0.035}  # (classes, pairs)
# Classes need pixels as well as bytes: on 256x256 crops 4 classes lost 0.03-0.09 dB (NOTES #140) where a 768x512
# image gained 0.11-0.18, and one class's coefficients fitted on a crop's pixels are already as good as its share.
CLASS_PIXELS = 1 << 16
FILTER_BITS = 6  # bits a coefficient takes at the steps below, about (5-7 measured)
# Steps of the coefficients (normalised units) the encoder tries: mix, taps, offset.
FILTER_STEPS = [(2.0**-m, 2.0**-t, 2.0**-10) for m in (10, 9, 8) for t in (9, 8, 7, 6)]


def filter_reserve(channels: int, taps: int, classes: int = 1) -> int:
    """Bytes set aside for a post-filter of `taps` pairs and `classes` sets of coefficients: its header mask
    (version 7) and thresholds (version 8), three records, its coefficients."""
    if not taps:
        return 0
    params = classes * (channels * channels * (1 + taps) + channels)
    thresholds = 1 + 4 * (classes - 1) if classes > 1 else 0
    return 5 + thresholds + 3 * 5 + math.ceil(params * FILTER_BITS / 8) + 4


def choose_filter(budget: int, channels: int, pixels: int) -> tuple[int, int]:
    """(classes, pairs) of the post-filter for a file of `budget` bytes and an image of `pixels`: the largest whose
    reserve is within its share and whose classes have CLASS_PIXELS each; (1, 0): none."""
    fits = (
        (classes, pairs)
        for (classes, pairs), share in FILTER_SHARE.items()
        if filter_reserve(channels, pairs, classes) <= share * budget
        and (classes == 1 or classes * CLASS_PIXELS <= pixels)
    )
    return next(fits, (1, 0))


def add_post_filter(data: bytes, pixels: np.ndarray, maxval: int, plan: Plan, device: str = "cpu") -> bytes:
    """`data` (the network's file) with the least-squares post-filter that fits plan.total, at the coefficient steps
    that leave the smallest error; `data` itself where no filter fits or helps."""
    from . import postfilter
    from .render import load_network, render

    if not plan.filter_taps:
        return data
    f = bitstream.loads(data)
    u = render(load_network(f, device), f.header.width, f.header.height, raw=True).astype(np.float64) / maxval
    u, target = postfilter.on_device(u, pixels, device)  # on CUDA the least-squares sums are made there
    thresholds = postfilter.thresholds_for(u, plan.filter_classes) if plan.filter_classes > 1 else ()
    cls = postfilter.classes(u, thresholds) if thresholds else None
    rows = postfilter.row_step(*pixels.shape[:2])  # the choices on every rows-th row, the coefficients on all
    dirs = postfilter.select(u, target, plan.filter_taps, cls, len(thresholds) + 1, step=rows)[0]
    if thresholds:  # neighbours chosen on equal classes; classes split where they help most, clear of pixels
        thresholds = postfilter.clear_of_pixels(u, postfilter.split(u, target, dirs, plan.filter_classes, step=rows))
        cls = postfilter.classes(u, thresholds)
    sums = postfilter.normal_equations(u, target, dirs, cls, len(thresholds) + 1)
    mix, taps, offset = postfilter.solve(*sums)
    quantised = [[_quantise_tensor(t, s) for t, s in zip((mix, taps, offset), steps)] for steps in FILTER_STEPS]
    candidates = [[sym * step for step, _, sym in q] for q in quantised]
    # Rounded coefficients ranked by the error they remove from the exact sums; the best checked on the rounded,
    # clamped output against none. (Their removed errors differed by ~1e-5 of the image's, NOTES.md #201.)
    removed = postfilter.removed_error(*sums, candidates)
    order = [k for k in np.argsort(-removed, kind="stable") if removed[k] > 0]
    if not order:
        return data
    zero = [np.zeros_like(t) for t in (mix, taps, offset)]
    none, best = postfilter.squared_errors(u, target, [zero, candidates[order[0]]], maxval, dirs, cls)
    if best >= none:
        return data
    arch = dataclasses.replace(f.header.arch, filter_mask=postfilter.mask_of(dirs), filter_thresholds=thresholds)
    header = dataclasses.replace(f.header, arch=arch)
    n = len(f.codings)
    shapes = [s for _, s in arch.tensor_shapes()[:n]]
    flat = entropy.decode(f.stream, f.codings, [int(np.prod(s)) for s in shapes], f.header.arch.sine_layers(), arch.pe_dim)
    syms = [s.reshape(shape) for s, shape in zip(flat, shapes)]
    for k in order:
        q = quantised[k]
        codings = f.codings + [_coding(n + j, sym, step, qmax)[0] for j, (step, qmax, sym) in enumerate(q)]
        out = _file(header, codings, syms + [sym for _, _, sym in q], plan.metadata)
        if len(out) <= plan.total:
            return out
    return data


def quantise(model, target, plan: Plan, cfg: FitConfig,
             effort: Effort = EFFORTS[5]) -> tuple[bytes, list[TensorCoding]]:
    """The file of `model` within the plan's budget and its codings: steps proportional to each
    tensor's rms, then (cfg.rd_steps) re-allocated by distortion measured as the effort says (Effort.alloc_pixels,
    Effort.alloc_change, Effort.alloc_control)."""
    tensors = _tensors(model)
    scales = None
    if cfg.rd_steps:  # the ladder is centred on the uniform allocation's factor (an estimate suffices)
        factor = _estimate_factor(plan.header, tensors, plan.budget, plan.metadata)
        scales = allocate_steps(model, target, plan.header, plan.budget, plan.metadata, factor, effort.alloc_pixels,
                                effort.alloc_change, effort.alloc_control)
    _, data, codings, _ = rate_control(plan.header, tensors, plan.budget, plan.metadata, scales)
    return data, codings


def tuned_file(model, plan: Plan, codings: list[TensorCoding]) -> bytes:
    """The file of weights tuned at `codings`' steps (each tensor's decay fitted again); it may exceed the budget."""
    from .quant import symbols

    syms, new_codings = [], []
    for i, ((_, t), c) in enumerate(zip(model.named_tensors(), codings)):
        sym = symbols(t, c.step, c.qmax).cpu().numpy()
        syms.append(sym)
        new_codings.append(_coding(i, sym, c.step, c.qmax)[0])
    return _file(plan.header, new_codings, syms, plan.metadata)


def tune_and_code(fitter: Fitter, plan: Plan, codings: list[TensorCoding], untuned: bytes, fit_state,
                  bar=None, tuned: bool = False) -> bytes:
    """Quantisation-aware tuning at `codings`' steps (skipped when `tuned`: the model already is), then the file.

    The rate control fills a file to its last 32-bit word of stream, and tuned weights may cost a few bits more
    and need one word more. Rounding them again at other steps undoes the tuning (a crop at 0.6 bpp came out
    0.47 dB below its tuned weights, worse than untuned; NOTES.md #134), so the fit (`fit_state`) is quantised
    again for a budget that much smaller, with the same allocation a little coarser, and tuned again. If that
    never fits, the `untuned` file of `codings`, which does."""
    budget = plan.budget
    for attempt in range(3):
        if attempt or not tuned:
            _quantisation_aware_tuning(fitter, codings, bar if attempt == 0 and bar else _NoBar())
        data = tuned_file(fitter.model, plan, codings)
        if len(data) <= plan.budget:
            return data
        budget -= len(data) - plan.budget + 4  # the overflow and a word to spare
        fitter.model.load_state_dict(fit_state)
        codings = rate_control(plan.header, _tensors(fitter.model), budget, plan.metadata, [c.step for c in codings])[2]
    return untuned


def score(data: bytes, pixels: np.ndarray, maxval: int, fit_pixels: np.ndarray | None, device: str, seconds: float,
          arch: Architecture) -> EncodeResult:
    """The EncodeResult of a finished file: PSNR of what a decoder will see, at the input's bit depth (fit_pixels
    None: not measured, no decode)."""
    from .render import decode_array

    h, w = pixels.shape[:2]
    if fit_pixels is None:
        return EncodeResult(data, len(data) * 8 / (w * h), None, seconds, None, arch)
    ref = np.round(pixels * maxval)
    psnr = _psnr(decode_array(data, device=device), ref, maxval)
    return EncodeResult(data, len(data) * 8 / (w * h), psnr, seconds, _psnr(fit_pixels, ref, maxval), arch)


# ---- an image of one colour ------------------------------------------------------------------------

# Output-bias steps to try, coarse first: 2^-10 puts any 8-bit level within 1/16 of a level; a 16-bit level needs a
# step near 2^-15, where symbols reach MAX_QMAX, so the bfloat16 steps from there up are tried until one lands.
_CONSTANT_STEPS = [2.0**-10] + [2.0**e * (1 + m / 128) for e in (-15, -14) for m in range(128)]


def constant_file(image, metadata: dict, budget: int | None, cfg: FitConfig) -> bytes | None:
    """The file of an image whose every pixel is one colour (a blank page, a flat background, an empty tile): the
    smallest network, its weights 0 and its output bias that colour, which decodes exactly at every size, in ~70
    bytes and no fitting. A fit spent the whole budget on it (4030 bytes at 256x256 and 0.5 bpp, ~760 KB at
    4032x3024, where it took 48x a 768x512 encode's time). None for any other image, or where even this exceeds
    `budget` bytes (None: any)."""
    if image.width < 1 or image.height < 1:
        return None  # plan_encode says why
    try:
        bands = image.getextrema()
    except ValueError:  # Pillow has none for I;16B, I;16L, I;16N
        bands = image.convert("I").getextrema()
    if any(lo != hi for lo, hi in (bands if isinstance(bands[0], tuple) else (bands,))):
        return None
    pixel, mode, maxval = prepare_image(image.crop((0, 0, 1, 1)))  # OSError for a mode NIF cannot hold
    data = one_colour_file(image.width, image.height, mode, np.round(pixel * maxval).ravel(), maxval, metadata, cfg)
    return data if data is not None and (budget is None or len(data) <= budget) else None


def one_colour_file(w: int, h: int, mode: str, level: np.ndarray, maxval: int, metadata: dict,
                    cfg: FitConfig) -> bytes | None:
    """The file of a w x h image of `mode` whose every pixel is `level` (one integer a channel): constant_file's
    network; None where no step of _CONSTANT_STEPS lands on every channel's level."""
    from .render import load_network, render

    value = level / maxval * 2 - 1  # the network's output space
    arch = dataclasses.replace(choose_architecture(w, h, len(value), 1, cfg), widths=(1,), pe_freqs=0)
    header = Header(w, h, mode, bitstream.COLOUR_IDENTITY, arch)
    metadata = {k: bytes(v) for k, v in metadata.items() if v and k != "alpha_ends"}  # nothing fitted to snap
    shapes = [int(np.prod(s)) for _, s in arch.tensor_shapes()]
    for step in _CONSTANT_STEPS:
        bias = np.round(value / step).astype(np.int64)
        if np.abs(bias).max() > bitstream.MAX_QMAX or not np.array_equal(
                np.round((bias * step + 1) / 2 * maxval), level):
            continue
        codings = [TensorCoding(step, 0, bitstream.MODEL_UNIFORM, 0)] * (len(shapes) - 1)
        codings.append(TensorCoding(step, int(np.abs(bias).max()), bitstream.MODEL_UNIFORM, 0))
        syms = [np.zeros(n, np.int64) for n in shapes[:-1]] + [bias]
        data = _file(header, codings, syms, metadata)
        # every pixel of the network is the same: one pixel of it checks them all (a decode at 1x1 would render the
        # stored size to resize it); on the CPU, where no kernel is compiled for it
        if np.array_equal(render(load_network(bitstream.loads(data)), 1, 1).ravel(), level):
            return data
    return None


# A fitted file is checked against its image's mean colour where decoding it costs at most this many
# multiply-adds (parameters x pixels; ~30 ms on one core of this project's CPU), which covers every network small
# enough to lose to one colour.
FLAT_CHECK_WORK = 1 << 26


def no_worse_than_flat(data: bytes, pixels: np.ndarray, maxval: int, plan: Plan, device: str, cfg: FitConfig,
                       fit_pixels: np.ndarray | None = None) -> tuple[bytes, Architecture, np.ndarray | None]:
    """(`data`, plan's architecture, `fit_pixels`), or the file of the image's mean colour (one_colour_file), its
    architecture and its pixels (the file's fit, then: no network of it was fitted) where that file fits the budget
    and decodes closer to the image. A network of a few dozen parameters, all that ~80-100 bytes buy, can fit worse
    than no network at all: 16x16 and 32x32 Kodak crops at the bpp quality asked for until session 82 (2.4-3.9 bpp
    at 16x16, 0.6-0.8 at 32x32) gave 20 of 48 effort-5 files up to 4.1 dB below their mean colour's (NOTES.md #245)."""
    h, w, _ = pixels.shape
    kept = data, plan.header.arch, fit_pixels
    if plan.header.arch.num_params() * w * h > FLAT_CHECK_WORK:
        return kept
    level = np.round(pixels.reshape(-1, pixels.shape[2]).mean(0) * maxval)
    flat = one_colour_file(w, h, plan.header.mode, level, maxval, plan.metadata, cfg)
    if flat is None or len(flat) > (plan.total or plan.budget):
        return kept
    ref = np.round(pixels * maxval)
    flat_pixels = np.broadcast_to(level, pixels.shape)  # what it decodes to: one_colour_file checked its level
    if np.mean((flat_pixels - ref) ** 2) < np.mean((_small_render(data).reshape(pixels.shape) - ref) ** 2):
        return flat, bitstream.loads(flat).header.arch, None if fit_pixels is None else flat_pixels
    return kept


def _small_render(data: bytes) -> np.ndarray:
    """The decoded pixels (float64) of a file whose network is small (FLAT_CHECK_WORK), rendered by torch on the CPU
    on any encode device: no Triton kernel compiled for it on CUDA (one per architecture), a few milliseconds here."""
    from .render import render_file

    return render_file(bitstream.loads(data), None, "cpu", "torch").astype(np.float64)


def least_bpp(nbytes: int, w: int, h: int) -> float:
    """The smallest bpp, to 0.01, whose budget (rounded as encoding rounds it) holds `nbytes` for a w x h image."""
    least = math.ceil(nbytes * 800 / (w * h)) / 100
    while int(least * w * h // 8) < nbytes:  # the budget's own rounding, in floats
        least = round(least + 0.01, 2)
    return least


def constant_result(image, metadata: dict, target_bpp: float | None, cfg: FitConfig,
                    progress=False) -> EncodeResult | None:
    """encode_image's result for an image of one colour (constant_file), else None; ValueError where even that
    file exceeds the budget (a fitted network's would too: this is the smallest). target_bpp None: quality's, which
    asks for no more than the file needs."""
    t0 = time.perf_counter()
    w, h = image.size
    data = constant_file(image, metadata, None, cfg)
    if data is None:
        return None
    if target_bpp is not None and len(data) > (budget := int(target_bpp * w * h // 8)):
        raise ValueError(f"bpp={target_bpp} gives {budget} bytes for a {w}x{h} image, but this image of one colour "
                         f"is a {len(data)}-byte file: ask for bpp >= {least_bpp(len(data), w, h):g}")
    if callable(progress):  # done at once (a bar would only flash)
        progress(1, 1)
    arch = bitstream.loads(data).header.arch
    return EncodeResult(data, len(data) * 8 / (w * h), math.inf, time.perf_counter() - t0, math.inf, arch)


def encode_image(image, bpp=None, quality=None, effort=5, device="auto", seed=0, progress=False,
                 icc_profile=None, exif=None, xmp=None, colour="auto", config: FitConfig | None = None,
                 measure: bool = True, exact: bool = False) -> EncodeResult:
    """Fit, quantise and code `image` (a PIL image); the result's `data` is the .nif file. `measure`: also render
    the fit and decode the file for the result's PSNRs. Callers that keep only the bytes (pillow_nif.encode,
    Image.save) skip both: at 768x512 on this project's CPU 0.8-1.8 s of each encode, and on CUDA the decode's
    Triton kernel is compiled for each new architecture. `exact`: fit the colours under an alpha of 0 as they are
    (imaging.fill_hidden replaces them otherwise; the result's PSNRs are then against the filled image)."""
    target_bpp, effort, device = check_encode_options(bpp, quality, effort, device, seed, colour, exact, progress)
    seed = int(seed)  # a NumPy integer too
    cfg = config or FitConfig()
    t0 = time.perf_counter()
    eff = effort_for(effort, *image.size, cfg)
    image, alpha = split_constant_alpha(image if exact else fill_hidden(image))
    metadata = metadata_of(image, icc_profile, exif, xmp, alpha)
    flat = constant_result(image, metadata, target_bpp, cfg, progress)
    if flat is not None:  # one colour: one network at any size, nothing to fit
        return flat
    if target_bpp is None:
        target_bpp = quality_bpp(image, quality, metadata, colour, cfg)
    if tile_grid(*image.size, cfg.tile_pixels) != (1, 1):
        from .tiles import encode_tiled

        return encode_tiled(image, target_bpp, effort, device, seed, progress, metadata, colour, cfg, measure)
    plan = plan_encode(image, target_bpp, colour, metadata, cfg, eff)
    pixels, _, maxval = prepare_image(image)  # (H, W, C) float64 in [0, 1]
    bar = _progress(progress, fit_work(plan.header, eff, cfg))
    try:
        with on_device(device):  # CUDA's current device: where Triton launches and CUDA graphs capture
            data, fit_pixels, loss = _fit_and_code(pixels, maxval, plan, device, eff, cfg, seed, bar, measure)
            data, fit_pixels, plan = refit(data, fit_pixels, loss, plan, lambda c: plan_encode(
                image, target_bpp, colour, metadata, c, eff), pixels, maxval, device, eff, cfg, seed, bar, measure)
            data, arch, fit_pixels = no_worse_than_flat(data, pixels, maxval, plan, device, cfg, fit_pixels)
    finally:
        bar.close()
    return score(data, pixels, maxval, fit_pixels, device, time.perf_counter() - t0, arch)


def _fit_and_code(pixels: np.ndarray, maxval: int, plan: Plan, device: str, eff: Effort, cfg: FitConfig, seed: int,
                  bar, measure: bool) -> tuple[bytes, np.ndarray | None, float]:
    """The file of one fit of plan's network, the fit's rendered pixels (measure) and what rounding cost: the coded
    network's network-space PSNR below the fit's, in dB (before the post-filter)."""
    fitter, gain, fit_mse = fit_network(pixels, plan, device, eff, cfg, seed, bar)
    fit_pixels = _render_model(fitter.model, plan.header, maxval, gain.gain) if measure else None
    data, loss = code_network(fitter, gain, fit_mse, pixels, maxval, plan, device, eff, cfg, bar)
    return data, fit_pixels, loss


def fit_network(pixels: np.ndarray, plan: Plan, device: str, eff: Effort, cfg: FitConfig, seed: int,
                bar) -> tuple[Fitter, OutputGain, float]:
    """One fit of plan's network to `pixels` ((H, W, C) in [0, 1]): the Fitter, its model fitted to gain x the
    network-space target (the centre already in the output bias), the OutputGain and the fit's MSE."""
    from .colour import to_network_space

    target = to_network_space(pixels, plan.header.colour)
    gain = OutputGain.of(target, cfg)
    fitter = Fitter(gain.normalise(target), plan.header.arch, device, eff, cfg, seed)
    fit_mse = fitter.fit(bar.update)
    fitter.shift_output(gain.offsets)  # from here on the network fits gain x the target
    return fitter, gain, fit_mse


def code_network(fitter: Fitter, gain: OutputGain, fit_mse: float, pixels: np.ndarray, maxval: int, plan: Plan,
                 device: str, eff: Effort, cfg: FitConfig, bar) -> tuple[bytes, float]:
    """The file of fit_network's fit (the fitter's model is tuned in place) and what rounding cost, in dB (network
    space, before the post-filter). benchmarks/cached_fit.py calls it on copies of one fit."""
    # Quantisation-aware tuning at the steps the rate control picks, then a final rate check.
    data, codings = quantise(fitter.model, fitter.target, plan, cfg, eff)
    if eff.qat_stages:
        data = tune_and_code(fitter, plan, codings, data, fitter.state(), bar)
    loss = rounding_loss(data, fitter.model, fitter.target, fit_mse, fitter.mse_stride)
    data = scale_output_steps(data, gain.gain)
    return add_alpha_ends(add_post_filter(data, pixels, maxval, plan, device), pixels, device), loss


def rounding_loss(data: bytes, model, target, fit_mse: float, stride: int = 1) -> float:
    """How many dB the network `data` stores (before any post-filter) is below the fit `model` of `target`, whose
    MSE is fit_mse (network space; both over every stride-th row and column)."""
    coded = image_mse(model, target, _file_weights(data, model), stride)
    return 10 * math.log10(coded / fit_mse) if fit_mse > 0 else math.inf


def refit(data: bytes, fit_pixels, loss: float, plan: Plan, replan: Callable[[FitConfig], Plan], pixels: np.ndarray,
          maxval: int, device: str, eff: Effort, cfg: FitConfig, seed: int, bar, measure: bool):
    """(data, fit_pixels, plan) as given, or those of a second fit of the network replan() picks at
    cfg.refit_bits more bits a parameter, where rounding cost more than cfg.refit_loss dB (`loss`) and the second
    file decodes closer to the image (FitConfig.refit_loss)."""
    if not loss > cfg.refit_loss:
        return data, fit_pixels, plan
    bigger = dataclasses.replace(cfg, bits_per_param=cfg.bits_per_param + cfg.refit_bits,
                                 large_bits_per_param=cfg.large_bits_per_param + cfg.refit_bits)
    other = replan(bigger)
    if other.header.arch == plan.header.arch:
        return data, fit_pixels, plan
    bar.total += fit_work(other.header, eff, bigger)  # the progress counts both fits
    again, again_pixels, _ = _fit_and_code(pixels, maxval, other, device, eff, bigger, seed, bar, measure)
    if _file_mse(again, pixels, maxval, device) < _file_mse(data, pixels, maxval, device):
        return again, again_pixels, other
    return data, fit_pixels, plan


def _file_weights(data: bytes, model) -> dict:
    """The network's tensors as `data` stores them (symbols times steps), by name, on the model's device."""
    import torch

    f = bitstream.loads(data)
    names = model.named_tensors()
    flat = entropy.decode(f.stream, f.codings, [t.numel() for _, t in names], f.header.arch.sine_layers(),
                          f.header.arch.pe_dim)
    return {n: torch.from_numpy(sym * c.step).to(t).reshape(t.shape) for (n, t), sym, c in zip(names, flat, f.codings)}


def _file_mse(data: bytes, pixels: np.ndarray, maxval: int, device: str) -> float:
    """MSE of the decoded file against the image (pixels in [0, 1]), in the image's levels."""
    from .render import decode_array

    return float(np.mean((decode_array(data, device=device).astype(np.float64).reshape(pixels.shape)
                          - np.round(pixels * maxval)) ** 2))


def _psnr(a: np.ndarray, ref: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64).reshape(ref.shape) - ref) ** 2))
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf


def _render_model(model, header: Header, maxval: int, gain: float = 1.0) -> np.ndarray:
    """The pixels of `model`, a network fitted to `gain` x its target (OutputGain)."""
    from .model import fold
    from .render import render

    weights = dict(model.named_tensors())
    out = len(header.arch.widths)
    for k in (f"genesis.{out}.weight", f"genesis.{out}.bias"):
        weights[k] = weights[k] / gain
    net = fold(model, header.colour, float(maxval), weights)
    return render(net, header.width, header.height)


def fake_quantized(model, codings: list[TensorCoding]) -> dict:
    """The model's tensors through a straight-through quantiser at `codings`' steps (for NIF.forward)."""
    from .quant import fake_quantize

    return {n: fake_quantize(t, c.step, c.qmax) for (n, t), c in zip(model.named_tensors(), codings)}


def _quantisation_aware_tuning(fitter: Fitter, codings: list[TensorCoding], bar) -> None:
    """Tune the weights through a straight-through quantiser at `codings`' steps; keep the best quantised state."""
    e = fitter.effort

    def quantised():
        return fake_quantized(fitter.model, codings)

    best = (fitter.mse(quantised()), fitter.state())
    for _ in range(e.qat_stages):
        fitter.run_stage(fitter.qat_iters, fitter.qat_lr, bar.update, quantised)
        mse = fitter.mse(quantised())
        if mse < best[0]:
            best = (mse, fitter.state())
    fitter.model.load_state_dict(best[1])


class _NoBar:
    total = 0  # what the steps come to (encode_image adds a refit's)

    def update(self, n=1):
        pass

    def close(self):
        pass


class _CallbackBar(_NoBar):
    def __init__(self, fn, total):
        self.fn, self.total, self.done = fn, total, 0

    def update(self, n=1):
        self.done += n
        self.fn(self.done, self.total)


def _progress(progress, total):
    if callable(progress):
        return _CallbackBar(progress, total)
    if progress:
        from tqdm import tqdm

        return tqdm(total=total, desc="fitting", unit="it", leave=False)
    return _NoBar()
