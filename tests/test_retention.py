"""benchmarks/retention.py: the report pairs models by seed, and --quick runs end to end (real training
through the CLI, lm-eval, the validation losses) and writes the Markdown, JSON and PNG."""

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "retention.py"


def _module():
    spec = importlib.util.spec_from_file_location("retention_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(ret) -> list:
    return [m for m, _, _ in ret.METRICS] + list(ret.EXTRA)


def _check_pairs(ret, doc: dict) -> None:
    """Every paired difference is the per-seed difference of the two arms' values, then mean ± std."""
    raw, n = doc["raw"], len(doc["seeds"])
    assert set(doc["paired"]) == {f"{a}-{b}" for a, b in ret.PAIRS}
    for a, b in ret.PAIRS:
        for m in _metrics(ret):
            p = doc["paired"][f"{a}-{b}"][m]
            want = [x - y for x, y in zip(raw[a][m], raw[b][m])]
            assert len(p["per_seed"]) == n and p["per_seed"] == pytest.approx(want, abs=1e-12), (a, b, m)
            assert p["mean"] == pytest.approx(statistics.mean(want), abs=1e-12)
            assert p["std"] == pytest.approx(statistics.stdev(want) if n > 1 else 0.0, abs=1e-12)


def test_report_pairs_by_seed(tmp_path):
    """Synthetic values in which every arm varies a lot between seeds but MoC-frozen is exactly 0.125
    below vanilla in every seed (exact binary fractions, no rounding): the paired std must be 0, which
    differencing the means (or adding the arms' variances) would not give."""
    ret = _module()
    seeds = [1, 2, 3]
    level = [5.0, 6.0, 7.5]  # the seed moves every model
    raw = {}
    for arm, shift in (("moc_frozen", -0.125), ("moc_trained", -0.0625), ("vanilla", 0.0)):
        raw[arm] = {m: [x + shift + 0.25 * i for i, x in enumerate(level)] for m in _metrics(ret)}
    args = argparse.Namespace(seeds=seeds, iters=10, ift_iters=5, seq_length=128, eval_sequences=0, eval_limit=0,
                              reused=[], quick=False, out=str(tmp_path), results=str(tmp_path))
    ret.report(tmp_path, raw, args, {"runtime_s": 60.0, "training_s": 50.0, "evaluation_s": 10.0})
    doc = json.loads((tmp_path / "retention.json").read_text())
    _check_pairs(ret, doc)
    fv = doc["paired"]["moc_frozen-vanilla"]["forgetting"]
    assert fv["mean"] == -0.125 and fv["std"] == 0.0
    assert doc["summary"]["vanilla"]["forgetting"]["std"] > 1.0
    md = (tmp_path / "retention.md").read_text()
    assert "| MoC-frozen − vanilla | " in md and "-0.1250 ± 0.0000" in md
    assert (tmp_path / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_retention_quick_end_to_end(tmp_path):
    ret = _module()
    results = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out"), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    doc = json.loads((results / "retention.json").read_text())
    assert {"settings", "seeds", "arms", "raw", "summary", "paired"} <= set(doc)
    assert doc["arms"] == list(ret.ARMS) and len(doc["seeds"]) == 1  # pairing over seeds: test_report_pairs_by_seed
    raw, n = doc["raw"], len(doc["seeds"])
    for arm in ret.ARMS:
        for m in _metrics(ret):
            vals = raw[arm][m]
            assert len(vals) == n and all(math.isfinite(v) for v in vals), (arm, m, vals)
            assert math.isfinite(doc["summary"][arm][m]["mean"]) and math.isfinite(doc["summary"][arm][m]["std"])
        r = raw[arm]
        for before, after, forgot in zip(r["pretrain_before"], r["pretrain_after"], r["forgetting"]):
            assert forgot == pytest.approx(after - before, abs=1e-12)
            assert after != before, f"{arm}: instruction tuning left the pretraining loss unchanged"
        assert all(0.0 <= a <= 1.0 for a in raw[arm]["acc_before"] + raw[arm]["acc_after"])
        assert all(d > 0 for d in raw[arm]["backbone_drift"]), arm
    # both MoC arms start from the same pretrained checkpoint; only the trained arm moves its bank
    assert raw["moc_frozen"]["pretrain_before"] == raw["moc_trained"]["pretrain_before"]
    assert raw["moc_frozen"]["pretrain_before"] != raw["vanilla"]["pretrain_before"]
    assert all(d == 0.0 for d in raw["moc_frozen"]["bank_drift"])
    assert all(d > 0.0 for d in raw["moc_trained"]["bank_drift"])
    _check_pairs(ret, doc)

    md = (results / "retention.md").read_text()
    for text in ("pretrain-valid loss, before IFT", "forgetting (after − before)", "IFT-valid loss",
                 "local-task acc, after", "Paired by seed", "| MoC-frozen − MoC-trained |", "retention.png"):
        assert text in md, text
    png = (results / "retention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
