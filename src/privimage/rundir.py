"""The run directory: one layout that every stage reads from and writes into, and its lock.

Stages hand each other typed artifacts through it, so any stage can be rerun alone. Every file is
written atomically (privimage.atomic).
"""

from __future__ import annotations

import fcntl
import os
from fnmatch import fnmatchcase
from pathlib import Path

from privimage.atomic import make_private_dir
from privimage.errors import UserError

SHAREABLE, PRIVATE = "shareable", "private"

# Every file a run directory holds (relative path patterns, first match wins; `*` spans folders) and
# who may read it. Shareable files are covered by the (ε, δ) guarantee or read no sensitive data, and
# are world-readable (0666 less the umask); private ones are the data owner's alone (0600, and
# private/ is 0700). scripts/check_rundir.py audits a finished run directory against this table.
FILES: tuple[tuple[str, str], ...] = (
    ("config.yaml", SHAREABLE),                # the settings; data.* are names and paths, not data
    ("privacy.json", SHAREABLE),               # the ledger: mechanisms, σ, q, steps (N is public)
    ("plan.json", SHAREABLE),                  # step counts from a probe on random data and N
    (".lock", PRIVATE),                        # the pid of the last process that held the run
    ("stages/*.json", SHAREABLE),              # fingerprints and stage durations (wall-clock is released)
    ("semantics.json", SHAREABLE),             # the selection and the rounded noisy votes
    ("warmstart/*.safetensors", SHAREABLE),    # the noisy embedding (noisy class sizes too) and its generator
    ("dpmerf/*.safetensors", SHAREABLE),       # the same for method=dpmerf
    ("pretrain/*.safetensors", SHAREABLE),     # trained on public data (and the warm start's images)
    ("finetune/*.safetensors", SHAREABLE),     # DP-SGD states the ledger has committed, and the model
    ("tensorboard/*", SHAREABLE),              # pretraining losses, DP-SGD's committed noisy losses
    ("synthetic.npz", SHAREABLE),
    ("synthetic/*.png", SHAREABLE),
    ("samples.png", SHAREABLE),
    ("metrics.json", PRIVATE),                 # accuracies and distances measured on real images
    ("report.html", PRIVATE),                  # embeds real test images and the metrics
    ("private/*", PRIVATE),                    # split key, in-memory data, uncommitted DP-SGD state, measures
)

# What a finished stage leaves: a stage whose marker matches but whose output is gone is not done.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "semantics": ("semantics.json",),
    "warmstart": ("warmstart/embedding.safetensors", "warmstart/generator.safetensors"),
    "pretrain": ("pretrain/model.safetensors",),
    "finetune": ("finetune/model.safetensors",),
    "dpmerf": ("dpmerf/embedding.safetensors", "dpmerf/generator.safetensors", "synthetic.npz"),
    "sample": ("synthetic.npz", "samples.png"),
    "evaluate": ("metrics.json",),
    "report": ("report.html",),
}


def classify(relative: str | os.PathLike) -> str:
    """SHAREABLE or PRIVATE for a path relative to the run directory; UserError for a file no stage writes."""
    name = Path(relative).as_posix()
    for pattern, kind in FILES:
        if fnmatchcase(name, pattern):
            return kind
    raise UserError(f"{name} is not a file privimage writes into a run directory: remove it, or keep it elsewhere")


class RunDir:
    """Paths of a run directory. Creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    ledger = property(lambda self: self.root / "privacy.json")
    semantics = property(lambda self: self.root / "semantics.json")
    pretrain_dir = property(lambda self: self.root / "pretrain")
    finetune_dir = property(lambda self: self.root / "finetune")
    synthetic = property(lambda self: self.root / "synthetic.npz")
    synthetic_images = property(lambda self: self.root / "synthetic")
    samples_grid = property(lambda self: self.root / "samples.png")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.html")
    stages = property(lambda self: self.root / "stages")
    tensorboard = property(lambda self: self.root / "tensorboard")
    plan = property(lambda self: self.root / "plan.json")
    private = property(lambda self: self.root / "private")  # for the data owner only (0700)
    split_key = property(lambda self: self.root / "private" / "split.key")
    lock_file = property(lambda self: self.root / ".lock")

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        make_private_dir(self.private)
        return self

    def missing_outputs(self, stage: str) -> list[Path]:
        """The files `stage` leaves when it finishes that are not here."""
        return [self.root / name for name in STAGE_OUTPUTS[stage] if not (self.root / name).exists()]

    def holds_results(self) -> bool:
        """Whether a stage has written anything here (beyond config, lock, ledger, plan and split key)."""
        if not self.root.is_dir():
            return False
        for path in self.root.iterdir():
            if path.name == "private":
                if any(p != self.split_key for p in path.iterdir()):
                    return True
            elif path.name not in ("config.yaml", ".lock", "privacy.json", "plan.json"):
                return True
        return False

    def lock(self) -> "RunLock":
        return RunLock(self.lock_file)


class RunLock:
    """An exclusive `flock` on the run directory's lock file, held until `release` or process exit.

    Two processes on one run directory (a requeued job whose old copy still runs, a second terminal)
    would both pass the ledger's checks and overwrite each other's bookings; the second one is refused.
    The kernel drops the lock when its holder dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # private (FILES): it names a pid; a lock file of an older version was 0644
        self._file = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise UserError(f"{path.parent} is in use by another privimage process (pid {holder}): wait for it to "
                            "finish or stop it, or use another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
