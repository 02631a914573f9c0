"""vdit.data.decode: frame-index selection and decord decoding from bytes (tiny fixtures)."""

import numpy as np
import pytest

from vdit.data.decode import DecodeError, decode_clip, decode_frames, probe, select_frame_indices
from vdit.data.video_io import encode_mp4

NUM_FRAMES, FPS, SIZE = 24, 12.0, 32


def gray_frames(n: int, step: int = 8) -> np.ndarray:
    """uint8 (n, SIZE, SIZE, 3): frame i is solid gray level step * i."""
    levels = (np.arange(n) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, SIZE, SIZE, 3)).copy()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode_mp4(gray_frames(NUM_FRAMES), FPS)


def levels_of(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(frames.shape[0], -1).mean(axis=1)


# ---- select_frame_indices -------------------------------------------------------------------


def test_select_default_is_contiguous_from_zero():
    assert select_frame_indices(100, 30.0, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_select_stride_sorted_and_count(stride):
    idx = select_frame_indices(40, 30.0, 8, stride=stride, rng=np.random.default_rng(0))
    assert len(idx) == 8
    assert idx == sorted(idx)
    assert all(b - a == stride for a, b in zip(idx, idx[1:]))
    assert 0 <= idx[0] and idx[-1] < 40


def test_select_target_fps_halves_rate():
    idx = select_frame_indices(60, 30.0, 10, target_fps=15.0)
    assert idx == list(range(0, 20, 2))


def test_select_fractional_step_rounds_half_up():
    # 25 fps -> 10 fps: step 2.5 -> offsets 0, 2.5, 5, 7.5, 10 rounded half up
    assert select_frame_indices(50, 25.0, 5, target_fps=10.0) == [0, 3, 5, 8, 10]


def test_select_explicit_start_and_exact_fit():
    assert select_frame_indices(10, 30.0, 5, stride=2, start=1) == [1, 3, 5, 7, 9]
    with pytest.raises(DecodeError) as e:
        select_frame_indices(10, 30.0, 5, stride=2, start=2)
    assert e.value.reason == "too_short"


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_source_frames=7, num_frames=8), dict(num_source_frames=14, num_frames=8, stride=2),
     dict(num_source_frames=28, num_frames=15, target_fps=15.0)],
)
def test_select_too_short(kwargs):
    with pytest.raises(DecodeError) as e:
        select_frame_indices(source_fps=30.0, **kwargs)
    assert e.value.reason == "too_short"


def test_select_random_start_is_seeded_and_in_range():
    a = [select_frame_indices(100, 30.0, 8, stride=2, rng=np.random.default_rng(s)) for s in range(20)]
    b = [select_frame_indices(100, 30.0, 8, stride=2, rng=np.random.default_rng(s)) for s in range(20)]
    assert a == b
    starts = {idx[0] for idx in a}
    assert len(starts) > 1 and min(starts) >= 0 and max(starts) <= 100 - 15


def test_select_bad_arguments():
    with pytest.raises(ValueError):
        select_frame_indices(100, 30.0, 8, stride=2, target_fps=15.0)
    with pytest.raises(ValueError):
        select_frame_indices(100, 30.0, 0)
    with pytest.raises(ValueError):
        select_frame_indices(100, 30.0, 4, stride=0)


# ---- decoding -------------------------------------------------------------------------------


def test_probe(mp4):
    info = probe(mp4)
    assert (info.num_frames, info.height, info.width) == (NUM_FRAMES, SIZE, SIZE)
    assert info.fps == pytest.approx(FPS)
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS)


def test_decode_frames_keeps_requested_order(mp4):
    request = [20, 3, 11, 3, 0]
    frames = decode_frames(mp4, request)
    assert frames.dtype == np.uint8 and frames.shape == (5, SIZE, SIZE, 3)
    np.testing.assert_allclose(levels_of(frames), 8.0 * np.array(request), atol=3)


def test_decode_frames_out_of_range(mp4):
    with pytest.raises(DecodeError) as e:
        decode_frames(mp4, [0, NUM_FRAMES])
    assert e.value.reason == "out_of_range"


@pytest.mark.parametrize(
    "data, reasons",
    [(b"", {"empty"}), (b"this is not a video at all " * 40, {"not_video"}), ("truncated", {"corrupt"})],
)
def test_decode_bad_bytes_raise_decode_error(mp4, data, reasons):
    if data == "truncated":
        data = mp4[: len(mp4) // 2]
    with pytest.raises(DecodeError) as e:
        decode_frames(data, [0], name="clip.mp4")
    assert e.value.reason in reasons
    assert "clip.mp4" in str(e.value)
    with pytest.raises(DecodeError):
        decode_clip(data, 4)


def test_decode_clip_stride_and_determinism(mp4):
    frames, info = decode_clip(mp4, 6, stride=2, rng=np.random.default_rng(3))
    again, info2 = decode_clip(mp4, 6, stride=2, rng=np.random.default_rng(3))
    assert info["indices"] == info2["indices"] and np.array_equal(frames, again)
    idx = info["indices"]
    assert len(idx) == 6 and all(b - a == 2 for a, b in zip(idx, idx[1:]))
    assert info["fps"] == pytest.approx(FPS / 2) and info["source_fps"] == pytest.approx(FPS)
    np.testing.assert_allclose(levels_of(frames), 8.0 * np.array(idx), atol=3)


def test_decode_clip_target_fps_and_too_short(mp4):
    _, info = decode_clip(mp4, 4, target_fps=6.0)
    assert info["indices"] == [0, 2, 4, 6]
    with pytest.raises(DecodeError) as e:
        decode_clip(mp4, NUM_FRAMES + 1)
    assert e.value.reason == "too_short"


@pytest.mark.parametrize("width", [16, 48])
def test_narrow_widths_decode_despite_decord_bug(width):
    frames = np.broadcast_to(gray_frames(6)[:, :8, :1], (6, 8, width, 3)).copy()
    data = encode_mp4(frames, FPS)
    assert probe(data).width == width
    np.testing.assert_allclose(levels_of(decode_frames(data, [5, 1])), [40, 8], atol=3)
