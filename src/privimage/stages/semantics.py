"""Stages 1-2: train the semantic query function on public data, query it privately, select semantics.

Writes `semantics.json` (the selection and rounded noisy votes); `pretraining_set` is its reader for
the pretraining stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from privimage import distributed
from privimage.builders import build_classifier
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.config import fingerprint
from privimage.data import ImageDataset
from privimage.classifiers import predict_logits, train_classifier
from privimage.privacy.accountant import Mechanism
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.release import release_once
from privimage.atomic import read_json, write_json
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source, seeded
from privimage.semantics.query import noisy_histogram, select_semantics, top_k_classes, vote_histogram

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

PRIVATE_SEMANTICS_FILE = "semantics.json"  # under private/: statistics of the sensitive test split


def query_mechanism(cfg: DictConfig, num_samples: int = 0, earlier: Sequence[Mechanism] = ()) -> Mechanism:
    """The semantic query as the accountant sees it: one Gaussian mechanism on the whole set, its σ fixed."""
    return Mechanism(float(cfg.semantics.query_sigma))


mechanism = query_mechanism  # what the stage books (methods.py)


def release_key(pipeline: Pipeline) -> str:
    """The name of the query this config books: the stage's fingerprint."""
    return pipeline.stage_fingerprint("semantics")


def _classifier_path(cfg: DictConfig, public: ImageDataset, model: nn.Module, cache_dir: Path) -> Path:
    architecture = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]  # a changed net misses the cache
    key = fingerprint(public.fingerprint(), cfg.semantics.classifier, cfg.seed, architecture)
    return cache_dir / f"semantic-classifier-{key}.safetensors"


def semantic_classifier_is_cached(cfg: DictConfig, public: ImageDataset, cache_dir: Path) -> bool:
    with seeded(cfg.seed):
        return _classifier_path(cfg, public, build_classifier(cfg, public), cache_dir).exists()


def semantic_classifier(
    cfg: DictConfig, public: ImageDataset, cache_dir: Path, device: torch.device
) -> tuple[nn.Module, float]:
    """The public classifier and its held-out public accuracy, trained once per public set and config.

    It never sees sensitive data, so caching it outside the run directory leaks nothing.
    """
    c = cfg.semantics.classifier
    with seeded(cfg.seed):
        model = build_classifier(cfg, public)
    path = _classifier_path(cfg, public, model, cache_dir)
    if distributed.broadcast(path.exists()):
        tensors, meta = load_checkpoint(path)
        model.load_state_dict(tensors)
        return model.to(device).eval(), float(meta["holdout_accuracy"])

    order = np.random.default_rng(cfg.seed).permutation(len(public))
    n_holdout = int(round(c.holdout_fraction * len(public)))
    holdout, train = public.subset(order[:n_holdout]), public.subset(order[n_holdout:])
    train_classifier(
        model, train.images, train.labels, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
        augment=c.augment, balanced=True, seed=cfg.seed, device=str(device), desc="semantic classifier",
        data_parallel=distributed.is_distributed(), bf16=c.bf16,
    )
    predicted = predict_logits(model, holdout.images, device=str(device), reduce=lambda logits: logits.argmax(1))
    accuracy = float((predicted.numpy() == holdout.labels).mean()) if n_holdout else float("nan")
    if distributed.is_main():
        save_checkpoint(path, model.state_dict(), {"holdout_accuracy": accuracy, "classes": list(public.class_names)})
    return model.eval(), accuracy


def _same_semantic(public_name: str, sensitive_name: str) -> bool:
    """`glyph:7` and `uci:7` name the same semantic as sensitive class `7`."""
    return public_name.split(":")[-1] == sensitive_name


def _selection_diagnostics(selected: dict[str, list[str]]) -> dict:
    """How the selection reads: classes whose picks name their own class (`glyph:7` for `7`), and the
    share of picks by public source (the prefix of `source:name`). Post-processing of the noisy picks."""
    picks = [name for names in selected.values() for name in names]
    sources = [name.split(":")[0] if ":" in name else "" for name in picks]
    return {
        "classes_with_own_semantic_first": sum(_same_semantic(names[0], c) for c, names in selected.items()),
        "classes_with_own_semantic": sum(any(_same_semantic(n, c) for n in names) for c, names in selected.items()),
        "picks_by_source": {source: sources.count(source) / len(picks) for source in sorted(set(sources))},
    }


def run_semantics(
    cfg: DictConfig,
    run: RunDir,
    ledger: PrivacyLedger,
    sensitive_train: ImageDataset,
    sensitive_test: ImageDataset,
    public: ImageDataset,
    classifier: tuple[nn.Module, float],
    device: torch.device,
    release: str,
) -> dict | None:
    """Run the DP vote query of `classifier` (the model and its public holdout accuracy, from
    `semantic_classifier`), write `semantics.json`.

    `release` names this query (the stage's fingerprint). It is booked once, and marked released in
    the ledger before `semantics.json` is written. Rerun, the stage reuses the `semantics.json` of
    that release; a booking not yet released (killed in between) is queried under the same booking,
    since its result never left the process; a released one whose file is gone refuses.
    """
    s = cfg.semantics
    per_class = s.per_class or s.k
    model, holdout_accuracy = classifier
    if not distributed.is_main():
        return None  # the query itself is cheap: rank 0 alone runs and books it

    def query(mechanism: Mechanism) -> dict:
        votes = predict_logits(model, sensitive_train.images, device=str(device),
                               reduce=lambda l: top_k_classes(l, s.k))
        hist = vote_histogram(votes, sensitive_train.labels, sensitive_train.num_classes, public.num_classes)
        noisy = noisy_histogram(hist, mechanism.noise_multiplier, s.k, dp_noise_source(cfg.privacy.secure_rng))
        del hist
        picks = select_semantics(noisy, per_class)
        selected = {
            sensitive_train.class_names[i]: [public.class_names[p] for p in row] for i, row in enumerate(picks)
        }
        chosen = np.isin(public.labels, [p for row in picks for p in row])
        return {
            "selected": selected,
            "noisy_votes": {  # rounded: the selection needs no more, and fewer digits give less to attack
                "public_classes": list(public.class_names),
                "rows": {name: [int(round(float(v))) for v in row]
                         for name, row in zip(sensitive_train.class_names, noisy)},
            },
            "public_fraction": float(chosen.mean()),
            "public_images": int(chosen.sum()),
            "k": s.k,
            "per_class": per_class,
            "query_sigma": s.query_sigma,
            "release": release,
            "diagnostics": {  # of public data and the noisy picks only
                "classifier_public_holdout_accuracy": holdout_accuracy,
                **_selection_diagnostics(selected),
            },
        }

    def write(result: dict) -> None:
        write_json(run.semantics, result)
        # For the data owner: how often the classifier's top-1 public class names a real test image's class.
        test_top1 = predict_logits(model, sensitive_test.images, device=str(device),
                                   reduce=lambda l: l.argmax(1)).numpy()
        agreement = np.mean([
            _same_semantic(public.class_names[p], sensitive_test.class_names[y])
            for p, y in zip(test_top1, sensitive_test.labels)
        ])
        write_json(run.private / PRIVATE_SEMANTICS_FILE, {"test_split_top1_same_semantic": float(agreement)},
                   private=True)

    def read() -> dict | None:
        released = read_json(run.semantics) if run.semantics.exists() else {}
        return released if released.get("release") == release else None

    return release_once(
        ledger, "semantics", release, lambda: query_mechanism(cfg), compute=query, write=write, read=read,
        missing=f"the ledger records this semantic query as released but {run.semantics} is missing or from "
                "another query: it cannot be made again, since querying again would release the votes twice; "
                "use a new --out")


def pretraining_set(public: ImageDataset, selected: dict[str, list[str]], class_names: tuple[str, ...]) -> ImageDataset:
    """The public images of the selected semantics, relabelled to the sensitive class that chose them."""
    relabel = np.full(public.num_classes, -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(public.class_names)}
    for sensitive_index, name in enumerate(class_names):
        for public_name in selected[name]:
            relabel[index[public_name]] = sensitive_index
    new_labels = relabel[public.labels]
    keep = np.flatnonzero(new_labels >= 0)
    return replace(public.subset(keep), labels=new_labels[keep], class_names=tuple(class_names),
                   name=f"{public.name}[selected]")


def run(pipeline: Pipeline) -> None:
    # Public work on the budget's clock (DDP under torchrun); the query reads sensitive data, so it is not.
    classifier = semantic_classifier(pipeline.cfg, pipeline.public, pipeline.cache_dir, pipeline.device)
    with pipeline.clock.reading_sensitive():
        run_semantics(pipeline.cfg, pipeline.run, pipeline.ledger, pipeline.sensitive_train, pipeline.sensitive_test,
                      pipeline.public, classifier, pipeline.device, release=release_key(pipeline))
