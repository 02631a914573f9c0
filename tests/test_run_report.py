"""vdit-report: the HTML report of a real tiny run (in-loop eval, validation loss) and of synthetic run dirs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from tests.test_train import tiny_cfg
from vdit.eval.run_report import LEADERBOARD, build_report, load_run, main, write_report
from vdit.train.trainer import Trainer


class _Page(HTMLParser):
    """Collects img sources and checks that every opened element (except void ones) is closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images, self.stack, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


@pytest.fixture(scope="module")
def tiny_run(small_shards, tmp_path_factory):
    """A real 4-step run: loss logged every 2 steps, validation loss and an in-loop eval at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    cfg = tiny_cfg(small_shards, run_dir, "train.steps=4", "eval.enabled=true", "eval.every=2", "eval.num_steps=2",
                   "eval.prompts=[a red ball drops]", "eval.num_physics_prompts=1", "eval.num_train_physics_prompts=0",
                   "eval.val_every=2", f"data.val_shards={small_shards}", "eval.val_clips=2")
    Trainer(cfg).fit()
    return str(run_dir)


def test_report_of_a_real_run(tiny_run):
    evals = sorted(os.listdir(os.path.join(tiny_run, "eval")))
    assert evals == ["step-2.json", "step-4.json"]
    assert main([tiny_run]) == 0
    page = open(os.path.join(tiny_run, "report.html"), encoding="utf-8").read()
    parser = _parse(page)

    for name in evals:  # every metric key of every eval file is on the page
        with open(os.path.join(tiny_run, "eval", name)) as f:
            ev = json.load(f)
        assert ev["metrics"]
        for key in ev["metrics"]:
            assert key in page, key
        assert f"step {ev['step']}" in page
    assert 'alt="training loss"' in page and 'alt="validation loss"' in page
    for group in ("optim/", "perf/", "val/", "eval/", "gen/"):
        assert f"<h3>{group}" in page, group

    # self-contained: every image (plots and the two contact sheets) is an embedded PNG, nothing is fetched
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert page.count('class="sheet"') == 2
    assert "http://" not in page and "https://" not in page and 'src="file' not in page

    run = load_run(tiny_run)
    assert run["num_params"] and f"{run['num_params']:,.0f}" in page
    assert [e["step"] for e in run["evals"]] == [2, 4]
    assert "loss/train" in run["series"] and "loss/val" in run["series"]
    for name, ref in LEADERBOARD.items():  # the context rows are there, marked by the exact flags
        assert name in page and f"{ref['refs'][0][1]:g}" in page


def test_cli_entry_point_writes_to_out(tiny_run, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    proc = subprocess.run([sys.executable, "-m", "vdit.eval.run_report", tiny_run, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.read_text().startswith("<!DOCTYPE html>")


def test_synthetic_run_with_nulls_and_no_evals(tmp_path):
    rows = [{"step": 1, "time": 10.0, "loss/train": 1.0, "model/num_params": 1234.0},
            {"step": 2, "time": 11.0, "loss/train": None, "nonfinite": ["loss/train"], "optim/lr": 1e-3},
            {"step": 3, "time": 12.0, "loss/train": 0.5, "optim/lr": 5e-4, "perf/mfu": 0.1, "custom": 7,
             "train/flag": True},
            {"step": 3, "time": 13.0, "loss/val": 0.9, "loss/val@t=0.50": 0.8, "val/x0_mse": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(str(tmp_path))
    assert run["series"]["loss/train"] == ([1, 3], [1.0, 0.5])  # the null is skipped
    assert "val/x0_mse" not in run["series"] and "nonfinite" not in run["series"] and "train/flag" not in run["series"]
    assert run["evals"] == [] and run["config"] == {} and run["num_params"] == 1234.0

    path = write_report(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "report.html")
    page = open(path, encoding="utf-8").read()
    _parse(page)
    assert "No evaluation yet" in page and "No contact sheets yet" in page
    for key in ("optim/", "perf/", "other/", "custom"):
        assert key in page, key
    assert build_report(str(tmp_path)).count("<h2>") == page.count("<h2>")


def test_missing_metrics_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(missing), "metrics.jsonl"))):
        write_report(str(missing))
    assert main([str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
