"""The whole pipeline on the `quick` preset, as a user runs it: every artifact, the ledger, skipping."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def privimage(*args, cwd, cache_dir):
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "privimage", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("e2e")
    first = privimage("run", "--preset", "quick", "--out", "run", cwd=root, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "run", first


def test_every_artifact_is_written(quick_run):
    run, _ = quick_run
    for name in ("config.yaml", "privacy.json", "semantics.json", "pretrain/model.safetensors",
                 "finetune/model.safetensors", "synthetic.npz", "samples.png", "metrics.json", "report.html"):
        assert (run / name).is_file(), name
    with np.load(run / "synthetic.npz") as data:
        images, labels, names = data["images"], data["labels"], list(data["class_names"])
    assert images.dtype == np.uint8 and images.shape == (100, 28, 28, 1)
    assert names == [str(d) for d in range(10)]
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10  # uniform labels
    assert sum(len(list((run / "synthetic" / n).glob("*.png"))) for n in names) == 100
    Image.open(run / "samples.png").verify()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"cnn", "resnet"} and all(0 <= a <= 1 for a in metrics["accuracy"].values())


def test_ledger_composes_query_and_dpsgd_within_target(quick_run):
    run, _ = quick_run
    ledger = json.loads((run / "privacy.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["semantics", "warmstart", "finetune"]
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"]
    assert ledger["spent"]["epsilon"] >= 0.99 * ledger["target"]["epsilon"]  # the calibration uses the budget


def test_budget_and_the_dry_run_print_what_the_run_booked(quick_run, cache_dir):
    """`privimage budget` once composed only the query and DP-SGD, and printed σ 0.68 where a run booked
    0.86 with the warm start: the tools and the stages now read one privacy plan."""
    run, _ = quick_run
    booked = json.loads((run / "privacy.json").read_text())["entries"]
    for command in (["budget"], ["run", "--dry-run"]):
        result = privimage(*command, "--out", str(run), cwd=run.parent, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        plan = json.loads(result.stdout[result.stdout.rindex('{\n "releases"'):])
        assert [r["stage"] for r in plan["releases"]] == [e["stage"] for e in booked]
        for release, entry in zip(plan["releases"], booked):
            assert release["noise_multiplier"] == pytest.approx(entry["noise_multiplier"], rel=1e-9)
            assert (release["sample_rate"], release["steps"]) == (entry["sample_rate"], entry["steps"])
        assert plan["epsilon"] <= plan["target"]["epsilon"]


def test_semantics_artifact_holds_only_noisy_values(quick_run):
    run, _ = quick_run
    semantics = json.loads((run / "semantics.json").read_text())
    assert set(semantics["selected"]) == {str(d) for d in range(10)}
    rows = np.array(list(semantics["noisy_votes"]["rows"].values()))
    assert rows.dtype.kind == "i"  # noisy votes are published rounded: no digits beyond what selection needs
    assert "test_split_top1_same_semantic" not in json.dumps(semantics)  # a test-split statistic: private only
    private = run / "private"
    assert "test_split_top1_same_semantic" in json.loads((private / "semantics.json").read_text())
    assert private.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in private.rglob("*") if p.is_file())


def test_every_file_is_classified_and_its_mode_follows(quick_run):
    """report.html (real test images) and metrics.json were 0644, the shareable models 0600."""
    from privimage.rundir import PRIVATE, SHAREABLE, classify

    run, _ = quick_run
    modes = {str(path.relative_to(run)): (classify(path.relative_to(run)), path.stat().st_mode & 0o777)
             for path in run.rglob("*") if path.is_file()}
    assert {modes[name][0] for name in (".lock", "metrics.json", "report.html", "private/split.key")} == {PRIVATE}
    assert {modes[name][0] for name in ("config.yaml", "privacy.json", "stages/finetune.json", "semantics.json",
                                        "finetune/model.safetensors", "synthetic.npz", "samples.png")} == {SHAREABLE}
    wrong = {name: oct(mode) for name, (kind, mode) in modes.items()
             if (kind == PRIVATE and mode != 0o600) or (kind == SHAREABLE and mode != 0o644)}
    assert wrong == {}


def test_check_rundir_passes_a_finished_run_and_fails_a_leaky_one(quick_run, cache_dir, tmp_path):
    """scripts/check_rundir.py, which CI runs here: every file's classification against its mode and content."""
    run, _ = quick_run
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_rundir.py"
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    result = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    leaky = tmp_path / "leaky"
    shutil.copytree(run, leaky)
    (leaky / "report.html").chmod(0o644)
    with np.load(leaky / "synthetic.npz") as data:
        images, labels, names = data["images"].copy(), data["labels"], data["class_names"]
    from privimage.pipeline import Pipeline
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.cache_dir = str(cache_dir)
    real = Pipeline(cfg, run).sensitive_test.images[5]
    images[0] = real
    np.savez(leaky / "synthetic.npz", images=images, labels=labels, class_names=names)  # uncompressed: raw bytes
    (leaky / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, str(script), str(leaky)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 1
    for words in ("report.html is private but mode 644", "1 synthetic images are byte for byte real images",
                  "synthetic.npz holds the raw bytes of a real image", "notes.txt is not a file privimage writes"):
        assert words in result.stdout, words


def test_summary_reports_spend_and_location(quick_run):
    _, first = quick_run
    assert "privacy spent" in first.stderr and "synthetic.npz" in first.stderr


def test_second_identical_run_skips_every_stage(quick_run, cache_dir):
    run, _ = quick_run
    before = (run / "privacy.json").read_text()
    again = privimage("run", "--preset", "quick", "--out", "run", cwd=run.parent, cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date, skipped") == 7
    assert (run / "privacy.json").read_text() == before  # nothing spent twice


CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(quick_run, tmp_path):
    run, _ = quick_run
    page = (run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    assert page.count('src="data:image/png;base64,') >= 5  # samples, real, semantics, curves, ledger
    for section in ("Privacy", "Time plan", "Selected semantics", "Training", "Samples", "Metrics", "Configuration"):
        assert section in page, section
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1100,2400", (run / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1100)
    assert pixels.std() > 20 and (pixels < 64).mean() > 0.01  # a page of text and images, not a blank one


def _encodings(vector: np.ndarray) -> list[bytes]:
    """The ways a vector of counts could be written: as text (lists, JSON, floats) and as raw arrays."""
    ints, floats = [int(v) for v in vector], [float(v) for v in vector]
    texts = [sep.join(map(str, values)) for values in (ints, floats) for sep in (", ", ",", " ", "\t")]
    raw = [np.asarray(vector).astype(dtype).tobytes() for dtype in ("<i8", "<i4", "<f4", "<f8")]
    return [text.encode() for text in texts] + raw


def _leaks(blobs: dict[str, bytes], statistics: dict[str, np.ndarray]) -> list[str]:
    return [f"{what} in {where}" for what, vector in statistics.items() for pattern in _encodings(vector)
            for where, blob in blobs.items() if pattern in blob]


def test_no_exact_sensitive_statistic_reaches_any_file_or_the_terminal(quick_run, cache_dir, tmp_path):
    """Scans everything the run wrote, and its stdout/stderr, for the true class counts and raw vote rows."""
    from omegaconf import OmegaConf

    from privimage.classifiers import predict_logits
    from privimage.pipeline import Pipeline
    from privimage.semantics.query import top_k_classes, vote_histogram
    from privimage.stages.semantics import semantic_classifier

    run, first = quick_run
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.cache_dir = str(cache_dir)
    pipeline = Pipeline(cfg, run)
    train, public = pipeline.sensitive_train, pipeline.public
    classifier, _ = semantic_classifier(cfg, public, cache_dir, pipeline.device)
    votes = top_k_classes(predict_logits(classifier, train.images), cfg.semantics.k)
    histogram = vote_histogram(votes, train.labels, train.num_classes, public.num_classes)
    statistics = {"class counts": np.bincount(train.labels, minlength=train.num_classes)}
    statistics |= {f"raw votes of class {name}": row for name, row in zip(train.class_names, histogram)}

    planted = {"control.json": json.dumps({"counts": statistics["class counts"].tolist()}).encode(),
               "control.bin": histogram[3].astype("<f4").tobytes()}
    assert len(_leaks(planted, statistics)) == 2  # the scan does find a statistic that is there

    blobs = {str(path.relative_to(run)): path.read_bytes() for path in run.rglob("*") if path.is_file()}
    blobs |= {"stdout": first.stdout.encode(), "stderr": first.stderr.encode()}
    assert any(name.startswith("tensorboard/") for name in blobs)  # the event files are scanned too
    assert _leaks(blobs, statistics) == []


def test_torchrun_with_two_processes_spends_exactly_what_one_process_does(quick_run, cache_dir, tmp_path):
    """DDP on 2 CPU processes (gloo): the same ledger as the single-process run, one set of artifacts."""
    run, _ = quick_run
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    (tmp_path / "r2" / "private").mkdir(parents=True)  # the same split key, so the same training split and N
    shutil.copy(run / "private" / "split.key", tmp_path / "r2" / "private" / "split.key")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "privimage", "run", "--preset", "quick", "--out", "r2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((run / "privacy.json").read_text())
    double = json.loads((tmp_path / "r2" / "privacy.json").read_text())
    assert double["entries"] == single["entries"] and double["spent"] == single["spent"]
    with np.load(tmp_path / "r2" / "synthetic.npz") as data:
        assert data["images"].shape == (100, 28, 28, 1)
        assert np.bincount(data["labels"], minlength=10).tolist() == [10] * 10
    assert result.stderr.count("privacy spent") == 1  # one rank prints
