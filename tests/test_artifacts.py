"""Stage hand-offs: the typed readers/writers of stages.common.artifacts, and dvc.yaml against them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.common import artifacts as art
from stages.common.geometry import look_at_cam_from_world
from tests.conftest import ROOT

DECLARED = {
    "ingest": (set(art.INGEST_OUTPUTS), art.INGEST_METRICS),
    "sfm": (set(art.SFM_OUTPUTS), art.SFM_METRICS),
    "hdmap": (set(art.HDMAP_OUTPUTS), art.HDMAP_METRICS),
}


def _stage_files() -> dict[str, dict[str, set[str]]]:
    """Per stage family: the file names (relative to the stage's out folder) of its outs, metrics and plots."""
    from dvc.repo import Repo

    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    out: dict[str, dict[str, set[str]]] = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            family, _, scene = stage.addressing.partition("@")
            if family not in DECLARED:
                continue
            kinds = out.setdefault(family, {"outs": set(), "metrics": set(), "plots": set()})
            for o in stage.outs:
                rel = Path(o.def_path).relative_to(Path(paths[family]) / scene)
                kind = "metrics" if o.metric else "plots" if o.plot else "outs"
                kinds[kind].add(rel.as_posix())
    return out


def test_dvc_yaml_declares_exactly_what_the_artifacts_module_writes():
    files = _stage_files()
    for family, (outs, metrics) in DECLARED.items():
        assert files[family]["metrics"] == {metrics}, family
        declared = files[family]["outs"] | files[family]["plots"]
        assert outs <= declared, f"{family}: {sorted(outs - declared)} written but not declared in dvc.yaml"
        assert declared <= outs | {art.INGEST_PLOTS, art.SFM_PLOTS}, f"{family}: dvc.yaml declares {declared - outs}"


def test_pose_columns_round_trip_and_say_their_convention():
    P = look_at_cam_from_world(np.array([1.0, 2.0, 1.6]), np.array([10.0, 3.0, 1.0]))
    row = {"name": "images/000000.png", **art.pose_record(art.GT_PREFIX, P)}
    assert all(c.startswith("gt_cam_from_world_") for c in row if c != "name")
    table = pd.DataFrame([row, {"name": "images/000001.png", **art.pose_record(art.GT_PREFIX, None)}])
    back = art.poses_from_table(table, art.GT_PREFIX, "name")
    assert list(back) == ["images/000000.png"]  # a frame without a pose has none, not a NaN pose
    np.testing.assert_allclose(back["images/000000.png"], P, atol=1e-12)


def _frames(n: int, gt: bool = True) -> art.Frames:
    names = [f"images/{i:06d}.png" for i in range(n)]
    poses = {nm: look_at_cam_from_world(np.array([i, 0.0, 1.6]), np.array([i + 10.0, 0.0, 1.0]))
             for i, nm in enumerate(names)}
    return art.Frames(Path("."), names, {"0": names}, {"0": None}, True, poses if gt else {}, True, sequence=True)


def test_evaluate_poses_scores_a_similarity_transformed_copy_as_exact():
    frames = _frames(10)
    s, R = 0.5, look_at_cam_from_world(np.zeros(3), np.array([0.3, 1.0, 0.2]))[:, :3]
    est = {}
    for name, P in frames.gt.items():  # the same cameras in another world: x' = s R x
        Rc, c = P[:, :3], -P[:, :3].T @ P[:, 3]
        R_new, c_new = Rc @ R.T, s * R @ c
        est[name] = np.concatenate([R_new, (-R_new @ c_new)[:, None]], axis=1)
    del est["images/000003.png"]  # unregistered: no row error, still a row
    summary, table, sim3 = art.evaluate_poses(est, frames)
    assert summary["evaluated_images"] == 9 and summary["rotation_error_deg_max"] < 1e-6
    assert summary["position_error_max"] < 1e-9 and sim3.scale == pytest.approx(1 / s)
    assert table["frame"].tolist() == list(range(10)) and np.isnan(table.loc[3, "rotation_error_deg"])
    assert art.evaluate_poses(est, _frames(10, gt=False))[0] == {}


def test_readers_name_the_missing_file_and_the_stage_to_run(tmp_path):
    from stages.common.errors import StageError

    with pytest.raises(StageError, match=r"manifest.csv not found; run the ingest stage"):
        art.read_ingest(tmp_path)
    with pytest.raises(StageError, match=r"model not found; run the sfm stage"):
        art.read_sfm(tmp_path)


def test_ingest_carries_the_scene_ground_truth_files(drive_frames):
    frames = art.read_ingest(drive_frames)
    for name in art.TRUTH_FILES:  # synth writes both; ingest copies them for evaluation
        assert frames.truth(name) is not None and frames.truth(name).stat().st_size > 100
    assert frames.truth("nothing.json") is None
