"""vdit-report: one self-contained HTML page per run: loss curves, every metric, contact sheets, scores.

Run:
    vdit-report runs/quickstart                       # writes runs/quickstart/report.html
    vdit-report runs/quickstart --out /tmp/report.html
    python -m vdit.eval.run_report runs/quickstart

Reads ``metrics.jsonl`` (and a watcher's ``metrics_eval.jsonl`` when present), ``config.yaml``,
``launches.jsonl`` and ``eval/step-N.json`` (with the contact sheet each names). Plots are drawn with
matplotlib (Agg, no display) and every image is embedded as a base64 data URI, so the page opens
from a file, offline, and can be mailed or archived as one file. Nothing outside the run dir is read
(the leaderboard numbers are a constant below, copied from EVAL.md).
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import io
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any

import yaml
from matplotlib.figure import Figure  # draws with Agg: no pyplot state, no display

import vdit.conf

log = logging.getLogger(__name__)

__all__ = ["LEADERBOARD", "load_run", "build_report", "write_report", "refresh_report", "main"]

# Leaderboard context, copied from ../shared/EVAL.md (section A, "Leaderboard context (VBench-1, raw
# per-dimension scores)", Veo 3 numbers from secondary sources not checked against the official
# leaderboard; section B1, Physics-IQ "Leaderboard for scale (repo README)"). Keyed by our metric
# name; only a metric of exactly that name is put next to them (temporal_flickering_all is the
# flicker formula on every video, not VBench's dimension, so it gets no reference).
_VBENCH = "VBench-1 raw dimension; modern models 0.96-0.99"
LEADERBOARD: dict[str, dict[str, Any]] = {
    "subject_consistency": {"refs": [("Veo 3", 0.974)], "note": _VBENCH},
    "background_consistency": {"refs": [("Veo 3", 0.969)], "note": _VBENCH},
    "temporal_flickering": {"refs": [("Veo 3", 0.993)], "note": _VBENCH},
    "motion_smoothness": {"refs": [("Veo 3", 0.992)], "note": _VBENCH},
    "dynamic_degree": {"refs": [("Veo 3", 0.724)], "note": "VBench-1 raw dimension; discriminates"},
    "physics_iq": {"refs": [("best: Magi-1 + WMReward best-of-N, v2v", 62.6), ("best i2v: Sora 2 + WMReward", 46.4),
                            ("Sora 2", 42.3), ("Wan2.2", 38.3), ("Magi-1, i2v", 30.2)],
                   "note": "Physics-IQ score, 0-100"},
}

# Small-multiple groups in page order; other prefixes follow alphabetically, keys without "/" last.
GROUPS = ["optim", "perf", "mem", "val", "gen", "eval", "data", "train"]
_LOSS_KEYS = re.compile(r"^loss/(train|val|val@t=.*)$")  # drawn in the two loss plots

_CSS = """
body{margin:0;background:#f6f7f9;color:#1d2330;font:14px/1.45 system-ui,"Segoe UI",Roboto,sans-serif}
.wrap{max-width:1200px;margin:0 auto;padding:16px 24px 48px}.muted{color:#667085}.sub{margin:0 0 12px}
h1{font-size:24px;margin:8px 0 2px}h3{font-size:15px;margin:0 0 6px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px 14px;margin:8px 0;box-sizing:border-box}
img{max-width:100%;height:auto;display:block}img.sheet{image-rendering:pixelated}
.row2{display:grid;grid-template-columns:1fr 1fr;gap:12px}.row2 .card,.groups .card{margin:0;max-width:100%}
.groups{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.const{margin:6px 0 0;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}th{text-align:left;background:#f0f2f5;font-weight:600}
th,td{padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}td.comp{white-space:nowrap}
.num{text-align:right!important;font-variant-numeric:tabular-nums;white-space:nowrap}
td.key{font-family:ui-monospace,Menlo,Consolas,monospace}table.kv td:first-child{color:#667085;width:150px}
.yes{color:#0a7a33;font-weight:600}.no{color:#a15c00}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] when absent); an undecodable line (one being appended now) is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def _number(v: Any) -> float | None:
    """A finite float, or None for nulls, bools, lists and non-finite values."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def load_run(run_dir: str) -> dict[str, Any]:
    """Everything the report shows, as plain data.

    Returns ``{"run_dir", "name" (its folder name), "config" (dict, {} without config.yaml), "launches"
    (rows of launches.jsonl), "series" ({key: (steps, values)}, sorted by step, nulls skipped, the last row
    wins per step), "evals" (the eval/step-N.json dicts, by step), "num_params" (float or None),
    "wall_s" (seconds between the first and the last metrics row, or None)}``.

    Raises:
        FileNotFoundError: ``{run_dir}/metrics.jsonl`` does not exist (the message names that path).
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in the run dir: {path} does not exist")
    rows = _read_jsonl(path) + _read_jsonl(os.path.join(run_dir, "metrics_eval.jsonl"))
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if key in ("step", "time") or step is None or (v := _number(value)) is None:
                continue
            by_key.setdefault(key, {})[int(step)] = v
    series = {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in sorted(by_key.items())}
    config: dict[str, Any] = {}
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config = yaml.safe_load(f) or {}
    evals = []
    for p in glob.glob(os.path.join(run_dir, "eval", "step-*.json")):
        try:
            with open(p) as f:
                evals.append(json.load(f))
        except (OSError, ValueError) as exn:  # a watcher may be writing it right now
            log.warning("skipping %s: %s", p, exn)
    evals.sort(key=lambda e: e.get("step", -1))
    times = [t for r in rows if (t := _number(r.get("time"))) is not None]
    params = series.get("model/num_params", ([], []))[1]
    return {"run_dir": run_dir, "name": os.path.basename(os.path.abspath(run_dir)),
            "config": config, "launches": _read_jsonl(os.path.join(run_dir, "launches.jsonl")),
            "series": series, "evals": evals, "num_params": params[-1] if params else None,
            "wall_s": max(times) - min(times) if len(times) > 1 else None}


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return _uri(buf.getvalue())


def _style(ax, values: list[float]) -> None:
    """Grid and small ticks; a log y axis when every value is positive and they span more than 30x."""
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    pos = [v for v in values if v > 0]
    if len(pos) == len(values) > 1 and max(pos) / min(pos) > 30:
        ax.set_yscale("log")


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard-style); ``span`` defaults to len/30, at least 1."""
    span = span or max(1, min(100, len(values) // 30))
    alpha, avg, out = 2.0 / (span + 1), 0.0, []
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** (i + 1)))
    return out


def loss_plots(series: dict[str, tuple[list[int], list[float]]]) -> tuple[str | None, str | None]:
    """(training loss, validation loss) figures as data URIs, None where the run logged none."""
    train = val = None
    if "loss/train" in series:
        steps, values = series["loss/train"]
        ax = (fig := Figure(figsize=(6, 3.4))).add_subplot()
        ax.plot(steps, values, color="#9db4d6", lw=0.8, marker="." if len(steps) < 40 else None, label="raw")
        ax.plot(steps, smooth(values), color="#1f4e96", lw=1.8, label="smoothed (EMA)")
        _style(ax, values)
        ax.set(xlabel="step", ylabel="loss/train", title="training loss")
        ax.legend(fontsize=8)
        train = _png(fig)
    keys = [k for k in series if k == "loss/val" or k.startswith("loss/val@t=")]
    if keys:
        ax = (fig := Figure(figsize=(6, 3.4))).add_subplot()
        for k in sorted(keys, key=lambda k: (k != "loss/val", k)):
            s, v = series[k]
            main_line = k == "loss/val"
            ax.plot(s, v, lw=2 if main_line else 1, marker="o" if main_line else ".", ms=4 if main_line else 3,
                    color="black" if main_line else None, label="mean" if main_line else k.split("@", 1)[1])
        _style(ax, [x for k in keys for x in series[k][1]])
        ax.set(xlabel="step", ylabel="loss/val", title="validation loss (fixed clips, timesteps, noise)")
        ax.legend(fontsize=7, ncol=2)
        val = _png(fig)
    return train, val


def group_keys(series: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Every key outside the two loss plots, grouped by prefix: :data:`GROUPS` first, then the rest."""
    groups: dict[str, list[str]] = {}
    for key in series:
        if not _LOSS_KEYS.match(key):
            groups.setdefault(key.split("/", 1)[0] if "/" in key else "other", []).append(key)
    rank = {g: i for i, g in enumerate(GROUPS)}
    return [(g, groups[g]) for g in sorted(groups, key=lambda g: (rank.get(g, len(GROUPS) + (g == "other")), g))]


def small_multiples(series: dict[str, tuple[list[int], list[float]]], keys: list[str], cols: int = 4) -> str:
    """One panel per key (value against step), ``cols`` to a row, as a data URI."""
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(12, 2.3 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = series[key]
        ax.plot(steps, values, lw=1.2, color="#1f4e96", marker="." if len(steps) < 40 else None, ms=4)
        _style(ax, values)
        ax.set_title(key.split("/", 1)[-1] if "/" in key else key, fontsize=9)
    fig.tight_layout(h_pad=1.0, w_pad=1.0)
    return _png(fig)


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "—" if v is None else _e(v)
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:.4g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _preset(config: dict[str, Any], launches: list[dict[str, Any]]) -> str:
    """The model preset: a ``model=X`` launch argument, else the conf/model preset of the same
    (hidden_size, depth, num_heads), else the ladder rule (hidden 64 * depth), else ``custom``."""
    for row in reversed(launches):
        for arg in row.get("argv", []):
            if arg.startswith("model="):
                return arg.split("=", 1)[1]
    m = config.get("model") or {}
    shape = (m.get("hidden_size"), m.get("depth"), m.get("num_heads"))
    for p in sorted(glob.glob(os.path.join(os.path.dirname(vdit.conf.__file__), "model", "*.yaml"))):
        with open(p) as f:
            preset = yaml.safe_load(f) or {}
        if (preset.get("hidden_size"), preset.get("depth"), preset.get("num_heads")) == shape:
            return os.path.splitext(os.path.basename(p))[0]
    if shape[0] and shape[1] and shape[0] == 64 * shape[1] and shape[2] == shape[1]:
        return f"ladder (depth {shape[1]})"
    return "custom"


def _header(run: dict[str, Any]) -> str:
    """The config summary: model, parameters, data, steps, optimizer, code version, launches."""
    c, series = run["config"], run["series"]
    m, d, t, o = (c.get(k) or {} for k in ("model", "data", "train", "optim"))
    last_step = max((s[-1] for s, _ in series.values() if s), default=None)
    rows = [("run dir", os.path.abspath(run["run_dir"]))]
    if m:
        rows.append(("model", f"{_preset(c, run['launches'])}: hidden {m.get('hidden_size')}, depth {m.get('depth')}, "
                              f"heads {m.get('num_heads')}, patch {m.get('patch_size')}, {m.get('in_channels')} "
                              f"channels, prediction {m.get('prediction')}"))
    if run["num_params"] is not None:
        rows.append(("parameters", f"{run['num_params']:,.0f} ({run['num_params'] / 1e6:.3g} M)"))
    if d:
        rows.append(("data", f"{d.get('shards')}: {d.get('num_frames')} frames x {d.get('height')}x{d.get('width')}, "
                             f"fps {d.get('target_fps') or 'native'}, batch {d.get('batch_size')}, "
                             f"val {d.get('val_shards') or d.get('val_fraction')}"))
        text, vae = c.get("text_encoder") or {}, c.get("vae") or {}
        rows.append(("encoders", f"text {text.get('name')}, vae {vae.get('name')}"))
    wall = f", {run['wall_s'] / 60:.1f} min between first and last row" if run["wall_s"] else ""
    rows.append(("steps", f"{last_step} logged of {t.get('steps', '?')} configured{wall}"))
    if o:
        rows.append(("optimizer", f"lr {o.get('lr')}, {o.get('schedule')} schedule, warmup {o.get('warmup_steps')}, "
                                  f"weight decay {o.get('weight_decay')}"))
    if run["launches"]:
        last = run["launches"][-1]
        code, world = last.get("code") or {}, last.get("world") or {}
        dirty = " (uncommitted changes)" if code.get("git_dirty") else ""
        commit = (code.get("git_commit") or "")[:12] or "not a git checkout"
        rows.append(("code", f"vdit {code.get('version')}, {commit}{dirty}, torch {last.get('torch')}"))
        rows.append(("launches", f"{len(run['launches'])} (last from step {last.get('start_step')}, world size "
                                 f"{world.get('world_size')}, {world.get('device')}, "
                                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(last.get('time', 0)))})"))
    body = "".join(f"<tr><td>{k}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<div class="card"><table class="kv">{body}</table></div>'


def _scores_table(evals: list[dict[str, Any]]) -> str:
    """The last evaluation's means next to :data:`LEADERBOARD`; comparable only when ``exact``."""
    if not evals:
        return '<p class="muted">No evaluation yet (no eval/step-N.json in the run dir).</p>'
    last = evals[-1]
    metrics = last.get("metrics") or {}
    head = ("<tr><th>metric</th><th class=num>step %s</th><th class=num>videos</th><th class=num>not evaluable</th>"
            "<th>exact</th><th>leaderboard context (EVAL.md)</th><th>comparable</th></tr>") % _e(last.get("step"))
    rows = []
    for name in list(metrics) + [n for n in LEADERBOARD if n not in metrics]:
        r = metrics.get(name) or {}
        ref = LEADERBOARD.get(name)
        refs = ("; ".join(f"{_e(who)} {v:g}" for who, v in ref["refs"])
                + f' <span class="muted">({_e(ref["note"])})</span>') if ref else ""
        comp = ('<span class="muted">not scored</span>' if not r else '<span class="muted">no reference</span>'
                if not ref else '<span class="yes">yes</span> <span class="muted">(exact port; own prompts)</span>'
                if r.get("exact") else '<span class="no">no</span> <span class="muted">(approximation)</span>')
        exact = "" if not r else ("yes" if r.get("exact") else "no")
        mean = r.get("mean", r.get("value"))
        rows.append(f'<tr title="{_e(r.get("original", ""))}"><td class=key>{_e(name)}</td><td class=num>{_fmt(mean)}'
                    f'</td><td class=num>{_fmt(r.get("count"))}</td><td class=num>{_fmt(r.get("not_evaluable"))}</td>'
                    f"<td>{exact}</td><td>{refs}</td><td class=comp>{comp}</td></tr>")
    return (f'<div class="card"><table>{head}{"".join(rows)}</table><p class="muted">'
            "Comparable means the metric's <code>exact</code> flag is true: our formula is the original's. The "
            "prompt set still differs from the benchmark's, and VBench's leaderboard Total normalises and weights "
            "dimensions, so a raw dimension is not a Total. Hover a row for what the metric follows.</p></div>")


def _sheets(run_dir: str, evals: list[dict[str, Any]]) -> str:
    """Each evaluated step's contact sheet, newest first and open; older ones folded."""
    if not evals:
        return '<p class="muted">No contact sheets yet.</p>'
    out = []
    for i, ev in enumerate(reversed(evals)):
        rel = ev.get("contact_sheet")
        path = os.path.join(run_dir, rel) if rel else None
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                body = f'<img class="sheet" alt="contact sheet, step {_e(ev.get("step"))}" src="{_uri(f.read())}">'
        else:
            body = f'<p class="muted">contact sheet missing: {_e(rel)}</p>'
        info = ", ".join(f"{k} {v}" for k, v in (ev.get("sampler") or {}).items())
        out.append(f'<details{" open" if i == 0 else ""}><summary>step {_e(ev.get("step"))} '
                   f'<span class="muted">({len(ev.get("videos") or [])} prompts; {_e(info)})</span></summary>'
                   f'<div class="card">{body}</div></details>')
    return "".join(out)


def build_report(run_dir: str) -> str:
    """The report of ``run_dir`` as one HTML string (see the module docstring)."""
    run = load_run(run_dir)
    series = run["series"]
    train, val = loss_plots(series)
    parts = [f"<h1>{_e(run['name'])}</h1><p class='muted sub'>vdit run report, written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>", _header(run), "<h2>Loss</h2>"]
    cells = [f'<div class="card"><img alt="{alt}" src="{u}"></div>'
             for alt, u in (("training loss", train), ("validation loss", val)) if u]
    parts.append(f'<div class="row2">{"".join(cells)}</div>' if cells else '<p class="muted">No loss logged.</p>')
    parts += ["<h2>Latest scores</h2>", _scores_table(run["evals"]),
              "<h2>Samples</h2>", _sheets(run_dir, run["evals"]), "<h2>Metrics</h2>"]
    cards = []
    for group, keys in group_keys(series):
        varying = [k for k in keys if len(set(series[k][1])) > 1]
        const = ", ".join(f"<code>{_e(k)}</code> = {_fmt(series[k][1][0])} ({_plural(len(series[k][0]), 'point')})"
                          for k in keys if k not in varying)  # a flat panel says less than one line of text
        img = f'<img alt="{_e(group)} metrics" src="{small_multiples(series, varying)}">' if varying else ""
        cards.append(f'<div class="card"><h3>{_e(group)}/ <span class="muted">({_plural(len(keys), "key")})'
                     f'</span></h3>{img}'
                     + (f'<p class="muted const">constant: {const}</p>' if const else "") + "</div>")
    parts.append(f'<div class="groups">{"".join(cards)}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(run['name'])}: vdit report</title><style>{_CSS}</style></head>"
            f"<body><div class=\"wrap\">{''.join(parts)}</div></body></html>\n")


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write :func:`build_report` to ``out`` (default ``{run_dir}/report.html``) atomically; returns the path."""
    out = out or os.path.join(run_dir, "report.html")
    page = build_report(run_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"  # per process: the trainer and a watcher may both refresh it
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)  # a reader (browser refresh) never sees a half-written page
    return out


def refresh_report(run_dir: str) -> str | None:
    """:func:`write_report` for use inside training: a failure is logged, never raised (path or None)."""
    try:
        return write_report(run_dir)
    except Exception as exn:  # noqa: BLE001 - the report must never stop a run
        log.warning("run report not written: %s", exn)
        return None


def main(argv: list[str] | None = None) -> int:
    """``vdit-report <run dir> [--out PATH]``: write the report, print its path; 1 when there are no metrics."""
    parser = argparse.ArgumentParser(prog="vdit-report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output HTML path (default <run dir>/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as exn:
        print(f"vdit-report: {exn}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
