"""`privimage audit`: the empirical bound respects the claim, and catches training without DP noise."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Small enough for CI; 32 + 32 guesses can prove at most ε ≈ 3.0 at 95 % confidence.
SETTINGS = ["privacy.epsilon=1", "audit.canaries=128", "audit.guesses=32", "audit.steps=30",
            "audit.public_images=64"]


def audit(tmp_path, cache_dir, *extra):
    result = subprocess.run([sys.executable, "-m", "privimage", "audit", "--preset", "quick", "--out", "a",
                             *SETTINGS, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "a" / "audit.json").read_text()), result


def test_bound_stays_below_the_claimed_epsilon(tmp_path, cache_dir):
    report, result = audit(tmp_path, cache_dir)
    assert report["dp_noise"] is True and 0.99 <= report["epsilon_claimed"] <= 1.0
    assert report["epsilon_lower_bound"] <= report["epsilon_claimed"]
    assert report["conclusive"] is True and report["epsilon_lower_bound_max"] > report["epsilon_claimed"]
    assert "inconclusive" not in result.stderr
    ledger = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert [entry["stage"] for entry in ledger["entries"]] == ["finetune"]


def test_training_without_dp_noise_is_caught(tmp_path, cache_dir):
    report, result = audit(tmp_path, cache_dir, "--without-dp-noise")
    assert "NO privacy guarantee" in result.stderr
    assert report["dp_noise"] is False
    assert report["epsilon_lower_bound"] > 2 * report["epsilon_claimed"]


def test_a_claim_above_what_the_guesses_can_prove_is_inconclusive(tmp_path, cache_dir):
    """64 guesses prove at most ε ≈ 3: a claim of 10 can be neither confirmed nor refuted, and it says so."""
    report, result = audit(tmp_path, cache_dir, "privacy.epsilon=10", "audit.steps=2")
    assert report["epsilon_claimed"] > report["epsilon_lower_bound_max"] and report["conclusive"] is False
    assert "inconclusive" in result.stderr


def test_audit_refuses_a_used_directory(tmp_path, cache_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "something").write_text("x")
    result = subprocess.run([sys.executable, "-m", "privimage", "audit", "--preset", "quick", "--out", "a"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 3 and "needs a new --out" in result.stderr


def test_the_audit_reads_no_sensitive_data(tmp_path, cache_dir, monkeypatch):
    """It trains on public images plus canaries; the sensitive set is never loaded, so nothing is spent on it."""
    from privimage import data
    from privimage.audit import run_audit
    from privimage.config import load_config

    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", *SETTINGS, "audit.steps=2"])
    real_load = data.load_dataset

    def guarded(spec, **kwargs):
        assert spec != cfg.data.sensitive, "the audit loaded the sensitive dataset"
        return real_load(spec, **kwargs)

    monkeypatch.setattr(data, "load_sensitive", lambda *a, **k: pytest.fail("the audit loaded the sensitive split"))
    monkeypatch.setattr(data, "load_dataset", guarded)
    monkeypatch.setattr("privimage.audit.load_dataset", guarded)
    report = run_audit(cfg, tmp_path / "a")
    assert report["guesses"] == 64 and 0 <= report["correct_guesses"] <= 64
