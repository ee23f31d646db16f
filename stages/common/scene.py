"""Reading a scene folder in the format of DESIGN.md: images/ or one video, queries/, transforms.json.

transforms.json follows nerfstudio: shared intrinsics (`camera_model`, `fl_x`, `fl_y`, `cx`, `cy`, `w`,
`h`, optional `k1 k2 p1 p2`, any of which a frame may override) and per-frame camera-to-world
`transform_matrix` in OpenGL axes keyed by `file_path` relative to the scene folder; plus our key
`metric`. A frame of a video scene names the video as `file_path` and gives its `timestamp` in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from stages.common.errors import StageError
from stages.common.geometry import world_from_cam_gl_to_cam_from_world

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "p1", "p2", "camera_model")


@dataclasses.dataclass(frozen=True)
class Intrinsics:
    """Pinhole (+ optional OpenCV distortion) intrinsics in pixels of a `w` x `h` image."""

    w: int
    h: int
    fx: float
    fy: float
    cx: float
    cy: float
    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0
    model: str = "OPENCV"

    def scaled(self, w: int, h: int) -> "Intrinsics":
        """The same camera for an image resized to `w` x `h` (distortion is scale-free)."""
        sx, sy = w / self.w, h / self.h
        # COLMAP and nerfstudio put pixel centres at +0.5 (the image spans [0, w]), so c scales as c * s.
        return dataclasses.replace(self, w=w, h=h, fx=self.fx * sx, fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy)

    def K_33(self) -> np.ndarray:
        """Calibration matrix."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    @property
    def has_distortion(self) -> bool:
        """True when any distortion coefficient is non-zero."""
        return any(abs(v) > 0 for v in (self.k1, self.k2, self.p1, self.p2))


@dataclasses.dataclass(frozen=True)
class GtFrame:
    """One ground-truth frame of transforms.json."""

    file_path: str
    cam_from_world_34: np.ndarray | None
    intrinsics: Intrinsics | None
    timestamp: float | None = None


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Parsed transforms.json."""

    metric: bool
    intrinsics: Intrinsics | None
    frames: list[GtFrame]

    def by_path(self) -> dict[str, GtFrame]:
        """Frames of image scenes keyed by their normalised file_path."""
        return {norm_rel(f.file_path): f for f in self.frames if f.timestamp is None}

    def video_frames(self) -> list[GtFrame]:
        """Frames that carry a video timestamp, sorted by it."""
        return sorted((f for f in self.frames if f.timestamp is not None), key=lambda f: f.timestamp)


def norm_rel(path: str) -> str:
    """Normalise a scene-relative path ('./images/a.png' -> 'images/a.png')."""
    parts = [p for p in Path(path).as_posix().split("/") if p not in ("", ".")]
    return "/".join(parts)


def _intrinsics(d: dict, base: Intrinsics | None, where: str) -> Intrinsics | None:
    keys = {k: d[k] for k in INTRINSIC_KEYS if k in d}
    if not keys:
        return base
    merged = dataclasses.asdict(base) if base else {}
    rename = {"fl_x": "fx", "fl_y": "fy", "camera_model": "model"}
    for k, v in keys.items():
        merged[rename.get(k, k)] = v
    if "fy" not in merged and "fx" in merged:
        merged["fy"] = merged["fx"]
    missing = [k for k in ("w", "h", "fx", "cx", "cy") if k not in merged]
    if missing:
        raise StageError(f"{where}: intrinsics lack {', '.join(missing)}; give fl_x, fl_y, cx, cy, w, h")
    try:
        return Intrinsics(
            w=int(merged["w"]), h=int(merged["h"]), fx=float(merged["fx"]), fy=float(merged["fy"]),
            cx=float(merged["cx"]), cy=float(merged["cy"]),
            **{k: float(merged.get(k, 0.0)) for k in ("k1", "k2", "p1", "p2")},
            model=str(merged.get("model", "OPENCV")),
        )
    except (TypeError, ValueError) as exc:
        raise StageError(f"{where}: intrinsics are not numbers ({exc})") from None


def read_transforms(scene_dir: str | Path, check_files: bool = True) -> Transforms | None:
    """Parse `scene_dir/transforms.json`, or None when there is none.

    With `check_files`, a frame naming a file that does not exist is a StageError naming it.
    """
    scene_dir = Path(scene_dir)
    path = scene_dir / "transforms.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames", []), list):
        raise StageError(f"{path}: expected an object with a 'frames' list")
    base = _intrinsics(data, None, str(path))
    frames = []
    for i, fr in enumerate(data.get("frames", [])):
        where = f"{path} frame {i}"
        if not isinstance(fr, dict) or "file_path" not in fr:
            raise StageError(f"{where}: has no 'file_path'")
        rel = norm_rel(str(fr["file_path"]))
        if check_files and not (scene_dir / rel).exists():
            raise StageError(
                f"{path} names a missing file {fr['file_path']!r} (frame {i}); fix its file_path or "
                "remove the frame"
            )
        pose = None
        if "transform_matrix" in fr:
            T = np.asarray(fr["transform_matrix"], float)
            if T.shape != (4, 4) or not np.all(np.isfinite(T)):
                raise StageError(f"{where}: transform_matrix must be a finite 4x4 matrix")
            pose = world_from_cam_gl_to_cam_from_world(T)
        ts = fr.get("timestamp")
        frames.append(GtFrame(rel, pose, _intrinsics(fr, base, where), None if ts is None else float(ts)))
    return Transforms(metric=bool(data.get("metric", False)), intrinsics=base, frames=frames)


@dataclasses.dataclass(frozen=True)
class SceneInputs:
    """What a scene folder holds."""

    video: Path | None
    images: list[Path]
    queries: list[Path]


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def find_scene_inputs(scene_dir: str | Path) -> SceneInputs:
    """Locate images/ or the one video, and queries/, in a scene folder; nothing usable is a StageError."""
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise StageError(f"scene folder not found: {scene_dir}; put the scene in data/raw/<scene>/")
    videos = sorted(p for p in scene_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    images = _files(scene_dir / "images")
    queries = _files(scene_dir / "queries")
    if len(videos) > 1:
        raise StageError(f"{scene_dir} holds {len(videos)} videos ({', '.join(v.name for v in videos)}); "
                         "keep one per scene")
    if videos and images:
        raise StageError(f"{scene_dir} holds both a video and images/; keep one of them")
    if not videos and not images:
        raise StageError(
            f"{scene_dir} has no input: expected images in {scene_dir / 'images'} or one video "
            f"({', '.join(VIDEO_EXTS)})"
        )
    return SceneInputs(video=videos[0] if videos else None, images=images, queries=queries)
