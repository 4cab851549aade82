"""The run directory: one layout that every stage reads from and writes into, and its lock.

Stages hand each other typed artifacts through it, so any stage can be rerun alone. Every file is
written atomically (privimage.atomic).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from privimage.errors import UserError


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
        return self

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
        self._file = open(path, "a+")
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
