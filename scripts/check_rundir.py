"""Audit a finished run directory against what it promises: `python scripts/check_rundir.py DIR`.

For every file, its classification (privimage.rundir.FILES) must match its permissions and content:
- every file is one the table knows (an unknown file is a failure: no one decided who may read it);
- private files have no group or world permission bits, and the private/ folders are 0700;
- shareable files are readable by everyone (what the table calls shareable is meant to be shared);
- no shareable file holds the raw bytes of a real image (train or test split), anywhere in it;
- no synthetic image (synthetic.npz, synthetic/*.png) is byte-identical to a real image;
- no shareable file holds the exact class counts of the training split (as text or as raw arrays);
- the ledger's recomputed ε is within its target, and finetune/checkpoint.safetensors holds exactly the
  steps the ledger has committed (no uncommitted DP-SGD state in a shareable folder);
- TensorBoard event files name no host or pid and carry no clock (every wall time is 0).

It reads the sensitive data the way the run did (config.yaml, private/split.key, the cache in
$PRIVIMAGE_CACHE), so only the data owner can run it. It cannot prove the absence of every encoding of
a statistic: it looks for the ones above, exactly. Exit status 1 lists the failures, one a line.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import stat
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from privimage.checkpoint import load_checkpoint
from privimage.errors import UserError
from privimage.pipeline import Pipeline
from privimage.privacy.ledger import PrivacyLedger
from privimage.rundir import PRIVATE, SHAREABLE, RunDir, classify


def contains_window(blob: bytes, length: int, wanted: set[int]) -> bool:
    """Whether some `length`-byte window of `blob` has a polynomial hash in `wanted` (see `window_hash`)."""
    data = np.frombuffer(blob, np.uint8).astype(np.uint64)
    if len(data) < length:
        return False
    powers = _powers(len(data) + 1)
    prefix = np.concatenate([[np.uint64(0)], np.cumsum(data * powers[:-1], dtype=np.uint64)])
    hashes = (prefix[length:] - prefix[:-length]) * _inverse_powers(len(data) - length + 1)
    return bool(np.isin(hashes, np.fromiter(wanted, np.uint64)).any())


def window_hash(window: bytes) -> int:
    data = np.frombuffer(window, np.uint8).astype(np.uint64)
    return int(np.sum(data * _powers(len(data)), dtype=np.uint64))


BASE = np.uint64(1_000_003)  # odd, so invertible modulo 2**64 (numpy's uint64 arithmetic wraps)


def _powers(n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.cumprod(np.concatenate([[np.uint64(1)], np.full(n - 1, BASE, np.uint64)]), dtype=np.uint64)


def _inverse_powers(n: int) -> np.ndarray:
    inverse = pow(int(BASE), -1, 2**64)
    with np.errstate(over="ignore"):
        return np.cumprod(np.concatenate([[np.uint64(1)], np.full(n - 1, inverse, np.uint64)]), dtype=np.uint64)


def count_encodings(counts: np.ndarray) -> list[bytes]:
    ints, floats = [int(v) for v in counts], [float(v) for v in counts]
    texts = [sep.join(map(str, values)) for values in (ints, floats) for sep in (", ", ",", " ", "\t")]
    return [t.encode() for t in texts] + [counts.astype(dtype).tobytes() for dtype in ("<i8", "<i4", "<f4", "<f8")]


def synthetic_images(root: Path) -> list[bytes]:
    images = []
    if (root / "synthetic.npz").exists():
        with np.load(root / "synthetic.npz") as data:
            images += [image.tobytes() for image in data["images"]]
    for png in (root / "synthetic").rglob("*.png") if (root / "synthetic").exists() else ():
        pixels = np.asarray(Image.open(io.BytesIO(png.read_bytes())))
        images.append((pixels if pixels.ndim == 3 else pixels[..., None]).tobytes())
    return images


def check(root: Path) -> list[str]:
    run = RunDir(root)
    failures: list[str] = []
    files = sorted(path for path in root.rglob("*") if path.is_file())
    kinds: dict[Path, str] = {}
    for path in files:
        name = path.relative_to(root)
        try:
            kinds[path] = classify(name)
        except UserError as error:
            failures.append(str(error))
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if kinds[path] == PRIVATE and mode & 0o077:
            failures.append(f"{name} is private but mode {mode:o} lets others read or write it")
        if kinds[path] == SHAREABLE and mode & 0o444 != 0o444:
            failures.append(f"{name} is shareable but mode {mode:o} keeps others from reading it")
    for folder in [run.private, *run.private.rglob("*")]:
        if folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) != 0o700:
            failures.append(f"{folder.relative_to(root)}/ is private but not 0700")

    cfg = OmegaConf.load(run.config)
    pipeline = Pipeline(cfg, root)
    train, test = pipeline.sensitive_train, pipeline.sensitive_test
    real = {hashlib.sha256(image.tobytes()).digest() for data in (train, test) for image in data.images}
    copies = sum(hashlib.sha256(image).digest() in real for image in synthetic_images(root))
    if copies:
        failures.append(f"{copies} synthetic images are byte for byte real images")
    length = int(np.prod(train.images.shape[1:]))
    wanted = {window_hash(image.tobytes()) for data in (train, test) for image in data.images}
    counts = count_encodings(np.bincount(train.labels, minlength=train.num_classes))
    for path in files:
        if kinds.get(path) != SHAREABLE:
            continue
        blob = path.read_bytes()
        if contains_window(blob, length, wanted):
            failures.append(f"{path.relative_to(root)} holds the raw bytes of a real image")
        if any(encoding in blob for encoding in counts):
            failures.append(f"{path.relative_to(root)} holds the exact class counts of the training split")

    ledger = PrivacyLedger.open(run.ledger, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant,
                                create=False)  # refuses a spend beyond the target
    checkpoint = run.finetune_dir / "checkpoint.safetensors"
    booking = ledger.find("finetune")
    if checkpoint.exists() and booking is not None:
        step = load_checkpoint(checkpoint, tensors=False)[1]["step"]
        committed = ledger.released_steps("finetune", booking.release)
        if step != committed:
            failures.append(f"finetune/checkpoint.safetensors holds step {step}, the ledger committed {committed}")
    for path in run.tensorboard.rglob("*") if run.tensorboard.exists() else ():
        if path.is_file() and socket.gethostname() in path.name:
            failures.append(f"{path.relative_to(root)} names the host")
        if path.is_file() and _wall_times(path) != {0.0}:
            failures.append(f"{path.relative_to(root)} carries wall-clock times")
    return failures


def _wall_times(path: Path) -> set[float]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {event.wall_time for event in EventFileLoader(str(path)).Load()}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "config.yaml").is_file():
        print("usage: python scripts/check_rundir.py RUN_DIR (a finished privimage run directory)", file=sys.stderr)
        return 2
    root = Path(argv[0])
    failures = check(root)
    for failure in failures:
        print(f"FAIL {failure}")
    files = [p for p in root.rglob("*") if p.is_file()]
    print(json.dumps({"files": len(files), "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
