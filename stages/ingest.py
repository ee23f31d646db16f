"""Ingest: a scene's raw video or images -> upright, resized frames, camera groups and a frame manifest.

Video: every frame is decoded (PyAV, timestamps from pts * time_base, so variable frame rate is fine) and
scored at `flow_width`: sharpness is the variance of the Laplacian, motion the median optical-flow
displacement of corners tracked from the previous frame. A frame becomes a keyframe candidate once the
camera has moved `keyframe_motion` pixels since the last keyframe; of the candidates that follow (at most
`keyframe_window`, and only while the motion stays below twice the threshold, so keyframes never drift far
apart) the sharpest is kept. Frames far blurrier than their neighbours are never kept; near-duplicate
(static) frames never reach the motion threshold. More keyframes than `max_frames` raise the threshold.

Images (`images/`, and `queries/` for both kinds of scene): EXIF-upright, downscaled to `max_edge` (never
upscaled), grouped by camera: (upright source size, EXIF make, model, known intrinsics) -> integer group.
Unreadable, truncated, empty or non-image files, exact duplicates, images whose shorter side is below
`min_image_edge` and blank ones (grey standard deviation below BLANK_GREY_STD levels: nothing to match)
are quarantined with a reason rather than failing the run; blank video frames are skipped as keyframe
candidates. Too few usable mapping frames (`min_frames`) is an error. Query frames come from `queries/`
when it exists, else every `query_every`-th kept mapping frame is held out.

Capture order: a video is a sequence; images/ is one when its file names count up in one integer field
(000000.png.., frame_0001.jpg.., IMG_1234.JPG..; stages.common.scene.sequence_order), and is then read in
that numeric order (frame_index = position in capture order), else by name. metrics.json records
`sequence` (true|false) and `sequence_from` (video | file names | scene.yaml); sfm checks that consecutive
frames overlap before trusting it.

scene.yaml (optional, in the scene folder beside images/ or the video) holds facts about this capture that
override params.yaml for this scene only (stages.common.scene.SceneSettings): `camera_height_m` (metres
above the road; null = sfm.camera_height_m), `metric_scale` (auto | camera_height | none) and `sequence`
(true | false forces the judgement above; null = decide from the names), e.g.

    camera_height_m: 1.65
    metric_scale: camera_height

A malformed scene.yaml is an error naming the key. Ingest writes the settings, every key with nulls, to
`scene.yaml` in --out, where later stages read them (stages.common.scene.read_scene_settings).

Ground truth from transforms.json is carried for evaluation only: poses into the manifest (cam_from_world
columns `gt_cam_from_world_*`), intrinsics scaled to the output size into cameras.json, `metric` into
capture.json.

Outputs in --out (layout owned by stages.common.artifacts): images/ and queries/ (frames), manifest.csv (one
row per decoded video frame or input file, quarantined ones included; `name` is relative to --out),
cameras.json (per camera group), capture.json (source kind, whether it is a sequence, whether ground truth is
metric), scene.yaml, truth/ (the scene's hdmap.geojson and points.ply, when it has them), metrics.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages.common.artifacts import GT_PREFIX, METRICS, Capture, pose_columns, pose_record, write_ingest
from stages.common.cli import guarded, make_parser
from stages.common.errors import StageError
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require
from stages.common.scene import (
    Intrinsics,
    Transforms,
    find_scene_inputs,
    norm_rel,
    read_scene_settings,
    read_transforms,
)

log = logging.getLogger("scenepipe.ingest")


@dataclasses.dataclass(frozen=True)
class IngestParams:
    """Params of the ingest stage (params.yaml section `ingest`)."""

    max_edge: int = 1600
    """Longest side of written frames in pixels; larger inputs are downscaled, smaller ones never upscaled."""
    image_format: Literal["png", "jpg"] = "png"
    """File format of written frames: png is lossless, jpg (quality 95) is smaller."""
    min_frames: int = 3
    """Fewest usable mapping frames; fewer is an error saying what was quarantined or skipped."""
    query_every: int = 10
    """Without a queries/ folder, hold out every N-th kept mapping frame as a query; 0 holds out none."""
    keyframe_motion: float = 3.0
    """Video: motion since the last keyframe (px at `flow_width`) that makes a frame a candidate; 0 keeps all sharp."""
    keyframe_window: int = 5
    """Video: the sharpest of up to this many consecutive candidates becomes the keyframe."""
    blur_ratio: float = 0.5
    """Video: a frame whose sharpness is below this fraction of its neighbours' median is rejected; 0 disables."""
    max_frames: int = 300
    """Video: most keyframes kept; with more, the motion threshold is raised until they fit."""
    flow_width: int = 640
    """Video: width in pixels at which frames are scored, so motion thresholds do not depend on resolution."""
    min_image_edge: int = 32
    """Images and video frames whose shorter side is below this many pixels are quarantined: too small to match."""

    def __post_init__(self) -> None:
        # A ValueError here becomes a StageError naming the params section (stages.common.params.build).
        require(self, [  # (ok, key, what is required)
            (self.max_edge >= 16, "max_edge", "is not allowed; it must be >= 16"),
            (self.min_frames >= 1, "min_frames", "is not allowed; it must be >= 1"),
            (self.query_every == 0 or self.query_every >= 2, "query_every", "is not allowed; it must be 0 or >= 2"),
            (self.keyframe_motion >= 0, "keyframe_motion", "is not allowed; it must be >= 0"),
            (self.keyframe_window >= 1, "keyframe_window", "is not allowed; it must be >= 1"),
            (0 <= self.blur_ratio < 1, "blur_ratio", "is not allowed; it must be in [0, 1)"),
            (self.max_frames >= 1, "max_frames", "is not allowed; it must be >= 1"),
            (self.flow_width >= 64, "flow_width", "is not allowed; it must be >= 64"),
            (self.min_image_edge >= 1, "min_image_edge", "is not allowed; it must be >= 1"),
        ])


INPUTS = {"scene": "scene folder: images/ or one video, optional queries/, transforms.json and scene.yaml"}
OUTPUTS = {"out": "output folder: images/, queries/, manifest.csv, cameras.json, scene.yaml, capture.json, "
                  "truth/, metrics.json"}

MANIFEST_COLUMNS = [
    "name", "source", "frame_index", "timestamp", "split", "reason", "sharpness", "sharpness_rel", "motion_px",
    "camera", "width", "height", "src_width", "src_height", "make", "model", *pose_columns(GT_PREFIX),
]
# Decoding and scoring frames is CPU work.
USES_GPU = False
JPEG_QUALITY = 95
# Relative sharpness compares a frame with the median of this many frames on each side.
BLUR_NEIGHBOURS = 3
# First bytes of common image formats: tells a damaged image from a file that is no image at all.
IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"GIF8": "GIF"}
# Fewer surviving corner tracks than this and the motion estimate is noise: call tracking lost.
MIN_TRACKS = 12
# Blank: grey values (0-255, at scoring size) spread less than this. A flat field after 8-bit quantisation
# and compression spreads well below 1 level; any lit surface, even a dim low-contrast wall, spreads over
# several (real captures here: 35 and more). For scale, COLMAP's SIFT keeps only extrema above ~1.7 grey
# levels of difference-of-Gaussians response: below this there is nothing to match, only SfM to confuse.
BLANK_GREY_STD = 2.0


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What `run` wrote: the output folder, its metrics and the manifest table."""

    out_dir: Path
    metrics: dict
    manifest: pd.DataFrame


# --------------------------------------------------------------------------------------------- scoring


def scoring_grey(pixels: np.ndarray, flow_width: int) -> tuple[np.ndarray, float]:
    """Grey copy at most `flow_width` wide, and the factor from its pixels to pixels at `flow_width`."""
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels
    h, w = grey.shape
    if w > flow_width:
        # INTER_AREA averages, so sharpness and corners are not dominated by aliasing.
        grey = cv2.resize(grey, (flow_width, max(1, round(h * flow_width / w))), interpolation=cv2.INTER_AREA)
    return grey, flow_width / grey.shape[1]


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: higher is sharper."""
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def blank_reason(grey: np.ndarray) -> str:
    """Why a grey image holds nothing to match (standard deviation below BLANK_GREY_STD levels), or ""."""
    std = float(grey.std())
    return f"blank: no texture (grey std {std:.1f} < {BLANK_GREY_STD:g})" if std < BLANK_GREY_STD else ""


def too_small_reason(width: int, height: int, min_edge: int) -> str:
    """Why a `width` x `height` image is too small to use (shorter side below `min_edge`), or ""."""
    if min(width, height) >= min_edge:
        return ""
    return f"too small: {width}x{height} px, below ingest.min_image_edge={min_edge}"


def track_motion(prev_grey: np.ndarray, grey: np.ndarray) -> float:
    """Median displacement in pixels of corners tracked from `prev_grey` to `grey`; NaN when tracking fails."""
    pts_N12 = cv2.goodFeaturesToTrack(prev_grey, maxCorners=400, qualityLevel=0.01, minDistance=8, blockSize=7)
    if pts_N12 is None or len(pts_N12) < MIN_TRACKS:
        return math.nan
    lk = dict(winSize=(21, 21), maxLevel=3)
    nxt_N12, ok_fwd, _ = cv2.calcOpticalFlowPyrLK(prev_grey, grey, pts_N12, None, **lk)
    back_N12, ok_bwd, _ = cv2.calcOpticalFlowPyrLK(grey, prev_grey, nxt_N12, None, **lk)
    # Forward-backward check: a track that does not return to its start is a mismatch, not motion.
    fb_err_N = np.linalg.norm((back_N12 - pts_N12)[:, 0], axis=1)
    good_N = (ok_fwd[:, 0] == 1) & (ok_bwd[:, 0] == 1) & (fb_err_N < 1.0)
    if good_N.sum() < MIN_TRACKS:
        return math.nan
    return float(np.median(np.linalg.norm((nxt_N12 - pts_N12)[:, 0][good_N], axis=1)))


def relative_sharpness(sharpness_N: Sequence[float], radius: int = BLUR_NEIGHBOURS) -> np.ndarray:
    """Each frame's sharpness over the median of its neighbours within `radius` frames (NaN = not scored)."""
    s_N = np.asarray(sharpness_N, float)
    rel_N = np.full(len(s_N), math.nan)
    for i, s in enumerate(s_N):
        if not math.isfinite(s):
            continue
        nb = np.concatenate([s_N[max(0, i - radius):i], s_N[i + 1:i + 1 + radius]])
        nb = nb[np.isfinite(nb)]
        if nb.size == 0:
            rel_N[i] = 1.0
            continue
        med = float(np.median(nb))
        # Blank frames among blank frames score 0, so they count as blurred rather than "as sharp as usual".
        rel_N[i] = s / med if med > 0 else (math.inf if s > 0 else 0.0)
    return rel_N


@dataclasses.dataclass(frozen=True)
class KeyframeChoice:
    """Which video frames are keyframes, why each frame was or was not kept, and the threshold used."""

    keep_N: np.ndarray
    reasons: list[str]
    sharpness_rel_N: np.ndarray
    motion_threshold: float


def _px(value: float) -> str:
    return f"{value:.1f} px" if math.isfinite(value) else "? px (tracking lost)"


def select_keyframes(sharpness_N: Sequence[float], motion_N: Sequence[float], *, min_motion: float,
                     window: int, blur_ratio: float) -> KeyframeChoice:
    """Choose keyframes from per-frame sharpness (NaN: unusable) and motion from the previous frame (NaN: lost)."""
    sharp_N = np.asarray(sharpness_N, float)
    n = len(sharp_N)
    # Lost tracking means the view changed a lot, which is exactly when a keyframe is needed.
    step_N = np.where(np.isnan(np.asarray(motion_N, float)), math.inf, np.asarray(motion_N, float))
    rel_N = relative_sharpness(sharp_N)
    keep_N = np.zeros(n, bool)
    reasons = [""] * n
    last, acc = -1, 0.0  # last keyframe; motion accumulated since it
    cands: list[int] = []
    moved: dict[int, float] = {}

    for j in range(n):
        if last >= 0:
            acc += step_N[j]
        if not math.isfinite(sharp_N[j]):
            reasons[j] = "unusable: not scored"
        elif rel_N[j] < blur_ratio:
            reasons[j] = f"blurred: sharpness {rel_N[j]:.0%} of its neighbours' median (blur_ratio={blur_ratio:g})"
        elif last < 0:
            keep_N[j], reasons[j], last, acc = True, "keyframe: first sharp frame", j, 0.0
            continue
        elif acc < min_motion:
            reasons[j] = f"static: moved {_px(acc)} since keyframe {last} (keyframe_motion={min_motion:g})"
        else:
            cands.append(j)
            moved[j] = acc
        next_acc = acc + step_N[j + 1] if j + 1 < n else math.inf
        if cands and (len(cands) >= window or next_acc >= 2 * min_motion):
            best = max(cands, key=lambda c: sharp_N[c])
            keep_N[best] = True
            reasons[best] = (f"keyframe: moved {_px(moved[best])} since keyframe {last}, sharpest of "
                             f"{len(cands)} candidate{'s' if len(cands) > 1 else ''}")
            for c in cands:
                if c != best:
                    reasons[c] = f"window: frame {best} nearby was sharper"
            # Summed afresh rather than subtracted, so a lost track (inf) does not turn into NaN.
            acc = float(step_N[best + 1:j + 1].sum())
            last, cands = best, []
    return KeyframeChoice(keep_N, reasons, rel_N, min_motion)


def cap_keyframes(sharpness_N: Sequence[float], motion_N: Sequence[float], params: IngestParams
                  ) -> tuple[KeyframeChoice, str]:
    """`select_keyframes` with `params`, raising the motion threshold until at most `max_frames` are kept."""
    def choose(threshold: float) -> KeyframeChoice:
        return select_keyframes(sharpness_N, motion_N, min_motion=threshold, window=params.keyframe_window,
                                blur_ratio=params.blur_ratio)

    choice = choose(params.keyframe_motion)
    n0 = int(choice.keep_N.sum())
    if n0 <= params.max_frames:
        return choice, ""
    # The count is not strictly monotonic in the threshold (windows shift), so bisect on "fits or not" and
    # keep the smallest threshold seen to fit.
    lo, hi = params.keyframe_motion, max(params.keyframe_motion, 0.5) * 2
    for _ in range(60):
        if choose(hi).keep_N.sum() <= params.max_frames:
            break
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = (lo + hi) / 2
        if choose(mid).keep_N.sum() > params.max_frames:
            lo = mid
        else:
            hi = mid
    choice = choose(hi)
    note = f"{n0} keyframes exceed max_frames={params.max_frames}: keyframe_motion raised to {hi:.2f} px"
    kept = np.flatnonzero(choice.keep_N)
    if len(kept) > params.max_frames:
        # Only frames with lost tracking can survive any threshold; thin those out evenly.
        stay = set(kept[np.round(np.linspace(0, len(kept) - 1, params.max_frames)).astype(int)].tolist())
        for i in kept:
            if i not in stay:
                choice.keep_N[i] = False
                choice.reasons[i] = f"cap: dropped to keep max_frames={params.max_frames}"
        note += ", then subsampled evenly"
    return choice, note


def match_timestamps(frame_t_N: Sequence[float], gt_t_M: Sequence[float]) -> np.ndarray:
    """Index of the ground-truth timestamp nearest each frame's, or -1 when none is within half a frame interval."""
    f_N = np.asarray(frame_t_N, float)
    g_M = np.asarray(gt_t_M, float)
    out_N = np.full(len(f_N), -1, int)
    if len(f_N) == 0 or len(g_M) == 0:
        return out_N
    # Half the gap to the nearer neighbour frame: correct under variable frame rate too.
    gaps = np.diff(f_N)
    before_N = np.concatenate([[math.inf], gaps])
    after_N = np.concatenate([gaps, [math.inf]])
    tol_N = 0.5 * np.minimum(before_N, after_N) + 1e-6
    order = np.argsort(g_M)
    g_sorted = g_M[order]
    pos = np.searchsorted(g_sorted, f_N)
    for i, (t, p) in enumerate(zip(f_N, pos, strict=True)):
        near = [k for k in (p - 1, p) if 0 <= k < len(g_sorted)]
        k = min(near, key=lambda k: abs(g_sorted[k] - t))
        if abs(g_sorted[k] - t) <= tol_N[i]:
            out_N[i] = order[k]
    return out_N


def assign_camera_groups(keys: Sequence[Hashable | None]) -> list[int | None]:
    """Integer group id per key, numbered in order of first appearance; None stays None."""
    ids: dict[Hashable, int] = {}
    return [None if k is None else ids.setdefault(k, len(ids)) for k in keys]


def fit_size(width: int, height: int, max_edge: int) -> tuple[int, int]:
    """Output size for a `width` x `height` image: longest side at most `max_edge`, never upscaled."""
    scale = min(1.0, max_edge / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---------------------------------------------------------------------------------------------- inputs


class Unusable(Exception):
    """An input file that is quarantined instead of ingested; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A decoded image: upright 8-bit grey (HxW) or RGB (HxWx3) pixels and its EXIF camera."""

    pixels: np.ndarray
    make: str
    model: str


def _exif_text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value or "").strip().strip("\x00").strip()


def jpeg_damage(data: bytes) -> str:
    """Why a JPEG byte stream is damaged, or "" when its markers are well formed up to end-of-image.

    libjpeg only warns about corrupt compressed data and decodes it into garbage pixels, so Pillow
    accepts such a file; walking the marker segments finds what it glosses over.
    """
    n, i = len(data), 2  # after SOI
    truncated = "truncated JPEG: the data ends before the end-of-image marker"
    while True:
        if i >= n:
            return truncated
        if data[i] != 0xFF:
            return f"corrupt JPEG: expected a marker at byte {i}, found 0x{data[i]:02X}"
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return truncated
        marker, i = data[i], i + 1
        if marker == 0xD9:  # EOI; anything after it (camera trailers, MPF) is not the main image
            return ""
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        if marker < 0xC0:
            return f"corrupt JPEG: invalid marker 0xFF{marker:02X} at byte {i - 2}"
        if i + 2 > n:
            return truncated
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2 or i + length > n:
            return (f"corrupt JPEG: marker 0xFF{marker:02X} at byte {i - 2} claims {length} bytes, "
                    f"the file holds {n - i}")
        i += length
        if marker != 0xDA:  # only a start-of-scan is followed by compressed data
            continue
        while True:  # compressed data: 0xFF is only ever followed by 0x00 (stuffing) or RSTn
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                return truncated
            nxt = data[j + 1]
            if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                i = j + 2
            elif nxt == 0xFF:
                i = j + 1
            elif nxt < 0xC0:
                return f"corrupt JPEG: invalid marker 0xFF{nxt:02X} in the compressed data at byte {j}"
            else:
                i = j
                break


def load_image(path: Path) -> LoadedImage:
    """Decode an image file completely and EXIF-upright; an unusable file raises Unusable with the reason."""
    if path.stat().st_size == 0:
        raise Unusable("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not half-way through writing
            damage = jpeg_damage(path.read_bytes()) if im.format == "JPEG" else ""
            exif = im.getexif()
            upright = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(8)
        kind = next((k for magic, k in IMAGE_MAGIC.items() if head.startswith(magic)), None)
        if kind:
            raise Unusable(f"unreadable image: starts like a {kind} but its header is corrupt") from None
        raise Unusable("not an image: no known image format in its bytes") from None
    except Image.DecompressionBombError as exc:
        raise Unusable(f"too large to decode safely: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a broken file can fail anywhere in a decoder; quarantine, don't crash
        raise Unusable(f"unreadable image: {type(exc).__name__}: {exc}") from None
    if damage:
        raise Unusable(damage)
    if upright.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(upright, np.float64)
        pixels = np.clip(arr / (257.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8)
    elif upright.mode in ("1", "L", "LA"):
        pixels = np.asarray(upright.convert("L"))
    else:
        pixels = np.asarray(upright.convert("RGB"))
    return LoadedImage(np.ascontiguousarray(pixels), _exif_text(exif.get(0x010F)), _exif_text(exif.get(0x0110)))


def _upright_video_frame(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a video's display rotation (degrees counter-clockwise, PyAV's VideoFrame.rotation)."""
    turn = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, -90: cv2.ROTATE_90_CLOCKWISE, 270: cv2.ROTATE_90_CLOCKWISE,
            180: cv2.ROTATE_180, -180: cv2.ROTATE_180}.get(int(rotation))
    return rgb if turn is None else cv2.rotate(rgb, turn)


class VideoFrames:
    """The frames of one video, upright, in presentation order; iterating again decodes again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise StageError(f"{path} holds no video stream; put a video or an images/ folder in the scene")
                stream = container.streams.video[0]
                self.expected_frames = int(stream.frames or 0)
                self.fps = float(stream.average_rate or 0.0)
                if stream.duration is not None and stream.time_base is not None:
                    self.duration_s = float(stream.duration * stream.time_base)
                else:
                    self.duration_s = float(container.duration or 0) / av.time_base
        except (av.error.FFmpegError, OSError) as exc:
            raise StageError(f"{path}: cannot be opened as a video ({exc}); the file is damaged or truncated "
                             "(an mp4 cut before its index cannot be read); re-export or replace it") from None
        self.decode_error = ""

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray, bool]]:
        """Yield (frame index, timestamp in seconds, RGB pixels, decoder flagged it corrupt)."""
        self.decode_error = ""
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            i = 0
            try:
                for frame in container.decode(stream):
                    # pts * time_base, so variable frame rate is kept; index / fps only when pts is missing.
                    t = frame.time if frame.time is not None else (i / self.fps if self.fps else float(i))
                    yield i, float(t), _upright_video_frame(frame.to_ndarray(format="rgb24"), frame.rotation), \
                        bool(frame.is_corrupt)
                    i += 1
            except av.error.FFmpegError as exc:
                # A damaged or cut stream: keep what decoded; the caller records the truncation.
                self.decode_error = f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass
class _Row:
    """One manifest row in the making, plus what camera grouping needs."""

    source: str
    frame_index: int
    split: str
    reason: str = ""
    name: str = ""
    timestamp: float = math.nan
    sharpness: float = math.nan
    sharpness_rel: float = math.nan
    motion_px: float = math.nan
    camera: int | None = None
    width: int | None = None
    height: int | None = None
    src_width: int | None = None
    src_height: int | None = None
    make: str = ""
    model: str = ""
    cam_from_world_34: np.ndarray | None = None
    intrinsics: Intrinsics | None = None  # in source pixels

    @property
    def written(self) -> bool:
        """True for frames written to images/ or queries/."""
        return self.split in ("mapping", "query")

    def record(self) -> dict:
        """The manifest row: the columns of MANIFEST_COLUMNS, ground truth as a cam_from_world pose."""
        return {**{c: getattr(self, c) for c in MANIFEST_COLUMNS if not c.startswith(GT_PREFIX)},
                **pose_record(GT_PREFIX, self.cam_from_world_34)}


def _quarantine(row: _Row, reason: str) -> None:
    row.split, row.reason = "quarantined", reason
    log.warning("quarantined %s: %s", row.source, reason)


def _write_frame(path: Path, pixels: np.ndarray, size: tuple[int, int], fmt: str) -> None:
    if (pixels.shape[1], pixels.shape[0]) != size:
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels
    flags = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpg" else []
    if not cv2.imwrite(str(path), bgr, flags):
        raise OSError(f"could not write {path}")


class _Names:
    """Output file names per folder, made unique when two inputs share a stem (a.jpg and a.png)."""

    def __init__(self, fmt: str):
        self.fmt, self.used = fmt, set()

    def take(self, folder: str, stem: str, suffix: str = "") -> str:
        name = f"{folder}/{stem}.{self.fmt}"
        if name in self.used:
            name = f"{folder}/{stem}_{suffix.lstrip('.').lower() or 'dup'}.{self.fmt}"
        n = 2
        while name in self.used:
            name, n = f"{folder}/{stem}_{n}.{self.fmt}", n + 1
        self.used.add(name)
        return name


def _ingest_files(files: Sequence[Path], *, split: str, hold_out: int, scene_dir: Path, tmp: Path,
                  params: IngestParams, names: _Names, seen: dict[str, str],
                  transforms: Transforms | None) -> list[_Row]:
    """Load, check, upright, resize and write image files; held-out mapping frames become queries."""
    gt_by_path = transforms.by_path() if transforms else {}
    rows: list[_Row] = []
    kept = 0
    folder = files[0].parent.name if files else ""
    for index, path in enumerate(tqdm(files, desc=f"ingest: {folder}", unit="image", disable=None)):
        rel = norm_rel(path.relative_to(scene_dir).as_posix())
        row = _Row(source=rel, frame_index=index, split=split)
        rows.append(row)
        try:
            img = load_image(path)
        except Unusable as exc:
            _quarantine(row, str(exc))
            continue
        h, w = img.pixels.shape[:2]
        # Before the duplicate check: six identical 1x1 files are "too small", which says what to fix.
        why = too_small_reason(w, h, params.min_image_edge)
        grey = scoring_grey(img.pixels, params.flow_width)[0] if not why else None
        why = why or blank_reason(grey)
        if why:
            _quarantine(row, why)
            continue
        digest = hashlib.sha1(repr(img.pixels.shape).encode() + img.pixels.tobytes()).hexdigest()
        if digest in seen:
            _quarantine(row, f"duplicate of {seen[digest]}")
            continue
        seen[digest] = rel
        row.src_height, row.src_width = h, w
        row.width, row.height = fit_size(row.src_width, row.src_height, params.max_edge)
        row.make, row.model = img.make, img.model
        row.sharpness = sharpness(grey)
        gt = gt_by_path.get(rel)
        row.cam_from_world_34 = gt.cam_from_world_34 if gt else None
        row.intrinsics = gt.intrinsics if gt else (transforms.intrinsics if transforms else None)
        if split == "mapping":
            kept += 1
            if hold_out and kept % hold_out == 0:
                row.split, row.reason = "query", f"held out: kept frame {kept} (query_every={hold_out})"
        row.name = names.take("images" if row.split == "mapping" else "queries", path.stem, path.suffix)
        _write_frame(tmp / row.name, img.pixels, (row.width, row.height), params.image_format)
    return rows


def _ingest_video(video: Path, *, hold_out: int, scene_dir: Path, tmp: Path, params: IngestParams,
                  names: _Names, transforms: Transforms | None) -> tuple[list[_Row], dict]:
    """Score every frame, choose keyframes, write them, and return one row per decoded frame plus video facts."""
    frames = VideoFrames(video)
    rel = norm_rel(video.relative_to(scene_dir).as_posix())
    ts, sharp, motion, sizes = [], [], [], []
    unusable: list[str] = []  # per frame: why it is quarantined (corrupt, too small), or ""
    blank: list[str] = []  # per frame: why it is blank, or ""
    prev = None
    bar = tqdm(frames, total=frames.expected_frames or None, desc=f"ingest: scoring {video.name}", unit="frame",
               disable=None)
    for _i, t, rgb, bad in bar:
        ts.append(t)
        h, w = rgb.shape[:2]
        sizes.append((w, h))
        unusable.append("corrupt: the decoder flagged this frame as damaged" if bad
                        else too_small_reason(w, h, params.min_image_edge))
        blank.append("")
        if unusable[-1]:
            sharp.append(math.nan)
            motion.append(math.nan)
            continue  # `prev` stays: the next frame's motion then spans this one
        grey, scale = scoring_grey(rgb, params.flow_width)
        sharp.append(sharpness(grey))
        blank[-1] = blank_reason(grey)
        if blank[-1]:
            # Nothing to track in a blank frame (a black fade, a lens cap): as for a corrupt frame, `prev` stays
            # so the next textured frame's motion is measured from the last textured one.
            motion.append(math.nan)
            continue
        motion.append(math.nan if prev is None or prev.shape != grey.shape else track_motion(prev, grey) * scale)
        prev = grey
    n = len(ts)
    if n == 0:
        raise StageError(f"{video}: no frame could be decoded ({frames.decode_error or 'the video stream is empty'}); "
                         "the file is truncated or not a video; re-export or replace it")

    truncated, warning = _truncation(frames, ts)
    if truncated:
        log.warning(warning)
    # Corrupt, too small and blank frames are never candidates and add no motion: the next good frame's motion
    # already spans them. Their sharpness is left out too, so a black fade does not lower its neighbours' median.
    skip_N = np.array([bool(u or b) for u, b in zip(unusable, blank, strict=True)], bool)
    motion_for_choice = np.where(skip_N, 0.0, np.asarray(motion, float))
    sharp_for_choice = np.where(skip_N, math.nan, np.asarray(sharp, float))
    choice, cap_note = cap_keyframes(sharp_for_choice, motion_for_choice, params)
    if cap_note:
        log.info(cap_note)

    gt_frames = [f for f in (transforms.video_frames() if transforms else []) if f.file_path == rel]
    gt_idx = match_timestamps(ts, [f.timestamp for f in gt_frames])
    base_intr = transforms.intrinsics if transforms else None

    rows: list[_Row] = []
    kept = 0
    for i in range(n):
        w, h = sizes[i]
        row = _Row(source=rel, frame_index=i, split="skipped", reason=choice.reasons[i], timestamp=ts[i],
                   sharpness=sharp[i], sharpness_rel=float(choice.sharpness_rel_N[i]), motion_px=motion[i],
                   src_width=w, src_height=h)
        row.width, row.height = fit_size(w, h, params.max_edge)
        gt = gt_frames[gt_idx[i]] if gt_idx[i] >= 0 else None
        row.cam_from_world_34 = gt.cam_from_world_34 if gt else None
        row.intrinsics = gt.intrinsics if gt else base_intr
        if unusable[i]:
            row.split, row.reason = "quarantined", unusable[i]
        elif blank[i]:
            row.reason = blank[i]
        elif choice.keep_N[i]:
            kept += 1
            if hold_out and kept % hold_out == 0:
                row.split, row.reason = "query", f"held out: keyframe {kept} (query_every={hold_out})"
            else:
                row.split = "mapping"
            row.name = names.take("images" if row.split == "mapping" else "queries", f"{i:06d}")
        rows.append(row)

    # Second decode writes the chosen frames, so memory stays one frame whatever the video's length.
    todo = {r.frame_index: r for r in rows if r.written}
    with tqdm(total=len(todo), desc=f"ingest: writing {video.name}", unit="frame", disable=None) as bar:
        for i, _t, rgb, _bad in frames:
            if i in todo:
                r = todo.pop(i)
                _write_frame(tmp / r.name, rgb, (r.width, r.height), params.image_format)
                bar.update()
                if not todo:
                    break
    if todo:
        raise StageError(f"{video}: the second decode ended before frame {min(todo)}; the file changed during "
                         "ingest or decodes non-deterministically; rerun")

    reasons = Counter(r.reason.split(":")[0] for r in rows if r.split == "skipped")
    n_keys = int(choice.keep_N.sum())
    log.info("%s: decoded %d frames (%.1f s); kept %d keyframe%s (keyframe_motion %.2f px at %d px width)%s",
             rel, n, ts[-1] - ts[0], n_keys, "" if n_keys == 1 else "s", choice.motion_threshold, params.flow_width,
             "; skipped " + ", ".join(f"{c} {k}" for k, c in reasons.most_common()) if reasons else "")
    facts = {
        "video_frames_expected": frames.expected_frames, "video_fps": frames.fps,
        "video_truncated": truncated, "keyframe_motion_used": choice.motion_threshold,
        "warnings": [warning] if truncated else [],
    }
    return rows, facts


def _truncation(frames: VideoFrames, ts: list[float]) -> tuple[bool, str]:
    """Whether fewer frames decoded than the container promises, and the warning saying so."""
    n = len(ts)
    interval = float(np.median(np.diff(ts))) if n > 1 else 0.0
    span = ts[-1] - ts[0] + interval
    if frames.decode_error:
        why = f"decoding stopped with {frames.decode_error}"
    elif frames.expected_frames and n < frames.expected_frames:
        why = "the stream ended early"
    elif not frames.expected_frames and frames.duration_s and span < 0.9 * frames.duration_s:
        # Containers such as mkv do not count frames; a cut file still states its full duration.
        why = f"frames cover {span:.2f} s of the stated {frames.duration_s:.2f} s"
    else:
        return False, ""
    of = f" of {frames.expected_frames}" if frames.expected_frames else ""
    return True, f"{frames.path.name} is truncated: decoded {n}{of} frames ({why}); keeping the frames that decoded"


# -------------------------------------------------------------------------------------------- outputs


def _checked_intrinsics(rows: list[_Row]) -> None:
    """Drop known intrinsics whose aspect ratio does not fit the image (e.g. given before an EXIF rotation)."""
    warned = set()
    for r in rows:
        intr = r.intrinsics
        if intr is None or r.src_width is None:
            continue
        if abs(intr.w / intr.h - r.src_width / r.src_height) > 0.01 * r.src_width / r.src_height:
            key = (intr.w, intr.h, r.src_width, r.src_height)
            if key not in warned:
                warned.add(key)
                log.warning("transforms.json intrinsics are for %dx%d but %s is %dx%d (another aspect ratio); "
                            "not using them for such images", intr.w, intr.h, r.source, r.src_width, r.src_height)
            r.intrinsics = None


def _group_cameras(rows: list[_Row]) -> dict[str, dict]:
    """Give each row its camera group id and describe the groups (output size, EXIF camera, intrinsics)."""
    def key(r: _Row) -> tuple:
        return r.src_width, r.src_height, r.make, r.model, r.intrinsics

    # Number the groups over written frames only, so every group in cameras.json has images.
    written = [r for r in rows if r.written]
    ids = dict(zip(map(key, written), assign_camera_groups([key(r) for r in written]), strict=True))
    cameras: dict[str, dict] = {}
    for r in rows:
        if r.src_width is None:
            continue
        r.camera = ids.get(key(r))
        if r.camera is None or not r.written:
            continue
        cam = cameras.setdefault(str(r.camera), {
            "width": r.width, "height": r.height, "src_width": r.src_width, "src_height": r.src_height,
            "make": r.make, "model": r.model, "n_images": 0, "intrinsics": _scaled(r.intrinsics, r.width, r.height),
        })
        cam["n_images"] += 1
    return dict(sorted(cameras.items(), key=lambda kv: int(kv[0])))


def _scaled(intr: Intrinsics | None, width: int, height: int) -> dict | None:
    if intr is None:
        return None
    s = intr.scaled(width, height)
    return {"model": s.model, "fx": s.fx, "fy": s.fy, "cx": s.cx, "cy": s.cy,
            "k1": s.k1, "k2": s.k2, "p1": s.p1, "p2": s.p2}


def _manifest(rows: list[_Row]) -> pd.DataFrame:
    df = pd.DataFrame([r.record() for r in rows], columns=MANIFEST_COLUMNS)
    for col in ("camera", "width", "height", "src_width", "src_height"):
        df[col] = df[col].astype("Int64")  # integers with empty cells for quarantined files
    return df


def _reason_kind(reason: str) -> str:
    """The kind of a skip or quarantine reason ('too small: 1x1 px, ...' -> 'too small')."""
    return "duplicate" if reason.startswith("duplicate of ") else reason.split(":")[0]


def _check_enough(rows: list[_Row], params: IngestParams, scene_dir: Path, video: Path | None) -> None:
    """Raise when fewer than `min_frames` mapping frames survived, saying what happened to the rest."""
    source = [r for r in rows if not r.source.startswith("queries/")]
    n_map = sum(r.split == "mapping" for r in rows)
    if n_map >= params.min_frames:
        return
    count = Counter(r.split for r in source)
    what = f"{len(source)} frames decoded from {video.name}" if video else f"{len(source)} files in images/"
    parts = [what]
    quarantined = [r for r in source if r.split == "quarantined"]
    q_kinds = Counter(_reason_kind(r.reason) for r in quarantined)
    if len(quarantined) > 3:
        # Many files: count them by kind and show one example of each, so the line stays readable.
        first: dict[str, str] = {}
        for r in quarantined:
            first.setdefault(_reason_kind(r.reason), f"{r.source}: {r.reason}")
        kinds = ", ".join(f"{c} {k}" for k, c in q_kinds.most_common())
        parts.append(f"{len(quarantined)} quarantined ({kinds}; e.g. {'; '.join(list(first.values())[:3])})")
    elif quarantined:
        parts.append(f"{len(quarantined)} quarantined ({'; '.join(f'{r.source}: {r.reason}' for r in quarantined)})")
    if count["skipped"]:
        kinds = Counter(_reason_kind(r.reason) for r in source if r.split == "skipped")
        parts.append(f"{count['skipped']} skipped ({', '.join(f'{c} {k}' for k, c in kinds.most_common())})")
    if count["query"]:
        parts.append(f"{count['query']} held out as queries")
    fix = "lower ingest.keyframe_motion or ingest.min_frames" if video else "add images or lower ingest.min_frames"
    if q_kinds["too small"]:
        fix = f"use frames at least {params.min_image_edge} px on the shorter side (ingest.min_image_edge), or {fix}"
    raise StageError(f"only {n_map} usable mapping frame{'' if n_map == 1 else 's'} in {scene_dir} "
                     f"(needs min_frames={params.min_frames}): {', '.join(parts)}; {fix}")


# ------------------------------------------------------------------------------------------------ run


def run(params: IngestParams, *, scene_dir: Path, out_dir: Path) -> IngestResult:
    """Ingest the scene in `scene_dir` into `out_dir`: frames, manifest.csv, cameras.json, scene.yaml, metrics.json."""
    t0 = time.perf_counter()
    scene_dir, out_dir = Path(scene_dir), Path(out_dir)
    settings = read_scene_settings(scene_dir)
    inputs = find_scene_inputs(scene_dir, sequence=settings.sequence)
    transforms = read_transforms(scene_dir)
    warnings: list[str] = []
    if inputs.video is not None and settings.sequence is False:
        warnings.append(f"scene.yaml says sequence: false, but {inputs.video.name} is a video, always a sequence")
        log.warning(warnings[-1])
    elif inputs.video is None:
        log.info("images/ %s (decided by %s)%s", "is a sequence, read in capture order" if inputs.sequence
                 else "is not a sequence, read by name", inputs.sequence_from,
                 f": {inputs.images[0].name} .. {inputs.images[-1].name}" if inputs.sequence else "")
    hold_out = 0 if inputs.queries else params.query_every
    if inputs.queries and params.query_every:
        log.info("using the %d images in queries/ as queries (query_every is ignored)", len(inputs.queries))

    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "queries").mkdir()
        names = _Names(params.image_format)
        seen: dict[str, str] = {}  # pixel hash -> first source with those pixels
        common = dict(scene_dir=scene_dir, tmp=tmp, params=params, names=names, transforms=transforms)
        facts: dict = {"video_truncated": False, "warnings": []}
        if inputs.video is not None:
            rows, video_facts = _ingest_video(inputs.video, hold_out=hold_out, **common)
            facts.update(video_facts)
        else:
            rows = _ingest_files(inputs.images, split="mapping", hold_out=hold_out, seen=seen, **common)
        facts["warnings"] = warnings + facts["warnings"]
        rows += _ingest_files(inputs.queries, split="query", hold_out=0, seen=seen, **common)
        _check_enough(rows, params, scene_dir, inputs.video)
        _checked_intrinsics(rows)
        cameras = _group_cameras(rows)
        manifest = _manifest(rows)
        capture = Capture("video" if inputs.video is not None else "images", inputs.sequence, inputs.sequence_from,
                          transforms.metric if transforms else None)
        write_ingest(tmp, manifest, cameras, capture, settings, scene_dir)
        split = Counter(r.split for r in rows)
        metrics = {
            "source_kind": capture.source_kind,
            "sequence": capture.sequence,
            "sequence_from": capture.sequence_from,
            "frames_in": sum(not r.source.startswith("queries/") for r in rows),
            "queries_in": len(inputs.queries),
            "frames_kept": split["mapping"] + split["query"],
            "frames_skipped": split["skipped"],
            "frames_quarantined": split["quarantined"],
            "mapping_frames": split["mapping"],
            "query_frames": split["query"],
            "camera_groups": len(cameras),
            "metric": capture.metric,
            "gt_poses": int(sum(r.written and r.cam_from_world_34 is not None for r in rows)),
            **facts,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / METRICS, metrics)

    log.info("wrote %d mapping + %d query frames (%d camera group%s, %d quarantined, %d skipped) to %s in %.1f s",
             metrics["mapping_frames"], metrics["query_frames"], len(cameras), "" if len(cameras) == 1 else "s",
             metrics["frames_quarantined"], metrics["frames_skipped"], out_dir, metrics["seconds"])
    return IngestResult(out_dir=out_dir, metrics=metrics, manifest=manifest)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m stages.ingest --params params.yaml --scene data/raw/<s> --out data/ingest/<s>."""
    args = make_parser("ingest", __doc__, INPUTS, OUTPUTS).parse_args(argv)
    return guarded("ingest", lambda: run(load_section(args.params, "ingest", IngestParams),
                                         scene_dir=Path(args.scene), out_dir=Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
