"""The fitting step replayed from CUDA graphs: fit.Fitter.run_stage's body in two launches instead of ~150.

A NIF training step is ~150 small kernels: the sine layers and their written-out backward (subgrid.py), the loss,
gradient clipping, Muon's Newton-Schulz iterations and AdamW. Each does microseconds of work and costs more than
that to launch from Python: on an H200 a step of the 1.0 bpp kodim23 network took 5.60 ms over 98k pixels, ~13 %
of the GPU's fp32 rate, so effort 5's 8000 steps were bound by launches rather than arithmetic (an inference: no
profile was taken; benchmarks/NOTES.md round 43). A CUDA graph records the kernels once and replays them with one
call, with no Python between them.

A graph replays fixed kernels on fixed memory, so whatever changes between steps lives in tensors made once: the
drawn rows, columns and loss weights (sampling.py) are copied into buffers before each replay, and the learning
rate is a 0-d tensor on the device that the optimisers read at each replay (optim.py). The gradients are the ones
the captured backward allocated; each replay rewrites them. There are two graphs: forward, backward and clipping,
then the optimisers' update. Between them the collapse guard (fit.CollapseGuard) runs as in the eager loop,
since every `window` steps it reads the losses on the host and may restore weights, gradients and moments (in
place, so the graphs see them).

With `capture=False` the same body runs eagerly on the same buffers, at the eager loop's Python-float rate: the CPU
tests hold it to the eager loop's weights bit for bit (tests/test_stepgraph.py), which tests the buffers and the
order of a step without a GPU. With the rate on the device the fits drift apart by rounding alone (an effort-1
encode of a 96x64 image: -0.11 dB at 1.0 bpp, +0.12 at 2.0, both within the fit's noise). What only a GPU
can show is whether the capture holds: a kernel that syncs with the host, or a copy from host memory, inside the
body fails the capture. Then the stage goes on uncaptured on the same buffers, with a warning.
"""

from __future__ import annotations

import warnings


class StepGraph:
    """One fitting or tuning stage's steps (fit.Fitter.run_stage): `gradients(lr, left)`, the guard, `update()`.

    `fitter` must sample its steps from its importance sampler or see the whole image (fixed shapes: `graphable`).
    """

    WARM = 3  # eager steps before the capture (on a side stream, as torch's docs ask): cuBLAS's workspaces,
    # the optimisers' state and Muon's stacks are made there, not inside the graph

    def __init__(self, fitter, opt, capture: bool, device_rate: bool | None = None, weights_fn=None):
        import torch

        self.torch, self.fitter, self.opt, self.capture = torch, fitter, opt, capture
        self.weights_fn = weights_fn  # quantisation-aware tuning: the tensors the step evaluates, made in the body
        self.device = fitter.target.device
        # The rate as a 0-d tensor on the device (float32, as torch's fused AdamW reads one) where a graph must read
        # it at each replay; uncaptured steps keep the Python float, and then train bit for bit as the eager loop.
        self.lr = None
        if capture if device_rate is None else device_rate:
            self.lr = torch.zeros((), device=self.device, dtype=torch.float32)
            for g in opt.param_groups:
                g["lr"] = self.lr
        self.draw = None  # the step's drawn (rows, cols, weights), copied in before each step
        self.losses = None  # the step's per-image losses, written by each step
        self.steps = 0
        self.graphs = None  # (forward-backward, update) once captured
        self.side = None  # the warm-up's stream

    @staticmethod
    def graphable(fitter) -> bool:
        """Whether every step of `fitter` has the same shapes: drawn samples, or the whole image (stride 1). A
        strided grid from a random phase (no sampler) has fewer rows at some phases."""
        return fitter.sampler is not None or fitter.stride == 1

    def gradients(self, lr: float, left: int):
        """The next step's gradients at rate `lr` (`left`: the steps the stage will still take, for the draws
        made ahead); returns the step's per-image losses (a copy: the buffer is rewritten by the next step)."""
        torch, f = self.torch, self.fitter
        if self.lr is not None:
            self.lr.fill_(lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr
        if f.sampler is not None:
            drawn = list(f.sampler.draw(left))
            if self.draw is None:
                self.draw = [t.clone() for t in drawn]
            else:
                torch._foreach_copy_(self.draw, drawn)
        if self.capture and self.graphs is None and self.steps == self.WARM:
            self._capture()
        if self.graphs is not None:
            self.graphs[0].replay()
        else:
            with self._warm_stream():
                self.opt.zero_grad()
                self._forward_backward()
        return self.losses.clone()

    def update(self):
        """The optimisers' step on the gradients of `gradients` (as the guard left them)."""
        if self.graphs is not None:
            self.graphs[1].replay()
        else:
            with self._warm_stream():
                self.opt.step()
        self.steps += 1

    def _forward_backward(self):
        """The graph's first body: loss, backward and clipping on the buffers; the losses into self.losses."""
        f = self.fitter
        rows, cols = f.use_draw(*self.draw) if f.sampler is not None else f.sample()
        loss = f.loss(rows, cols, self.weights_fn() if self.weights_fn is not None else None)
        loss.backward()
        f.clip_gradients()
        losses = f.image_losses(loss)
        if self.losses is None:
            self.losses = losses.clone()
        else:
            self.losses.copy_(losses)

    def _warm_stream(self):
        """The context of an uncaptured step: a side stream before a capture, as torch.cuda.graph's docs ask."""
        import contextlib

        torch = self.torch
        if not self.capture:
            return contextlib.nullcontext()
        if self.side is None:
            self.side = torch.cuda.Stream(self.device)
        self.side.wait_stream(torch.cuda.current_stream(self.device))

        @contextlib.contextmanager
        def on_side():
            with torch.cuda.stream(self.side):
                yield
            torch.cuda.current_stream(self.device).wait_stream(self.side)

        return on_side()

    def _capture(self):
        """Records both bodies. The captured backward allocates the gradients in the graph's pool; they stay the
        parameters' .grad, rewritten at each replay (so nothing may set them to None until the stage ends)."""
        torch = self.torch
        self.opt.zero_grad()
        try:
            backward, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # thread_local: the capture forbids host syncs in this thread only. torch's default ("global") would
            # fail any other thread's sync meanwhile, such as a decode's copy of its pixels to the host.
            with torch.cuda.graph(backward, capture_error_mode="thread_local"):
                self._forward_backward()
            with torch.cuda.graph(update, pool=backward.pool(), capture_error_mode="thread_local"):
                self.opt.step()
        except Exception as e:  # noqa: BLE001  (any failure to capture: the stage goes on uncaptured)
            warnings.warn(f"pillow_nif: the training step could not be captured as a CUDA graph ({e!r}); "
                          "fitting without graphs", RuntimeWarning, stacklevel=3)
            self.capture = False
            self.opt.zero_grad()
            return
        self.graphs = (backward, update)


__all__ = ["StepGraph"]
