"""Which intrinsics an SfM model's data actually determine, for cameras whose calibration is estimated.

A mapper that estimates a camera's focal length also fits its lens distortion (COLMAP's SIMPLE_RADIAL k1 by
default) and keeps the principal point at the image centre. Both choices can bias the focal length, and with
it every rotation of a turning capture (a 0.4 % focal error turns a 90 deg turn into 90.4 deg):
- a distortion term that the lens does not have trades against the focal length (a rendered pinhole camera
  came out 0.4 % long with k1 = 0.002; its rotations 0.2 deg off instead of 0.05);
- a principal point that is not at the centre (rectified KITTI frames: 13 px off) is absorbed by the focal
  length and the distortion instead (positions 0.9 % of the path off instead of 0.4 %).

So, after mapping, the estimated cameras' model is chosen by the data, as a COLMAP user would by hand, by
nested model selection with the Bayesian information criterion (BIC: a parameter group is kept when it lowers
the residual sum of squares by more than ln(N) noise variances per parameter, N = residuals):
1. the distortion terms against none, principal point at the centre;
2. the principal point free against fixed, but only for cameras whose principal point the images determine:
   its standard error from the bundle adjustment's covariance is at most `PP_MAX_STD_REL` of the image
   diagonal. On a straight drive the principal point is unobservable (standard error ~15 px on KITTI, and
   freeing it moved it 90 px and the positions 4 % of the path); on a turn it is determined to ~0.2 px.
Every bundle adjustment here is a plain least-squares one (the mapper already removed outliers), single-threaded
so the result repeats. Cameras with known intrinsics stay constant.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pycolmap

# Principal point freed only where its standard error (BA covariance, scaled by the residual variance) is at
# most this fraction of the image diagonal. Formal errors are optimistic by ~10-20x on real images (KITTI's
# turn: 0.2 px formal, 2-4 px actual), so 1e-3 (~1.3 px on KITTI) admits a point that lands within a few
# pixels, and rejects the ~1 % (15 px) of a straight drive by a factor of ten.
PP_MAX_STD_REL = 1e-3
# Bundle adjustment passes per candidate model (the second starts from the first's points and poses).
BA_PASSES = 1
BA_MAX_ITERATIONS = 100
BA_FUNCTION_TOLERANCE = 1e-10


def reprojection_errors(rec: Any) -> dict[str, np.ndarray]:
    """Reprojection error (px) of each triangulated observation, by registered image name (NaN where a point
    does not project)."""
    out = {}
    for im in rec.images.values():
        if not im.has_pose:
            continue
        obs = [(p.xy, p.point3D_id) for p in im.points2D if p.has_point3D()]
        if not obs:
            continue
        uv = np.array([o[0] for o in obs])
        xyz = np.array([rec.points3D[o[1]].xyz for o in obs])
        P = im.cam_from_world().matrix()
        proj = np.asarray(rec.cameras[im.camera_id].img_from_cam(xyz @ P[:3, :3].T + P[:3, 3]))
        out[im.name] = np.linalg.norm(proj - uv, axis=1)
    return out


def residuals(rec: Any) -> tuple[float, int]:
    """Sum of squared reprojection errors (px^2) of every triangulated observation, and their number (an
    observation that does not project counts as a 1000 px error)."""
    errors = np.concatenate(list(reprojection_errors(rec).values()) or [np.zeros(0)])
    ok = np.isfinite(errors)
    return float((errors[ok] ** 2).sum()) + 1e6 * float((~ok).sum()), len(errors)


def _options(distortion: bool, principal_point: bool) -> Any:
    opts = pycolmap.BundleAdjustmentOptions()
    opts.print_summary = False
    opts.refine_focal_length = True
    opts.refine_extra_params = distortion
    opts.refine_principal_point = principal_point
    opts.ceres.loss_function_type = pycolmap.LossFunctionType.TRIVIAL
    opts.ceres.use_gpu = False  # the same result on every machine; these problems are small
    solver = opts.ceres.solver_options
    solver.num_threads = 1
    solver.max_num_iterations = BA_MAX_ITERATIONS
    solver.function_tolerance = BA_FUNCTION_TOLERANCE
    return opts


def _config(rec: Any, constant_cams: set[int]) -> Any:
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    for cam_id in constant_cams:
        config.set_constant_cam_intrinsics(cam_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    return config


def adjust(rec: Any, constant_cams: set[int], distortion: bool, principal_point: bool) -> Any:
    """A bundle-adjusted copy of `rec` with the given intrinsics free (constant_cams held)."""
    out = pycolmap.Reconstruction(rec)
    opts = _options(distortion, principal_point)
    for _ in range(BA_PASSES):
        pycolmap.create_default_ceres_bundle_adjuster(opts, _config(out, constant_cams), out).solve()
    return out


def principal_point_std(rec: Any, constant_cams: set[int], distortion: bool, sigma2: float) -> dict[int, float]:
    """Standard error (px, the larger of x and y) of each free camera's principal point, were it free, at `rec`'s current
    solution (the Gauss-Newton covariance of a bundle adjustment that frees it, scaled by the residual variance)."""
    opts = _options(distortion, True)
    adjuster = pycolmap.create_default_ceres_bundle_adjuster(opts, _config(rec, constant_cams), rec)
    cov = pycolmap.estimate_ba_covariance(pycolmap.BACovarianceOptions(), rec, adjuster)
    out = {}
    for cam_id, cam in rec.cameras.items():
        if cam_id in constant_cams:
            continue
        C = cov.get_other_params_cov(cam.params) if cov is not None else None
        if C is None:
            out[cam_id] = math.inf
            continue
        # Tangent-space order follows the free entries of cam.params (focal, principal point, extra).
        free = [i for i in range(len(cam.params)) if i not in cam.extra_params_idxs() or distortion]
        pp = [free.index(i) for i in cam.principal_point_idxs() if i in free]
        var = np.diag(C)[pp] * sigma2
        out[cam_id] = float(np.sqrt(var.max())) if len(pp) and np.all(np.isfinite(var)) else math.inf
    return out


def _bic_keeps(rss_simple: float, rss_rich: float, n_residuals: int, extra_params: int) -> tuple[bool, float]:
    """Whether the richer model's fit earns its extra parameters (BIC), and the BIC difference (simple - rich)."""
    sigma2 = max(rss_rich, 1e-12) / max(n_residuals, 1)
    delta = (rss_simple - rss_rich) / sigma2 - extra_params * math.log(max(n_residuals, 2))
    return delta > 0, float(delta)


def select_intrinsics(rec: Any, estimated: set[int]) -> tuple[Any, dict]:
    """The model with the intrinsics the data support, for the cameras in `estimated` (others constant).

    Returns the adjusted reconstruction and a record for metrics.json.
    """
    constant = set(rec.cameras) - estimated
    info: dict = {"cameras": sorted(estimated)}
    if not estimated:
        return rec, {**info, "skipped": "every camera's intrinsics are known"}
    n_extra = {cid: len(rec.cameras[cid].extra_params_idxs()) for cid in estimated}
    full = adjust(rec, constant, distortion=True, principal_point=False)
    rss_full, n_obs = residuals(full)
    n_res = 2 * n_obs
    info["rss_px2"] = {"distortion": rss_full}
    distortion = True
    if sum(n_extra.values()):
        bare = pycolmap.Reconstruction(rec)
        for cid in estimated:
            cam = bare.cameras[cid]
            params = np.array(cam.params)
            params[list(cam.extra_params_idxs())] = 0.0
            cam.params = params
        bare = adjust(bare, constant, distortion=False, principal_point=False)
        rss_bare = residuals(bare)[0]
        info["rss_px2"]["no_distortion"] = rss_bare
        distortion, info["distortion_bic_gain"] = _bic_keeps(rss_bare, rss_full, n_res, sum(n_extra.values()))
        chosen, rss_chosen = (full, rss_full) if distortion else (bare, rss_bare)
    else:
        chosen, rss_chosen = full, rss_full
    info["distortion"] = distortion
    # The principal point: free only where every estimated camera's is determined by the images. Its standard
    # error is taken at the current solution (no need to solve a problem whose answer would be thrown away).
    std = principal_point_std(chosen, constant, distortion, rss_chosen / max(n_res, 1))
    limits = {cid: PP_MAX_STD_REL * math.hypot(rec.cameras[cid].width, rec.cameras[cid].height) for cid in estimated}
    determined = all(std[cid] <= limits[cid] for cid in estimated)
    info["principal_point_std_px"] = {str(cid): round(std[cid], 4) for cid in sorted(estimated)}
    info["principal_point_std_limit_px"] = {str(cid): round(limits[cid], 4) for cid in sorted(estimated)}
    info["principal_point"] = False
    if not determined:
        info["principal_point_reason"] = "not determined by the images (standard error above the limit): kept at the centre"
    else:
        free_pp = adjust(chosen, constant, distortion=distortion, principal_point=True)
        rss_pp = residuals(free_pp)[0]
        info["rss_px2"]["principal_point"] = rss_pp
        keep_pp, info["principal_point_bic_gain"] = _bic_keeps(rss_chosen, rss_pp, n_res, 2 * len(estimated))
        if keep_pp:
            info["principal_point"], chosen = True, free_pp
            info["principal_point_reason"] = "determined by the images and fits them better (BIC): estimated"
        else:
            info["principal_point_reason"] = "a free principal point does not fit the images better (BIC): kept at the centre"
    info["rss_px2"] = {k: round(v, 2) for k, v in info["rss_px2"].items()}
    info["observations"] = n_obs
    info["params"] = {str(cid): [round(float(v), 6) for v in chosen.cameras[cid].params] for cid in sorted(estimated)}
    info["model"] = {str(cid): chosen.cameras[cid].model.name for cid in sorted(estimated)}
    chosen.update_point_3d_errors()
    return chosen, info
