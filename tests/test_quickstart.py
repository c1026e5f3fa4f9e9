"""`make demo`'s script end to end, shortened (--quick): every stage runs for real, on 2 ranks, and a
rerun reuses the finished stages."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reuses_stages(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools/quickstart.py"), "--out", str(tmp_path), "--quick"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["moc_eval_lm_loss"]) >= 2 and len(summary["vanilla_eval_lm_loss"]) >= 2
    assert summary["moc_eval_lm_loss"][-1] < summary["moc_eval_lm_loss"][0]
    assert "max |logit difference|" in first.stdout and "verify: causal" in first.stdout
    assert (tmp_path / "hf" / "moc-tiny-ift" / "tokenizer.json").exists()
    for name in ("moc", "vanilla"):  # lm-eval on the local task, both models
        assert 0.0 <= summary["local_task"][name]["acc"] <= 1.0, summary["local_task"]
    assert "local task accuracy (vanilla)" in first.stdout
    figure = tmp_path / "quickstart.png"  # validation curves of both models and MoC's chapter usage
    assert summary["figure"] == str(figure) and f"figure (validation curves, chapter usage): {figure}" in first.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("(reusing") >= 9
