"""vdit-eval: score mp4 videos with vdit's metrics and write one JSON.

Run:
    vdit-eval runs/quickstart/samples/step-400 --out /tmp/scores.json
    vdit-eval clip.mp4 --scene-json clip_params.json      # adds the trajectory physics checks

Each video is decoded fully (PyAV) to uint8 ``(T, H, W, 3)``; temporal flickering is computed for
every video; when a procedural scene's parameters are given (``--scene-json``, a SceneParams JSON,
or a ``{video file name: params}`` mapping) the trajectory checks run too. Prints the JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from vdit.data.synthetic import SceneParams
from vdit.data.video_io import read_all_frames
from vdit.eval.hook import score_videos


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``vdit-eval``); returns 0, or 1 when no video could be scored."""
    ap = argparse.ArgumentParser(prog="vdit-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("videos", nargs="+", help="mp4 files or folders of mp4s")
    ap.add_argument("--scene-json", default=None,
                    help="SceneParams JSON for a single video, or {file name: SceneParams JSON}")
    ap.add_argument("--out", default=None, help="write the JSON here as well")
    args = ap.parse_args(argv)

    files: list[str] = []
    for v in args.videos:
        files += sorted(glob.glob(os.path.join(v, "*.mp4"))) if os.path.isdir(v) else [v]
    scenes: dict[str, dict] = {}
    if args.scene_json:
        with open(args.scene_json) as f:
            raw = json.load(f)
        scenes = raw if all(isinstance(v, dict) for v in raw.values()) and "balls" not in raw else \
            {os.path.basename(files[0]): raw}
    videos, params, scored, errors = [], [], [], []
    for path in files:
        try:
            frames, _ = read_all_frames(path)
        except Exception as exn:  # noqa: BLE001 - report and continue with the other videos
            errors.append({"path": path, "error": str(exn)})
            continue
        videos.append(frames)
        p = scenes.get(os.path.basename(path))
        params.append(SceneParams.from_json(p) if p else None)
        scored.append(path)
    if not videos:
        print(json.dumps({"error": "no video could be scored", "errors": errors}), file=sys.stderr)
        return 1
    result = score_videos(videos, params)
    result["videos"] = [{"path": p, **s} for p, s in zip(scored, result.pop("per_video"))]
    result["errors"] = errors
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
