#!/usr/bin/env python
"""Rate-distortion benchmark: pillow-nif against JPEG, WebP, AVIF and JPEG XL at matched rates.

    python benchmarks/rd.py --dataset kodak-crop256 --bpp 0.3 0.6 1.0
    python benchmarks/rd.py --dataset kodak --codecs nif,webp,avif --effort 5 --device cuda
    python benchmarks/rd.py --dataset path/to/pngs --only img1,img2 --codecs jpeg,jxl
    python benchmarks/rd.py --dataset kodak-crop256 --jobs 2          # 2 processes
    python benchmarks/rd.py --dataset kodak --device cuda --batch 12  # NIF by encode_many, 12 images a call

Datasets: `kodak` (../shared/datasets/kodak, 768x512), `kodak-crop256` (their 256x256 centre crops) or a folder of
PNGs; every image is converted to RGB first.  Every codec writes a real file and its rate is the file's size on disk * 8 / (w * h).  pillow-nif is driven through
Pillow (`Image.save(path, bpp=target, effort=...)`, `Image.open(path)`), so the harness measures exactly what a user
gets.  The classical codecs get, per image and target, the highest integer quality whose file fits in
floor(target * w * h / 8) bytes (binary search; a record is flagged `over_target` when even the lowest quality does
not fit).  Encode time is one encode at the chosen quality (the search is not timed), decode time one open + load.

Metrics: RGB PSNR on 8-bit values, averaged two ways and labelled (mean of per-image PSNR; PSNR of the mean MSE),
MS-SSIM (pytorch-msssim, data_range 255, NaN when a side is <= 160 px), achieved bpp, encode/decode seconds.

BD-rate / BD-PSNR (Bjontegaard, VCEG-M33): on each codec's mean curve (mean bpp, mean per-image PSNR per target),
fit a polynomial of log(rate) in PSNR (BD-rate) and of PSNR in log(rate) (BD-PSNR) with numpy.polyfit, integrate
with numpy.polyint over the interval both curves cover, and compare the averages.  The degree is 3 (the standard
cubic) when a curve has >= 4 points and n_points - 1 otherwise, so the default three targets give an exact
quadratic through the points.  Negative BD-rate / positive BD-PSNR means better than the reference.

Outputs, in --out (default benchmarks/results/<dataset>/), named <name>.json / .md / .png:
  JSON: machine, versions, git commit, options, one record per (image, codec, target), aggregates, BD tables.
        It is rewritten after every (image, target); a rerun with the same --name (default from NIF's effort,
        device, seed) skips the records already there, so an interrupted run (Ctrl-C, SIGTERM) resumes and more
        images/targets/codecs can be added.
  PNG:  PSNR and MS-SSIM against bpp, one line per codec; on full-size `kodak` also published anchors (dashed)
        from ../shared/anchors/kodak_published.json.
  MD:   per codec and target: bpp, PSNR (both averages), MS-SSIM, enc/dec time; then the BD tables.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, features

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PILLOW_NIF_SHARED") or ROOT.parent / "shared")  # elsewhere on a lent GPU machine
KODAK = SHARED / "datasets" / "kodak"
ANCHORS = SHARED / "anchors" / "kodak_published.json"
# Published curves drawn on full-size Kodak; those of a measured codec share its colour.
ANCHOR_METHODS = {"NIF (2023)": "nif", "JPEG": "jpeg", "WebP": "webp", "AVIF": "avif", "JPEG XL": "jxl",
                  "NIF25 (psnr)": None, "COIN": None, "Cool-chic v3.1": None, "BPG": None}
BD_REFERENCES = ["jpeg", "webp", "avif"]  # JPEG: the floor of the RD issue
MSSSIM_MIN_SIDE = 161  # 5 scales of an 11-tap window need a side > (11 - 1) * 2**4


# --------------------------------------------------------------------------------------------------------- codecs
class Codec:
    """One codec: `encode` writes `path` at (or under) `bpp` and returns extra fields for the record."""

    name = ""
    ext = ""
    params: dict = {}

    def unavailable(self) -> str | None:
        """None when the codec can run, else the reason it cannot."""
        return None

    def version(self) -> str | None:
        return None

    def encode(self, img: Image.Image, bpp: float, path: Path) -> dict:
        raise NotImplementedError

    def decode(self, path: Path) -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() loads the pixels


class PillowCodec(Codec):
    """A codec with an integer quality knob, rate-matched by binary search over it."""

    format = ""
    q_range = (0, 100)

    def encode_bytes(self, img: Image.Image, q: int) -> bytes:
        buf = io.BytesIO()
        img.save(buf, self.format, quality=q, **self.params)
        return buf.getvalue()

    def encode(self, img, bpp, path):
        budget = math.floor(bpp * img.width * img.height / 8)
        size = {}

        def fits(q):
            if q not in size:
                size[q] = len(self.encode_bytes(img, q))
            return size[q] <= budget

        lo, hi = self.q_range
        if fits(hi):
            q = hi
        elif not fits(lo):
            q = lo  # cannot reach the target: keep the smallest file, flagged over_target in the record
        else:  # invariant: fits(lo) and not fits(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            q = lo
        t0 = time.perf_counter()
        data = self.encode_bytes(img, q)
        enc_s = time.perf_counter() - t0
        path.write_bytes(data)
        return {"q": q, "enc_s": enc_s, "search_encodes": len(size)}


class JPEG(PillowCodec):
    name, ext, format, q_range = "jpeg", ".jpg", "JPEG", (1, 100)
    params = {"optimize": True}  # Pillow's default 4:2:0 subsampling; Huffman tables optimised

    def version(self):
        return features.version("jpg")


class WebP(PillowCodec):
    name, ext, format = "webp", ".webp", "WEBP"
    params = {"method": 6}  # slowest, best compression

    def unavailable(self):
        return None if features.check("webp") else "Pillow built without WebP"

    def version(self):
        return features.version("webp")


class AVIF(PillowCodec):
    name, ext, format = "avif", ".avif", "AVIF"
    params = {"speed": 6, "subsampling": "4:2:0"}  # Pillow's defaults, spelled out

    def unavailable(self):
        return None if features.check("avif") else "Pillow built without AVIF (libavif)"

    def version(self):
        return features.version("avif")


class JXL(PillowCodec):
    name, ext, format, q_range = "jxl", ".jxl", "JXL", (0, 99)  # quality 100 needs lossless=True
    params = {"effort": 7}  # libjxl's default effort

    def unavailable(self):
        try:
            import pillow_jxl  # noqa: F401  (registers JXL with Pillow)
        except ImportError:
            return "pillow-jxl-plugin not installed (pip install pillow-jxl-plugin)"
        return None

    def version(self):
        return _dist_version("pillow-jxl-plugin")

    def encode_bytes(self, img, q):
        import pillow_jxl  # noqa: F401  (registers JXL; a --jobs worker process has not imported it yet)

        return super().encode_bytes(img, q)


class NIF(Codec):
    """pillow-nif through its Pillow plugin, as a user would call it."""

    name, ext = "nif", ".nif"

    def __init__(self, effort: int, device: str, seed: int, batch: int = 0):
        self.options = {"effort": effort, "device": device, "seed": seed}  # Image.save's and encode_many's
        # batch: up to that many images of a target encoded by one pillow_nif.encode_many call (run_batch)
        self.params = {**self.options, **({"batch": batch} if batch else {})}

    def unavailable(self):
        try:
            _import_nif().register(device=self.params["device"])  # Image.open decodes on the same device
        except Exception as e:  # the codec is under development: report any import failure, keep benchmarking
            return f"pillow_nif does not import: {type(e).__name__}: {e}"
        return None

    def version(self):
        nif = _import_nif()
        return getattr(nif, "__version__", None) or _dist_version("pillow-nif")

    def encode(self, img, bpp, path):
        t0 = time.perf_counter()
        img.save(path, bpp=bpp, **self.options)
        return {"enc_s": time.perf_counter() - t0}

    def decode(self, path):
        with Image.open(path) as im:
            if im.format != "NIF":
                raise RuntimeError(f"Image.open identified {path.name} as {im.format!r}, not 'NIF'")
            return im.convert("RGB")


CODECS = {c.name: c for c in (NIF, JPEG, WebP, AVIF, JXL)}


def _import_nif():
    """Import pillow_nif; fall back to the source tree when the package is not installed."""
    try:
        import pillow_nif
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT / "src"))
        import pillow_nif
    return pillow_nif


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------------------- dataset
def load_dataset(spec: str, images: int | None, only: list[str] | None) -> dict[str, Image.Image]:
    """{name: RGB image} for `kodak`, `kodak-crop256` or a folder of PNGs."""
    folder = KODAK if spec in ("kodak", "kodak-crop256") else Path(spec)
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {folder}")
    if only:
        missing = set(only) - {p.stem for p in paths}
        if missing:
            raise SystemExit(f"--only: not in {folder}: {', '.join(sorted(missing))}")
        paths = [p for p in paths if p.stem in only]
    paths = paths[:images] if images else paths
    out = {}
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
        if spec == "kodak-crop256":
            x, y = (im.width - 256) // 2, (im.height - 256) // 2
            im = im.crop((x, y, x + 256, y + 256))
        out[p.stem] = im
    return out


# -------------------------------------------------------------------------------------------------------- metrics
def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr(m: float) -> float:
    return 10 * math.log10(255**2 / m) if m > 0 else math.inf


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    if min(a.shape[:2]) < MSSSIM_MIN_SIDE:
        return math.nan
    x, y = (torch.from_numpy(v).permute(2, 0, 1)[None].double() for v in (a, b))
    return float(_ms_ssim(x, y, data_range=255, size_average=True))


def bd(r_ref, d_ref, r_test, d_test) -> tuple[float, float]:
    """(BD-rate %, BD-PSNR dB) of the test curve against the reference curve (see the module docstring)."""
    if min(len(r_ref), len(r_test)) < 2:
        return math.nan, math.nan
    lr_ref, lr_test = np.log(r_ref), np.log(r_test)

    def avg_gap(x_ref, y_ref, x_test, y_test):  # mean of (y_test - y_ref) over the common x interval
        lo, hi = max(min(x_ref), min(x_test)), min(max(x_ref), max(x_test))
        if hi <= lo:
            return math.nan
        area = []
        for x, y in ((x_ref, y_ref), (x_test, y_test)):
            p = np.polyint(np.polyfit(x, y, min(3, len(x) - 1)))
            area.append(np.polyval(p, hi) - np.polyval(p, lo))
        return (area[1] - area[0]) / (hi - lo)

    rate = avg_gap(d_ref, lr_ref, d_test, lr_test)
    return (math.exp(rate) - 1) * 100, avg_gap(lr_ref, d_ref, lr_test, d_test)


# ------------------------------------------------------------------------------------------------------- run file
def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    commit = git("rev-parse", "HEAD")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_commit": commit.stdout.strip() if commit.returncode == 0 else None,
        "git_dirty": bool(git("status", "--porcelain", "--", "src", "kernels").stdout.strip()),
        "source_hash": source_hash(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "numpy": np.__version__,
            "pytorch_msssim": _dist_version("pytorch-msssim"),
            "triton": _dist_version("triton"),
        },
    }


def source_hash() -> str:
    """Short hash of the codec's code (src/ and kernels/), committed or not: tags which code made a record."""
    h = hashlib.sha1()
    for p in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    os.replace(tmp, path)


def key(image: str, codec: str, bpp: float) -> str:
    return f"{image}|{codec}|{bpp:g}"


def aggregate(records: dict, images: list[str], codecs: list[str], targets: list[float]) -> dict:
    """{codec: [per-target means over the images that have a record]}, plus BD against each reference."""
    agg = {}
    for c in codecs:
        rows = []
        for t in targets:
            rs = [records[k] for i in images if (k := key(i, c, t)) in records]
            if not rs:
                continue
            mean = lambda f: float(np.mean([r[f] for r in rs]))  # noqa: E731
            rows.append({
                "target_bpp": t, "n": len(rs), "bpp": mean("bpp"),
                "psnr_mean": mean("psnr"), "psnr_of_mean_mse": psnr(mean("mse")),
                "ms_ssim": mean("ms_ssim"), "enc_s": mean("enc_s"), "dec_s": mean("dec_s"),
                "over_target": sum(r["over_target"] for r in rs),
            })
        agg[c] = rows
    bd_tables = {}
    for ref in BD_REFERENCES:
        if not agg.get(ref):
            continue
        for c in codecs:
            if c == ref or not agg[c]:
                continue
            a, b = agg[ref], agg[c]
            complete = all(r["n"] == len(images) for r in a + b)  # both curves over the same images
            curves = ([r[f] for r in x] for x in (a, b) for f in ("bpp", "psnr_mean"))
            rate, dpsnr = bd(*curves) if complete else (math.nan, math.nan)
            bd_tables.setdefault(ref, {})[c] = {"bd_rate_pct": rate, "bd_psnr_db": dpsnr, "complete": complete}
    return {"per_target": agg, "bd": bd_tables}


# -------------------------------------------------------------------------------------------------------- reports
def _machines(records: dict, codecs: list) -> Counter:
    """Record counts by the machine that encoded them (records from before the field: 'not recorded')."""
    return Counter(r.get("machine", "not recorded") for r in records.values() if r["codec"] in codecs)


def markdown(run: dict) -> str:
    o, agg = run["options"], run["aggregates"]
    f = lambda v, p=2: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    nif = f"NIF device {o['device']}, effort {o['effort']}, seed {o['seed']}, " if "nif" in o["codecs"] else ""
    lines = [
        f"# Rate-distortion: {o['dataset']} ({len(o['images'])} images)",
        "",
        f"{run['machine']['cpu']} ({run['machine']['cpu_count']} CPUs), {nif}"
        f"commit {run['machine']['git_commit'] or 'none'}. PSNR: RGB, 8-bit. "
        "PSNR mean = mean of per-image PSNR; PSNR(MSE) = PSNR of the mean MSE.",
        "",
        "Encoded on: " + "; ".join(f"{m} ({n} records)" for m, n in _machines(run["records"], o["codecs"]).items())
        + ".",
        "",
        "Codecs: " + "; ".join(f"{c} {run['codec_versions'].get(c) or ''} {json.dumps(p)}"
                               for c, p in run["settings"]["codec_params"].items() if c in o["codecs"]) + ".",
        "",
        "| codec | target bpp | n | bpp | PSNR mean (dB) | PSNR(MSE) (dB) | MS-SSIM | enc (s) | dec (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, rows in agg["per_target"].items():
        for r in rows:
            over = f" ({r['over_target']} over)" if r["over_target"] else ""
            lines.append(
                f"| {c} | {r['target_bpp']:g} | {r['n']}{over} | {f(r['bpp'], 3)} | {f(r['psnr_mean'])} | "
                f"{f(r['psnr_of_mean_mse'])} | {f(r['ms_ssim'], 4)} | {f(r['enc_s'], 3)} | {f(r['dec_s'], 4)} |"
            )
    lines += [
        "",
        "BD-rate (%) and BD-PSNR (dB) on the mean curves (mean bpp, mean per-image PSNR); negative BD-rate = fewer bits.",
        f"Fit: numpy.polyfit of degree min(3, points - 1) ({len(o['bpp'])} targets), integrated over the common interval.",
        "",
        "| codec | " + " | ".join(f"BD-rate vs {r} | BD-PSNR vs {r}" for r in BD_REFERENCES) + " |",
        "|---|" + "---:|" * (2 * len(BD_REFERENCES)),
    ]
    for c in agg["per_target"]:
        cells = []
        for ref in BD_REFERENCES:
            b = agg["bd"].get(ref, {}).get(c)
            cells += ["—", "—"] if b is None else [f(b["bd_rate_pct"], 1), f(b["bd_psnr_db"])]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if run["errors"]:
        lines += ["", f"{len(run['errors'])} encode/decode errors (see JSON `errors`)."]
    return "\n".join(lines) + "\n"


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, agg = run["options"], run["aggregates"]["per_target"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colour = {c: f"C{i}" for i, c in enumerate(CODECS)}  # C0..C4; published-only methods take C5..C9
    colour.update({name: f"C{5 + i}" for i, name in enumerate(n for n, c in ANCHOR_METHODS.items() if c is None)})
    xmax = max((r["bpp"] for rows in agg.values() for r in rows), default=1.0) * 1.25
    for ax, field, label in ((axes[0], "psnr_mean", "PSNR (dB, RGB, mean per image)"), (axes[1], "ms_ssim", "MS-SSIM")):
        for c, rows in agg.items():
            if rows:
                ax.plot([r["bpp"] for r in rows], [r[field] for r in rows], "o-", lw=2, color=colour[c],
                        label=f"{c} (this run)")
        if o["dataset"] == "kodak" and ANCHORS.exists():
            methods = json.loads(ANCHORS.read_text())["methods"]
            col = {"psnr_mean": "psnr", "ms_ssim": "ms-ssim"}[field]
            for name, codec in ANCHOR_METHODS.items():
                m = methods.get(name)
                if m and col in m["columns"]:
                    pts = [(p[0], p[m["columns"].index(col)]) for p in m["points"] if p[0] <= xmax]
                    if pts:
                        ax.plot(*zip(*pts), "x--", lw=1, alpha=0.7, color=colour[codec or name],
                                label=f"{name} (published)")
        ax.set(xlabel="bits per pixel", ylabel=label, xlim=(0, xmax))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    nif = f", NIF effort {o['effort']}" if "nif" in o["codecs"] else ""
    fig.suptitle(f"{o['dataset']}, {len(o['images'])} images{nif}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(run: dict, out: Path, stem: str, note: str = "") -> str:
    """<stem>.json, .md (with `note` appended) and .png of an aggregated run in `out`; returns the Markdown."""
    write_json(out / f"{stem}.json", run)
    md = markdown(run) + note
    (out / f"{stem}.md").write_text(md)
    plot(run, out / f"{stem}.png")
    return md


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="kodak", help="kodak, kodak-crop256 (256x256 centre crops) or a folder of PNGs")
    p.add_argument("--images", type=int, help="first N images only")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated image names, e.g. kodim01,kodim05")
    p.add_argument("--bpp", type=float, nargs="+", default=[0.3, 0.6, 1.0], help="target bits per pixel")
    p.add_argument("--codecs", type=lambda s: s.split(","), default=list(CODECS), help=f"from {','.join(CODECS)}")
    p.add_argument("--effort", type=int, default=5, help="NIF effort")
    p.add_argument("--device", default="auto", help="NIF device: auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="NIF seed")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<dataset>/)")
    p.add_argument("--name", help="run file stem (default rd, or rd_nif-e<effort>-<device>-s<seed> with nif); reruns resume it")
    p.add_argument("--fresh", action="store_true", help="ignore records already in the run file")
    p.add_argument("--batch", type=int, default=0, metavar="N",
                   help="NIF: up to N images of a target in one pillow_nif.encode_many call (like-sized images fitted "
                        "as one stacked network, for a GPU), in the main process; 0: one Image.save per image")
    p.add_argument("--jobs", type=int, default=1,
                   help="(image, target) units encoded in parallel processes, the cores shared out (timings then "
                        "share the machine)")
    args = p.parse_args(argv)
    if unknown := set(args.codecs) - set(CODECS):
        p.error(f"unknown codecs: {', '.join(sorted(unknown))}")
    return args


def _worker_init(threads: int, device: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _import_nif().register(device=device)


def _stop(signum, frame) -> None:
    """SIGTERM (timeout(1), a device call's limit) unwinds like Ctrl-C, so that the worker processes are stopped
    and the records kept. Once: timeout(1) signals the process and then its group, workers and all."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _run_unit(unit: tuple) -> tuple[str, dict, list]:
    return run_image(*unit)


def run_image(image: str, img: Image.Image, todo: list, source: str, where: dict) -> tuple[str, dict, list]:
    """Encode and decode one image with each (codec, target) of `todo`; its records and errors."""
    records, errors = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for codec, t in todo:
            path = Path(tmp) / f"{image}_{t:g}{codec.ext}"
            try:
                info = codec.encode(img, t, path)
            except Exception as e:
                errors.append({"key": key(image, codec.name, t), "error": f"{type(e).__name__}: {e}"})
                continue
            _measure(image, img, codec, t, path, info, source, where, records, errors)
    return image, records, errors


def run_batch(codec: NIF, items: list, t: float, source: str, where: dict) -> tuple[dict, list]:
    """NIF at target t for several (name, image) pairs in one pillow_nif.encode_many call, which fits like-sized
    images as one stacked network (one GPU kept busy by many networks, where one encode leaves it mostly idle);
    each file then written and decoded as run_image's are. The call's time is shared out evenly (enc_s)."""
    records, errors = {}, []
    t0 = time.perf_counter()
    try:
        files = _import_nif().encode_many([img for _, img in items], bpp=t, **codec.options)
    except Exception as e:
        return {}, [{"key": key(image, codec.name, t), "error": f"{type(e).__name__}: {e}"} for image, _ in items]
    info = {"enc_s": (time.perf_counter() - t0) / len(items), "encode_many": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        for (image, img), data in zip(items, files):
            path = Path(tmp) / f"{image}_{t:g}{codec.ext}"
            path.write_bytes(data)
            _measure(image, img, codec, t, path, info, source, where, records, errors)
    return records, errors


def _measure(image: str, img: Image.Image, codec: Codec, t: float, path: Path, info: dict, source: str, where: dict,
             records: dict, errors: list) -> None:
    """Decode `path`, codec's file of `image` at target t, into a record (or an error)."""
    k = key(image, codec.name, t)
    try:
        t0 = time.perf_counter()
        dec = codec.decode(path)
        dec_s = time.perf_counter() - t0
        if dec.size != img.size:
            raise RuntimeError(f"decoded size {dec.size} != {img.size}")
    except Exception as e:
        errors.append({"key": k, "error": f"{type(e).__name__}: {e}"})
        return
    ref, out_arr = np.array(img), np.array(dec)
    size = path.stat().st_size
    m = mse(ref, out_arr)
    records[k] = {
        "image": image, "codec": codec.name, "target_bpp": t, "width": img.width, "height": img.height,
        "bytes": size, "bpp": size * 8 / (img.width * img.height),
        "over_target": size > math.floor(t * img.width * img.height / 8),
        "mse": m, "psnr": psnr(m), "ms_ssim": ms_ssim(ref, out_arr), "dec_s": dec_s, **info,
        "source": source, "machine": where.get(codec.name, where["cpu"]),
    }


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    dataset = load_dataset(args.dataset, args.images, args.only)
    out = args.out or ROOT / "benchmarks" / "results" / Path(args.dataset).name
    out.mkdir(parents=True, exist_ok=True)
    nif = f"_nif-e{args.effort}-{args.device}-s{args.seed}" if "nif" in args.codecs else ""
    stem = args.name or f"rd{nif}"
    json_path = out / f"{stem}.json"

    codecs = []
    for name in args.codecs:
        codec = CODECS[name](args.effort, args.device, args.seed, args.batch) if name == "nif" else CODECS[name]()
        if reason := codec.unavailable():
            print(f"skipping {name}: {reason}", file=sys.stderr)
        else:
            codecs.append(codec)
    if not codecs:
        raise SystemExit("no codec available")

    # Options that change existing records: a run file only resumes when they match.
    settings = {"dataset": str(Path(args.dataset).resolve()) if Path(args.dataset).is_dir() else args.dataset,
                "codec_params": {c.name: c.params for c in codecs}}
    run = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else {}
    if run:
        old = run["settings"]
        if old["dataset"] != settings["dataset"] or any(old["codec_params"].get(c.name, c.params) != c.params for c in codecs):
            raise SystemExit(f"{json_path} was made with other settings: use --fresh or another --name")
        settings["codec_params"] = {**old["codec_params"], **settings["codec_params"]}
    records, errors = run.get("records", {}), []  # errors: this invocation's only (failed records are retried)
    names = [c.name for c in codecs]
    run = {
        "machine": machine_info(args.device),
        "codec_versions": {c.name: c.version() for c in codecs},
        "settings": settings,
        "options": {"dataset": args.dataset, "images": list(dataset), "bpp": args.bpp, "codecs": names,
                    "effort": args.effort, "device": args.device, "seed": args.seed, "argv": sys.argv[1:]},
        "records": records,
        "errors": errors,
    }
    if "nif" in names:
        run["machine"]["versions"]["pillow_nif"] = run["codec_versions"]["nif"]
        run["machine"]["pillow_nif_path"] = str(Path(_import_nif().__file__).parent)
    todo = [(i, c, t) for i in dataset for c in codecs for t in args.bpp if key(i, c.name, t) not in records]
    print(f"{json_path}: {len(records)} records present, {len(todo)} to run", file=sys.stderr)
    source = run["machine"]["source_hash"]
    # Each record says where it was encoded: a run file resumed on another machine (a lent GPU's NIF records, this
    # CPU's classical codecs) holds records of both, and the run's "machine" is only the last invocation's.
    m = run["machine"]
    where = {"cpu": m["cpu"], **({"nif": m["cuda"]} if m["cuda"] and args.device != "cpu" else {})}
    if stale := [k for k, r in records.items() if r["codec"] == "nif" and r.get("source") != source]:
        print(f"warning: {len(stale)} nif records were encoded by other code than src/ and kernels/ now hold; "
              "use --fresh (or another --name) to re-encode them", file=sys.stderr)

    # --batch: NIF's records by encode_many, a target at a time, like-sized images in the same call (run_batch).
    batched = next((c for c in codecs if c.name == "nif"), None) if args.batch else None
    batches = []
    for t in args.bpp if batched else ():
        todo = [i for _, i in sorted((img.size, i) for i, img in dataset.items() if key(i, "nif", t) not in records)]
        batches += [(t, todo[k : k + args.batch]) for k in range(0, len(todo), args.batch)]
    # One unit per (image, target), submitted image by image: a run cut short (a lent GPU's time limit) keeps
    # whole targets done, and with --jobs the processes share out targets rather than whole images.
    units = [(image, img, todo, source, where) for image, img in dataset.items() for t in args.bpp
             if (todo := [(c, t) for c in codecs if c is not batched and key(image, c.name, t) not in records])]
    total = len(dataset) * len(args.bpp)

    def keep(new: dict, errs: list) -> None:
        records.update(new)
        errors.extend(errs)
        for e in errs:
            tqdm.write(f"{e['key']}: {e['error']}", file=sys.stderr)
        run["aggregates"] = aggregate(records, list(dataset), names, args.bpp)
        write_json(json_path, run)

    signal.signal(signal.SIGTERM, _stop)
    pool = None
    try:
        for t, chunk in batches:
            t0 = time.perf_counter()
            keep(*run_batch(batched, [(i, dataset[i]) for i in chunk], t, source, where))
            tqdm.write(f"nif at {t:g} bpp: {', '.join(chunk)} by encode_many in {time.perf_counter() - t0:.1f} s",
                       file=sys.stderr)
        with tqdm(total=total, initial=total - len(units), unit="target") as bar:
            if args.jobs > 1:
                # Units in parallel processes, each with its share of the cores (torch's threads would fight).
                pool = mp.get_context("spawn").Pool(args.jobs, _worker_init,
                                                    (max(1, (os.cpu_count() or 1) // args.jobs), args.device))
                done = pool.imap_unordered(_run_unit, units)
            else:
                done = (run_image(*u) for u in units)
            for image, new, errs in done:
                keep(new, errs)
                bar.set_postfix_str(image)
                bar.update()
    except KeyboardInterrupt:
        write_json(json_path, run)
        tqdm.write(f"interrupted: {len(records)} records kept in {json_path}; rerun to resume", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.terminate()  # every unit is done, or the run was interrupted: no worker is left running
            pool.join()

    run["aggregates"] = aggregate(records, list(dataset), names, args.bpp)
    print(write_reports(run, out, stem))
    print(f"wrote {json_path}, {stem}.md, {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
