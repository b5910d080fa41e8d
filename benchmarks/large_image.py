"""Large images: peak memory and time of encoding, decoding and thumbnailing a mosaic of Kodak images.

    python benchmarks/large_image.py --tiles 5 --effort 1 --bpp 0.3      # 3840x2560, about 10 MP

Each phase runs in its own process so that its peak RSS (and, on CUDA, peak GPU memory) is its own. The decode
also reports PSNR, and for a tiled file (images over 768x768, tiles.py) the PSNR of the pixels within the margin of a
tile's inner edge (where tiles are blended) and of the others; the thumbnail (256 pixels, from the stored size:
render.render_file) its PSNR against the mosaic's own thumbnail.
Prints one JSON object; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KODAK = pathlib.Path(os.environ.get("PILLOW_NIF_SHARED") or ROOT.parent / "shared") / "datasets" / "kodak"

PHASE = r"""
import json, resource, sys, time
import pillow_nif
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
phase, src, dst, bpp, effort, device = sys.argv[1:7]
pillow_nif.register(device=device)
t = time.perf_counter()
out = {}
if phase == "encode":
    with Image.open(src) as im:
        im.save(dst, bpp=float(bpp), effort=int(effort), device=device)
elif phase == "decode":
    with Image.open(src) as im:
        im.load()
        out["size"] = im.size
    out["seconds"] = time.perf_counter() - t
    if dst != "-":  # the image it encodes: PSNR, also near the tiles' edges (within their margin) and away from them
        import numpy as np
        from pillow_nif import bitstream
        err = (np.asarray(im, dtype=np.float64) - np.asarray(Image.open(dst).convert("RGB"), dtype=np.float64)) ** 2
        psnr = lambda e: float(10 * np.log10(255**2 / e.mean()))
        out["psnr"] = psnr(err)
        data = open(src, "rb").read()
        if data[7] == bitstream.TILED_VERSION:
            g = bitstream.loads(data).grid
            m = max(g.margin, 1)
            near = np.zeros(err.shape[:2], bool)
            for x0, y0, x1, y1 in g.boxes():
                if x0: near[:, x0 - m : x0 + m] = True
                if y0: near[y0 - m : y0 + m, :] = True
            out |= {"tiles": [g.columns, g.rows], "margin": g.margin, "psnr_near_tile_edges": psnr(err[near]),
                    "psnr_elsewhere": psnr(err[~near]), "share_near_tile_edges": float(near.mean())}
else:  # the stored size rendered and resized (render.render_file): PSNR against the original's thumbnail
    with Image.open(src) as im:
        im.thumbnail((256, 256))
        out["size"] = im.size
    out["seconds"] = time.perf_counter() - t
    if dst != "-":
        import numpy as np
        ref = Image.open(dst).convert("RGB")
        ref.thumbnail((256, 256))
        mse = np.mean((np.asarray(im, dtype=np.float64) - np.asarray(ref, dtype=np.float64)) ** 2)
        out["psnr"] = float(10 * np.log10(255**2 / mse))
out.setdefault("seconds", time.perf_counter() - t)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    import torch
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
except ImportError:
    pass
print(json.dumps(out))
"""


def mosaic(tiles: int, path: pathlib.Path) -> tuple[int, int]:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted(KODAK.glob("kodim*.png"))]
    images = [im for im in images if im.width > im.height] or images
    w, h = images[0].size
    out = Image.new("RGB", (w * tiles, h * tiles))
    for i in range(tiles * tiles):
        out.paste(images[i % len(images)], ((i % tiles) * w, (i // tiles) * h))
    out.save(path)
    return out.size


def run(phase: str, *args) -> dict:
    res = subprocess.run([sys.executable, "-c", PHASE, phase, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{phase} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=5)
    p.add_argument("--bpp", type=float, default=0.3)
    p.add_argument("--effort", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if not KODAK.exists():
        raise SystemExit(f"needs the Kodak images in {KODAK}")
    with tempfile.TemporaryDirectory() as tmp:
        png, nif = pathlib.Path(tmp) / "mosaic.png", pathlib.Path(tmp) / "mosaic.nif"
        size = mosaic(a.tiles, png)
        common = (a.bpp, a.effort, a.device)
        enc = run("encode", png, nif, *common)
        enc["bpp"] = nif.stat().st_size * 8 / (size[0] * size[1])
        dec = run("decode", nif, png, *common)
        thumb = run("thumbnail", nif, png, *common)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "time": time.strftime("%F %T")},
        "image": {"size": size, "megapixels": size[0] * size[1] / 1e6},
        "options": vars(a),
        "encode": enc,
        "decode": dec,
        "thumbnail": thumb,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
