#!/usr/bin/env python
"""Merge rd.py run files into one report; a record (image, codec, target) in a later file replaces an earlier one's.

    python benchmarks/merge_runs.py benchmarks/results/kodak/rd_nif-e5-cpu-s0.json \\
        benchmarks/results/kodak/rd_nif-e5-cpu-s0-r48.json benchmarks/results/kodak/rd_nif-e5-cpu-s0-r51.json \\
        --name rd_nif-e5-cpu-s0-now

For a curve encoded over several runs (a code change re-encoded at one rate, images added later) beside the
classical codecs of the first run: one table, one BD against them, one plot. Nothing is encoded or measured again.
Every record keeps its own `source` (the hash of the code that made it) and `machine`; the merged file lists its
inputs and how many records each gave. Writes <name>.json / .md / .png beside the first input (or in --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rd  # noqa: E402


def merge(runs: list[dict], names: list[str]) -> dict:
    """One run dict from several of the same dataset and codec settings (a later run's records win), aggregated over
    every record's image, codec and target."""
    datasets = {r["settings"]["dataset"] for r in runs}
    if len(datasets) != 1:
        raise SystemExit(f"the runs are of different datasets: {sorted(datasets)}")
    params = {}
    for run, name in zip(runs, names):  # e.g. NIF at another effort: its records would be mislabelled
        for codec, p in run["settings"]["codec_params"].items():
            if params.setdefault(codec, p) != p:
                raise SystemExit(f"{name}: {codec} was run with {p}, an earlier input with {params[codec]}")
    records, kept = {}, {}
    for run in runs:
        records.update(run["records"])
    for name, run in zip(names, runs):
        kept[name] = sum(records[k] is v for k, v in run["records"].items())
    images = sorted({r["image"] for r in records.values()})
    codecs = list(dict.fromkeys(r["codec"] for r in records.values()))
    targets = sorted({r["target_bpp"] for r in records.values()})
    last = runs[-1]
    merged = {
        "machine": last["machine"],
        "codec_versions": {k: v for r in runs for k, v in r["codec_versions"].items()},
        "settings": {"dataset": last["settings"]["dataset"], "codec_params": params},
        "options": {**last["options"], "images": images, "bpp": targets, "codecs": codecs,
                    "argv": None, "merged_from": kept},
        "records": records,
        "errors": [],
    }
    merged["aggregates"] = rd.aggregate(records, images, codecs, targets)
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="rd.py JSON files, earliest first (later records win)")
    p.add_argument("--name", required=True, help="stem of the merged .json / .md / .png")
    p.add_argument("--out", type=Path, help="folder (default: the first input's)")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    merged = merge(runs, [str(path) for path in args.runs])
    out = args.out or args.runs[0].parent
    out.mkdir(parents=True, exist_ok=True)
    if (out / f"{args.name}.json").resolve() in {path.resolve() for path in args.runs}:
        raise SystemExit("--name would overwrite an input")
    sources = ", ".join(f"{n} ({k} records)" for n, k in merged["options"]["merged_from"].items())
    print(rd.write_reports(merged, out, args.name, f"\nMerged from: {sources}.\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
