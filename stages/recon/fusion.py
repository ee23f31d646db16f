"""Depth maps -> point clouds and meshes: back-projection and TSDF fusion (open3d).

Depth maps come one view at a time (a generator reading them from disk), so memory holds the volume and one
view, never the whole set. `DepthView` is that unit: z-depth (0 = no depth), colour, pinhole intrinsics and
the world-to-camera pose of one view at the depth map's own resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from stages.common.errors import StageError


@dataclasses.dataclass(frozen=True)
class DepthView:
    depth: np.ndarray
    """(H, W) float32 z-depth along the optical axis; 0 or non-finite: no depth."""
    rgb: np.ndarray
    """(H, W, 3) uint8."""
    K: np.ndarray
    """3x3 for this resolution, COLMAP's convention (the centre of pixel (0, 0) at (0.5, 0.5))."""
    cam_from_world: np.ndarray
    """3x4."""


def backproject(view: DepthView, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) and their colours (N, 3) uint8 of the view's valid depths (every stride-th pixel)."""
    d = view.depth[::stride, ::stride]
    ys, xs = np.nonzero(np.isfinite(d) & (d > 0))
    z = d[ys, xs].astype(np.float64)
    px = np.stack([xs * stride + 0.5, ys * stride + 0.5, np.ones_like(xs)]).astype(np.float64)  # pixel centres
    X_cam = (np.linalg.inv(view.K) @ px) * z
    R, t = view.cam_from_world[:, :3], view.cam_from_world[:, 3:4]
    X = (R.T @ (X_cam - t)).T
    return X, view.rgb[ys * stride, xs * stride]


def fuse_points(views: Iterable[DepthView], voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Every view's back-projected depths merged into one cloud: points within one `voxel` cell averaged (open3d
    voxel_down_sample), so overlapping views do not multiply the points and their noise averages out."""
    import open3d as o3d

    merged = o3d.geometry.PointCloud()
    for view in views:
        X, rgb = backproject(view)
        if not len(X):
            continue
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(X))
        pc.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64) / 255.0)
        merged += pc
        merged = merged.voxel_down_sample(voxel)  # bounded: never more than one point per occupied cell
    return np.asarray(merged.points), np.round(np.asarray(merged.colors) * 255).astype(np.uint8)


def tsdf_fuse(views: Iterable[DepthView], voxel: float, trunc: float, max_depth: float, min_views: int = 2,
              device: str = "cpu", what: str = "depth maps") -> tuple:
    """A truncated signed-distance volume (open3d's VoxelBlockGrid: hashed voxel blocks, on CUDA when asked)
    integrating every view's depth up to max_depth; returns (legacy TriangleMesh, vertices, vertex colours uint8,
    integrated views). Only voxels that min_views views or more integrated are meshed. An empty set of
    depths is a StageError, not an open3d crash on an empty volume.

    open3d's legacy ScalableTSDFVolume extracts nothing at all in open3d 0.20 (a one-plane test gives 0 points),
    hence the tensor API."""
    import open3d as o3d
    import open3d.core as o3c

    if not (voxel > 0 and trunc > 0 and max_depth > 0):
        raise StageError(f"TSDF fusion needs a positive voxel ({voxel}), truncation ({trunc}) and max depth "
                         f"({max_depth}); fix recon's tsdf params")
    dev = o3c.Device("CUDA:0" if device == "cuda" else "CPU:0")
    vbg = o3d.t.geometry.VoxelBlockGrid(attr_names=("tsdf", "weight", "color"),
                                        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
                                        attr_channels=((1), (1), (3)), voxel_size=float(voxel), block_resolution=8,
                                        block_count=20000, device=dev)
    multiplier = float(trunc / voxel)
    used = 0
    for view in views:
        # Depths beyond max_depth are not integrated: a view with nothing nearer touches no voxel block, which
        # open3d reports as an error, so it is skipped here.
        depth = np.where(np.isfinite(view.depth) & (view.depth > 0) & (view.depth <= max_depth), view.depth,
                         0).astype(np.float32)
        if not (depth > 0).any():
            continue
        d = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(depth))).to(dev)
        c = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(view.rgb, np.float32) / 255.0)).to(dev)
        K = np.array(view.K, np.float64)
        K[:2, 2] -= 0.5  # open3d puts the centre of pixel (0, 0) at (0, 0)
        K = o3c.Tensor(K)
        E = o3c.Tensor(np.vstack([view.cam_from_world, [0, 0, 0, 1]]).astype(np.float64))
        try:
            blocks = vbg.compute_unique_block_coordinates(d, K, E, 1.0, float(max_depth),
                                                          trunc_voxel_multiplier=multiplier)
            vbg.integrate(blocks, d, c, K, K, E, 1.0, float(max_depth), trunc_voxel_multiplier=multiplier)
        except RuntimeError as e:  # a view whose depths all fall outside its frustum's blocks touches none
            if "No block is touched" not in str(e):
                raise
            continue
        used += 1
    if not used:
        raise StageError(f"no depth to fuse: every one of the {what} is empty")
    # each view adds weight 1 to the voxels it integrates; open3d keeps weights above the threshold
    mesh = vbg.extract_triangle_mesh(weight_threshold=float(min_views) - 0.5).to_legacy()
    mesh.compute_vertex_normals()
    if mesh.has_vertex_colors():
        mesh.vertex_colors = o3d.utility.Vector3dVector(np.clip(np.asarray(mesh.vertex_colors), 0, 1))
    vertices = np.asarray(mesh.vertices)
    colours = np.round(np.clip(np.asarray(mesh.vertex_colors), 0, 1) * 255).astype(np.uint8) \
        if mesh.has_vertex_colors() else np.zeros((len(vertices), 3), np.uint8)
    return mesh, vertices, colours, used


def write_ply(path, points: np.ndarray, colours: np.ndarray | None = None) -> None:
    """A coloured point cloud as binary PLY (open3d), readable by MeshLab, CloudCompare, COLMAP."""
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, np.float64).reshape(-1, 3)))
    if colours is not None and len(colours):
        pc.colors = o3d.utility.Vector3dVector(np.asarray(colours, np.float64) / 255.0)
    if not o3d.io.write_point_cloud(str(path), pc):
        raise StageError(f"could not write {path}")


def read_ply_points(path) -> np.ndarray:
    return read_ply(path)[0]


def read_ply(path, colours: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Points (N, 3) and unit normals (N, 3), or None when the file has none; with `colours`, points and colours
    (N, 3) uint8 instead."""
    import open3d as o3d

    pc = o3d.io.read_point_cloud(str(path))
    if colours:
        return np.asarray(pc.points), np.round(np.asarray(pc.colors) * 255).astype(np.uint8)
    normals = np.asarray(pc.normals) if pc.has_normals() else None
    if normals is not None:
        normals = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return np.asarray(pc.points), normals
