"""benchmarks/merge_runs.py: several rd.py run files into one report (later records win)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import merge_runs  # noqa: E402


def run(dataset, records):
    recs = {f"{i}|{c}|{t:g}": {"image": i, "codec": c, "target_bpp": t, "bpp": t * 0.98, "psnr": p,
                               "mse": 255**2 / 10 ** (p / 10), "ms_ssim": 0.9, "enc_s": 1.0, "dec_s": 0.1,
                               "over_target": False, "machine": "m", "source": s}
            for i, c, t, p, s in records}
    return {"machine": {"cpu": "cpu", "cpu_count": 2, "git_commit": "abc"},
            "codec_versions": {"nif": "0", "webp": "1"},
            "settings": {"dataset": dataset, "codec_params": {"nif": {"effort": 5}, "webp": {"method": 6}}},
            "options": {"dataset": dataset, "images": [], "bpp": [], "codecs": [], "effort": 5, "device": "cpu",
                        "seed": 0},
            "records": recs, "errors": []}


def test_later_records_replace_earlier_ones_and_the_curves_are_rebuilt(tmp_path):
    old = run("kodak", [(i, c, t, 30 + 5 * t + (c == "webp"), "old") for i in ("a", "b") for c in ("nif", "webp")
                        for t in (0.3, 0.5, 1.0)])
    new = run("kodak", [("a", "nif", t, 32 + 5 * t, "new") for t in (0.3, 0.5, 1.0)]
              + [("b", "nif", 0.3, 32.0, "new")])
    merged = merge_runs.merge([old, new], ["old.json", "new.json"])
    assert merged["options"]["merged_from"] == {"old.json": 8, "new.json": 4}
    assert merged["records"]["b|nif|0.5"]["source"] == "old" and merged["records"]["b|nif|0.3"]["source"] == "new"
    nif = merged["aggregates"]["per_target"]["nif"]
    assert [r["n"] for r in nif] == [2, 2, 2]
    assert nif[0]["psnr_mean"] == pytest.approx((33.5 + 32.0) / 2)
    assert nif[2]["psnr_mean"] == pytest.approx((37 + 35) / 2)
    assert merged["aggregates"]["bd"]["webp"]["nif"]["bd_psnr_db"] > 0  # the new nif curve is above webp's

    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for p, r in zip(paths, (old, new)):
        p.write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="overwrite"):
        merge_runs.main([*map(str, paths), "--name", "new"])
    with pytest.raises(SystemExit, match="different datasets"):
        merge_runs.merge([old, run("kodak-crop256", [])], ["a", "b"])
    other = run("kodak", [])
    other["settings"]["codec_params"]["nif"] = {"effort": 7}
    with pytest.raises(SystemExit, match="nif was run with"):
        merge_runs.merge([old, other], ["a", "b"])
