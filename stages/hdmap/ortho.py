"""Bird's-eye orthomosaic: the frames projected onto the road surface, one view per pixel.

Every map pixel (its centre lifted onto the height field) is projected into each frame that sees it; the
pixel takes its colour from the view with the finest ground sampling (the nearest camera in focal-length
units, divided by the frame's relative sharpness), so paint stays crisp where a plain average would smear it
across views that disagree by a few centimetres.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.hdmap.surface import HeightField, Raster

# Points closer than this to a camera's image plane are not projected (behind it, or too close to sample).
MIN_DEPTH_M = 0.5


@dataclasses.dataclass
class View:
    """One registered frame as the map needs it."""

    name: str
    cam_from_world: np.ndarray
    camera: Any
    """pycolmap.Camera (projection with its distortion)."""
    sharpness: float = 1.0
    """Relative sharpness (1 = as sharp as its neighbours)."""

    @property
    def center(self) -> np.ndarray:
        R, t = self.cam_from_world[:, :3], self.cam_from_world[:, 3]
        return -R.T @ t

    def project(self, X_N3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (N, 2) and depths (N,) of world points (NaN pixels behind the camera)."""
        Xc = X_N3 @ self.cam_from_world[:, :3].T + self.cam_from_world[:, 3]
        depth = Xc[:, 2]
        uv = np.full((len(Xc), 2), np.nan)
        front = depth > MIN_DEPTH_M
        if front.any():
            uv[front] = np.asarray(self.camera.img_from_cam(np.ascontiguousarray(Xc[front])))
        return uv, depth


def sample_bilinear(img: np.ndarray, uv_N2: np.ndarray) -> np.ndarray:
    """Bilinear samples of an image at (u, v) pixel positions, (N, channels) (remap's maps kept < 32767 wide)."""
    n, width = len(uv_N2), 4096
    rows = -(-n // width)
    m = np.zeros((rows * width, 2), np.float32)
    m[:n] = uv_N2
    m = m.reshape(rows, width, 2)
    out = cv2.remap(img, m[..., 0], m[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * width, -1)[:n]


def orthomosaic(views: list[View], image_dir: Path, raster: Raster, surface: HeightField, area: np.ndarray,
                max_distance_m: float) -> tuple[np.ndarray, np.ndarray]:
    """RGB orthomosaic (H, W, 3 uint8) and the index of the view each pixel came from (-1: not seen)."""
    xs, ys = raster.xy()
    rows, cols = np.nonzero(area)
    X = np.stack([xs[cols], ys[rows], surface(xs[cols], ys[rows])], 1)
    best = np.full(len(X), np.inf, np.float32)
    best_view = np.full(len(X), -1, np.int32)
    best_uv = np.zeros((len(X), 2), np.float32)
    for k, v in enumerate(views):
        near = np.nonzero(np.linalg.norm(X[:, :2] - v.center[:2], axis=1) < max_distance_m)[0]
        if not len(near):
            continue
        uv, depth = v.project(X[near])
        w, h = v.camera.width, v.camera.height
        ok = np.isfinite(uv[:, 0]) & (uv[:, 0] >= 1) & (uv[:, 0] < w - 2) & (uv[:, 1] >= 1) & (uv[:, 1] < h - 2)
        # Ground sampling distance in metres per image pixel, worse for a blurred frame.
        gsd = np.linalg.norm(X[near] - v.center, axis=1) / float(v.camera.mean_focal_length()) / max(v.sharpness, 0.1)
        better = ok & (gsd < best[near])
        idx = near[better]
        best[idx], best_view[idx], best_uv[idx] = gsd[better], k, uv[better]
    rgb = np.zeros((len(X), 3), np.uint8)
    for k in np.unique(best_view[best_view >= 0]):
        sel = np.nonzero(best_view == k)[0]
        img = cv2.imread(str(image_dir / views[k].name), cv2.IMREAD_COLOR)
        if img is None:
            continue
        rgb[sel] = sample_bilinear(img, best_uv[sel])[:, ::-1]
    out = np.zeros((raster.height, raster.width, 3), np.uint8)
    out[rows, cols] = rgb
    view = np.full((raster.height, raster.width), -1, np.int32)
    view[rows, cols] = best_view
    return out, view
