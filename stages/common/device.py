"""Choosing the compute device once per stage run (torch for rendering and learning, pycolmap for COLMAP)."""

from __future__ import annotations

from typing import Literal

from stages.common.errors import StageError

DevicePref = Literal["auto", "cpu", "cuda"]


def pick_device(pref: str = "auto") -> str:
    """Return "cuda" or "cpu" for a params `device` value; asking for cuda without one is an error."""
    import torch

    has_cuda = torch.cuda.is_available()
    if pref == "auto":
        return "cuda" if has_cuda else "cpu"
    if pref == "cuda" and not has_cuda:
        raise StageError("device: cuda was asked for but torch sees no CUDA device; set device: auto or cpu")
    if pref not in ("cpu", "cuda"):
        raise StageError(f"device: {pref!r} is not allowed; use one of 'auto', 'cpu', 'cuda'")
    return pref


def pick_colmap_device(pref: str = "auto") -> str:
    """Return "cuda" or "cpu" for COLMAP work: cuda needs pycolmap's CUDA build (the `gpu` extra)."""
    import pycolmap

    if pref not in ("auto", "cpu", "cuda"):
        raise StageError(f"device: {pref!r} is not allowed; use one of 'auto', 'cpu', 'cuda'")
    if pref == "cuda" and not pycolmap.has_cuda:
        raise StageError("device: cuda was asked for but this pycolmap has no CUDA; install the gpu extra "
                         "(pycolmap-cuda12) or set device: auto")
    return "cuda" if pref != "cpu" and pycolmap.has_cuda else "cpu"
