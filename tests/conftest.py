"""Shared fixtures: the project's shared test data and one small model trained on a real crop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sv_deploy.config import ArchConfig, NormConfig, TrainConfig
from sv_deploy.normalize import normalize, percentiles
from sv_deploy.resize import downsample
from sv_deploy.volume_io import read_volume

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SV_DEPLOY_TEST_DATA", REPO.parent / "shared" / "data"))

# Small but real: enough to train in seconds on 2 cores.
SMALL_TRAIN = TrainConfig(steps=300, batch=8, patch=(8, 32, 32), lr=2e-3, val_every=25, val_patches=16)


@pytest.fixture(autouse=True, scope="session")
def private_export_cache(tmp_path_factory):
    """Keep the ONNX export cache that `infer` writes out of the user's home folder."""
    folder = tmp_path_factory.mktemp("sv-deploy-cache")
    before = os.environ.get("SV_DEPLOY_CACHE")
    os.environ["SV_DEPLOY_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SV_DEPLOY_CACHE", None)
    else:
        os.environ["SV_DEPLOY_CACHE"] = before


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (set SV_DEPLOY_TEST_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def flybrain_crop() -> np.ndarray:
    """Truth: a 32x128x128 uint8 crop of the real fly-brain confocal stack, around its bright centre."""
    vol = read_volume(data_file("real", "3d_02_flybrain_confocal.tif"))
    return vol.data[12:44, 64:192, 64:192].copy()


@pytest.fixture(scope="session")
def flybrain_pair(flybrain_crop):
    """(truth float32, LR float32) with LR made by the degradation model at x2."""
    truth = flybrain_crop.astype(np.float32)
    return truth, downsample(truth, (2, 2, 2))


@pytest.fixture(scope="session")
def trained_small(flybrain_pair):
    """One x2 stage trained briefly on the LR crop; returns (stage, report, normalized LR, (lo, hi))."""
    import torch

    from sv_deploy.train import train_stage

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    _, lr = flybrain_pair
    lo, hi = percentiles(lr, NormConfig())
    x = normalize(lr, lo, hi)
    stage, report = train_stage(x, (2, 2, 2), ArchConfig(), SMALL_TRAIN, torch.device("cpu"), progress=False)
    return stage, report, x, (lo, hi)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, trained_small):
    """The small model saved as a real model file."""
    from sv_deploy.config import ModelConfig
    from sv_deploy.model_file import save_model

    stage, _, _, (lo, hi) = trained_small
    path = tmp_path_factory.mktemp("model") / "small.svmodel"
    save_model(path, ModelConfig(stages=((2, 2, 2),), norm_values=(lo, hi), train=SMALL_TRAIN), [stage])
    return path
