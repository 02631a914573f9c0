"""Human-readable evaluation artefacts: contact sheets of sampled videos.

A contact sheet shows each video as one row of evenly spaced frames under its caption, so a look
at one PNG tells whether samples move, flicker or fall apart::

    from vdit.eval.report import contact_sheet
    contact_sheet([video_a, video_b], ["a red ball ...", "a blue ball ..."], path="sheet.png")
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
from PIL import Image

from vdit.eval.metrics.base import check_video

__all__ = ["contact_sheet", "sheet_frames"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4
_LINE_H = 14  # pixels per caption line
_GAP = 4  # pixels between tiles and rows
_BG = (255, 255, 255)
_TEXT = (20, 20, 20)


def _wrap(text: str, max_width: int) -> list[str]:
    """Greedy word wrap so that each line's cv2 text width fits ``max_width`` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if cv2.getTextSize(trial, _FONT, _FONT_SCALE, 1)[0][0] <= max_width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def sheet_frames(video: np.ndarray, max_frames: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The frames a contact sheet shows of ``video`` (uint8 ``(T, H, W, 3)``, T >= 2): ``(frame
    numbers (K,), frames uint8 (K, H, W, 3))``, ``K = min(max_frames, T)`` evenly spaced.

    A rank that sampled a video sends only these to the rank that draws the sheet
    (``contact_sheet(frames, ..., frame_indices=numbers)`` draws the same PNG as the whole videos).

    Raises:
        ValueError: an invalid video (:func:`vdit.eval.metrics.base.check_video`) or ``max_frames < 1``.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1; got {max_frames}")
    video = check_video(video)
    picks = np.unique(np.linspace(0, video.shape[0] - 1, min(max_frames, video.shape[0])).round().astype(int))
    return picks, video[picks]


def contact_sheet(videos: list[np.ndarray], captions: list[str] | None = None, max_frames: int = 8,
                  path: str | os.PathLike = "contact_sheet.png", min_height: int = 96,
                  frame_indices: list[np.ndarray] | None = None) -> str:
    """Write a PNG grid: one row per video, up to ``max_frames`` evenly spaced frames as columns.

    Frames are upscaled by an integer factor with nearest-neighbour interpolation until they are
    at least ``min_height`` pixels tall (a 32-px video becomes 96 px, each source pixel a 3x3
    block). Each row has a header with the video index, its frame indices and, if given, its
    caption (word-wrapped, drawn with cv2.putText). Videos may differ in T, H and W.

    Args:
        videos: list of uint8 (T, H, W, 3) RGB videos, T >= 2.
        captions: None or one string per video.
        max_frames: columns per row (>= 1); a video with fewer frames shows all of them.
        path: output PNG path (parent folders are created).
        min_height: minimum tile height in pixels.
        frame_indices: None, or per video the frame numbers of its frames when ``videos`` already
            hold only the frames to show (from :func:`sheet_frames`; ``max_frames`` is then unused).

    Returns:
        ``path`` as str.

    Raises:
        ValueError: no videos, an invalid video (see
            :func:`vdit.eval.metrics.base.check_video`), a caption or ``frame_indices`` count
            that differs from the video count, or ``max_frames < 1``.
    """
    if not videos:
        raise ValueError("contact_sheet needs at least one video")
    if captions is not None and len(captions) != len(videos):
        raise ValueError(f"got {len(captions)} captions for {len(videos)} videos")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1; got {max_frames}")
    if frame_indices is not None and len(frame_indices) != len(videos):
        raise ValueError(f"got {len(frame_indices)} frame index lists for {len(videos)} videos")
    rows = []
    for v, video in enumerate(videos):
        if frame_indices is None:
            picks, frames = sheet_frames(video, max_frames)
        else:
            picks, frames = np.asarray(frame_indices[v]), np.asarray(video)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(picks) \
                    or not len(picks):
                raise ValueError(f"video {v}: picked frames must be uint8 (K, H, W, 3) with K = {len(picks)} "
                                 f"frame numbers (K >= 1); got {frames.dtype} {frames.shape}")
        H = frames.shape[1]
        scale = max(1, math.ceil(min_height / H))
        tiles = [np.kron(frame, np.ones((scale, scale, 1), np.uint8)) for frame in frames]
        th, tw = tiles[0].shape[:2]
        strip = np.full((th, len(tiles) * (tw + _GAP) - _GAP, 3), _BG, np.uint8)
        for j, tile in enumerate(tiles):
            strip[:, j * (tw + _GAP):j * (tw + _GAP) + tw] = tile
        rows.append((strip, v, picks, captions[v] if captions is not None else None))
    width = max(max(strip.shape[1] for strip, *_ in rows), 320)
    blocks = []
    for strip, v, picks, text in rows:
        head = f"#{v}  frames {', '.join(str(int(i)) for i in picks)}"
        lines = [head] + (_wrap(text, width - 8) if text else [])
        header = np.full((_LINE_H * len(lines) + 6, width, 3), _BG, np.uint8)
        for n, line in enumerate(lines):
            cv2.putText(header, line, (4, _LINE_H * (n + 1)), _FONT, _FONT_SCALE, _TEXT, 1, cv2.LINE_AA)
        body = np.full((strip.shape[0], width, 3), _BG, np.uint8)
        body[:, :strip.shape[1]] = strip
        blocks += [header, body, np.full((_GAP * 2, width, 3), _BG, np.uint8)]
    sheet = np.concatenate(blocks, axis=0)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(sheet).save(path, format="PNG")
    return path
