"""bench/gpu_check.sh's plumbing on CPU (``--cpu-smoke``): sections write JSON lines, the summary reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402


def test_wrapper_runs_sections_and_summarises(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke", "kernels", "ring"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [(r["section"], r["status"]) for r in rows] == [("kernels", "pass"), ("ring", "pass")]
    assert rows[0]["worst"]["fwd_rel"] < 1e-5 and rows[1]["ring_fwd_rel"] < 1e-5  # fp32 on CPU
    summary = json.loads(proc.stdout.strip().splitlines()[-2])  # the last line is the results path
    assert summary["pass"] and summary["status"] == {"kernels": "pass", "ring": "pass"}


def test_summary_fails_on_a_failed_section(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"section": "step", "status": "pass", "step_s": 2.0}) + "\n"
                    + json.dumps({"section": "compile", "status": "fail", "error": "timeout after 120s"}) + "\n"
                    + json.dumps({"section": "syncs", "status": "skipped"}) + "\n")
    result = gpu_check.summarize(str(path))
    assert not result["pass"] and result["failed"] == ["compile"]
    assert result["numbers"]["step"] == {"step_s": 2.0}
    assert gpu_check.main(["summary", "--out", str(path)]) == 1
