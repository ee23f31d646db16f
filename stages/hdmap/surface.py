"""The mapped area and the road surface under it.

The area is a corridor around the camera path (extended ahead of the last camera, where forward cameras still
see the road), rasterised at the map's resolution. The road surface is a smooth height field z(x, y) on a coarse
grid, fitted by regularised least squares to the camera footprints (each camera's centre minus its height above
the ground) and to the sparse points lying on the surface (picked iteratively within a band of the current
fit). Second differences as the smoothness term let slope and camber through; one global plane would not.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

# Weight of a camera footprint relative to one sparse ground point: a footprint holds the whole camera height
# (a driven camera rides at a near-constant height), a point only its own triangulation.
FOOTPRINT_WEIGHT = 10.0
# Pull of every grid node towards z = 0 (sfm's ground plane): only decides what no datum and no smoothness
# does (the cross slope of a straight drive without points beside the path).
PLANE_PRIOR = 1e-3
# Robust refits of the surface: each keeps the points within the band of the previous fit.
SURFACE_ITERATIONS = 3


@dataclasses.dataclass(frozen=True)
class Raster:
    """A north-up raster over the world's xy plane: pixel (col, row) centre at
    x = x0 + (col + 0.5) * res, y = y1 - (row + 0.5) * res."""

    x0: float
    y1: float
    res: float
    width: int
    height: int

    def world_from_pixel(self) -> np.ndarray:
        """3x3 affine: [x, y, 1] = M @ [col, row, 1] (pixel centres at integer col, row)."""
        return np.array([[self.res, 0.0, self.x0 + 0.5 * self.res],
                         [0.0, -self.res, self.y1 - 0.5 * self.res],
                         [0.0, 0.0, 1.0]])

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """World x (width,) and y (height,) of the pixel centres."""
        return (self.x0 + (np.arange(self.width) + 0.5) * self.res,
                self.y1 - (np.arange(self.height) + 0.5) * self.res)

    def to_pixel(self, xy_N2: np.ndarray) -> np.ndarray:
        """Fractional (col, row) of world points (pixel centres at integers)."""
        xy_N2 = np.asarray(xy_N2, float).reshape(-1, 2)
        return np.stack([(xy_N2[:, 0] - self.x0) / self.res - 0.5, (self.y1 - xy_N2[:, 1]) / self.res - 0.5], 1)

    def to_json(self) -> dict:
        return {"x0": self.x0, "y1": self.y1, "resolution_m": self.res, "width": self.width, "height": self.height,
                "world_from_pixel": self.world_from_pixel().tolist(),
                "convention": "[x, y, 1] = world_from_pixel @ [col, row, 1], pixel centres at integer col/row; "
                              "z from the road surface"}


def corridor_path(centers_N3: np.ndarray, forward_N3: np.ndarray, ahead_m: float) -> np.ndarray:
    """The camera path in xy, in capture order, extended `ahead_m` along the last camera's view direction."""
    path = centers_N3[:, :2]
    f = forward_N3[-1, :2]
    if np.linalg.norm(f) > 1e-9 and ahead_m > 0:
        path = np.vstack([path, path[-1] + ahead_m * f / np.linalg.norm(f)])
    return path


# The orthomosaic and map rasters stay within this many pixels (~0.3 GB of RGB); beyond, their resolution is
# coarsened (a drive of several km at 5 cm, or a model in odd units).
MAX_RASTER_PIXELS = 1e8


def make_raster(path_N2: np.ndarray, half_width_m: float, res: float) -> Raster:
    """The raster around the path at `res` per pixel, coarsened where it would exceed MAX_RASTER_PIXELS."""
    lo, hi = path_N2.min(0) - half_width_m, path_N2.max(0) + half_width_m
    res = max(res, float(np.sqrt((hi[0] - lo[0]) * (hi[1] - lo[1]) / MAX_RASTER_PIXELS)))
    width, height = int(np.ceil((hi[0] - lo[0]) / res)), int(np.ceil((hi[1] - lo[1]) / res))
    return Raster(float(lo[0]), float(hi[1]), res, width, height)


def distance_to_path(raster: Raster, path_N2: np.ndarray) -> np.ndarray:
    """Distance (m) of every raster pixel from the path polyline (a distance transform of the drawn path)."""
    img = np.full((raster.height, raster.width), 255, np.uint8)
    pts = np.round(raster.to_pixel(path_N2)).astype(np.int32)
    cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, 0, 1)
    return cv2.distanceTransform(img, cv2.DIST_L2, 5).astype(np.float32) * raster.res


@dataclasses.dataclass(frozen=True)
class HeightField:
    """z(x, y) on a grid of `cell` metres from (x0, y0); bilinear between nodes, clamped at the border."""

    x0: float
    y0: float
    cell: float
    z: np.ndarray
    """(ny, nx) node heights."""

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        gx = np.clip((np.asarray(x) - self.x0) / self.cell, 0, self.z.shape[1] - 1)
        gy = np.clip((np.asarray(y) - self.y0) / self.cell, 0, self.z.shape[0] - 1)
        return map_coordinates(self.z, [gy.ravel(), gx.ravel()], order=1).reshape(np.shape(x))


def _bilinear_rows(x: np.ndarray, y: np.ndarray, hf_shape: tuple[int, int], x0: float, y0: float,
                   cell: float) -> sp.csr_matrix:
    ny, nx = hf_shape
    gx = np.clip((x - x0) / cell, 0, nx - 1 - 1e-9)
    gy = np.clip((y - y0) / cell, 0, ny - 1 - 1e-9)
    ix, iy = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - ix, gy - iy
    rows = np.repeat(np.arange(len(x)), 4)
    cols = np.stack([iy * nx + ix, iy * nx + ix + 1, (iy + 1) * nx + ix, (iy + 1) * nx + ix + 1], 1).ravel()
    vals = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1).ravel()
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(x), ny * nx))


def _second_differences(ny: int, nx: int) -> sp.csr_matrix:
    def d2(n: int) -> sp.csr_matrix:
        return sp.diags([np.ones(n - 2), -2 * np.ones(n - 2), np.ones(n - 2)], [0, 1, 2], shape=(n - 2, n))

    blocks = []
    if nx >= 3:
        blocks.append(sp.kron(sp.identity(ny), d2(nx)))
    if ny >= 3:
        blocks.append(sp.kron(d2(ny), sp.identity(nx)))
    if nx >= 2 and ny >= 2:  # the twist term of a thin plate
        dx = sp.diags([-np.ones(nx - 1), np.ones(nx - 1)], [0, 1], shape=(nx - 1, nx))
        dy = sp.diags([-np.ones(ny - 1), np.ones(ny - 1)], [0, 1], shape=(ny - 1, ny))
        blocks.append(np.sqrt(2) * sp.kron(dy, dx))
    return sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, ny * nx))


def fit_surface(points_N3: np.ndarray, footprints_N3: np.ndarray, bounds: tuple[float, float, float, float],
                cell: float, smoothness: float, band: float) -> tuple[HeightField, np.ndarray]:
    """Height field over `bounds` (x0, y0, x1, y1); also the mask of the points used as ground.

    Starts from z = 0 (sfm's ground plane); each iteration keeps the points within `band` of the last fit.
    """
    x0, y0, x1, y1 = bounds
    nx, ny = max(2, int(np.ceil((x1 - x0) / cell)) + 1), max(2, int(np.ceil((y1 - y0) / cell)) + 1)
    L = _second_differences(ny, nx)
    reg = smoothness * (L.T @ L) + PLANE_PRIOR * sp.identity(ny * nx)
    hf = HeightField(x0, y0, cell, np.zeros((ny, nx)))
    inside = ((points_N3[:, 0] >= x0) & (points_N3[:, 0] <= x1) & (points_N3[:, 1] >= y0)
              & (points_N3[:, 1] <= y1)) if len(points_N3) else np.zeros(0, bool)
    used = np.zeros(len(points_N3), bool)
    for _ in range(SURFACE_ITERATIONS):
        used = inside & (np.abs(points_N3[:, 2] - hf(points_N3[:, 0], points_N3[:, 1])) < band) if len(points_N3) \
            else used
        data = np.vstack([footprints_N3, points_N3[used]]) if used.any() else footprints_N3
        w = np.concatenate([np.full(len(footprints_N3), FOOTPRINT_WEIGHT), np.ones(int(used.sum()))])
        A = _bilinear_rows(data[:, 0], data[:, 1], (ny, nx), x0, y0, cell)
        lhs = (A.T @ sp.diags(w) @ A + reg).tocsc()
        z = spsolve(lhs, A.T @ (w * data[:, 2]))
        hf = HeightField(x0, y0, cell, np.asarray(z).reshape(ny, nx))
    return hf, used


def ground_support(raster: Raster, ground_xy: np.ndarray, radius_m: float, area: np.ndarray) -> np.ndarray:
    """Pixels of `area` within `radius_m` of a ground datum (a sparse point on the surface or a camera
    footprint), holes closed: where the map has seen the ground itself, not a wall or a car projected onto it."""
    img = np.zeros((raster.height, raster.width), np.uint8)
    px = np.round(raster.to_pixel(ground_xy)).astype(int)
    ok = (px[:, 0] >= 0) & (px[:, 0] < raster.width) & (px[:, 1] >= 0) & (px[:, 1] < raster.height)
    img[px[ok, 1], px[ok, 0]] = 1
    r = max(1, int(round(radius_m / raster.res)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    img = cv2.dilate(img, disk)
    img = cv2.morphologyEx(img, cv2.MORPH_CLOSE, disk)
    return img.astype(bool) & area
