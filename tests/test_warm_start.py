"""privimage's warm start: a DP-MERF release booked before it is computed, its generator's images in
pretraining, DP-SGD calibrated for the rest of the budget."""

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from merf_runs import finished_run, quick, release_residual

from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.errors import UserError
from privimage.stages.registry import RELEASE_MODULES
from privimage.pipeline import Pipeline
from privimage.stages.pretrain import picked_image_weights, pretraining_data, public_fit
from privimage.stages.warmstart import despeckle, generator_file, warm_start_images
from privimage.synthetic import balanced_labels, load_synthetic
from privimage.privacy.accountant import compose_epsilon


@pytest.mark.parametrize("epsilon", [1.0, 10.0])
def test_the_warm_start_spends_its_share_of_epsilon_alone(epsilon):
    cfg = load_config("default", overrides=[f"privacy.epsilon={epsilon}"])
    alone = compose_epsilon([RELEASE_MODULES["warmstart"].mechanism(cfg)], cfg.privacy.delta)
    share = cfg.warm_start.epsilon_share
    assert 0.99 * share * epsilon <= alone <= share * epsilon


def test_dp_sgd_is_calibrated_for_what_the_query_and_the_warm_start_leave(cache_dir, tmp_path):
    pipeline = Pipeline(quick(cache_dir), tmp_path / "run").validate()
    mechanisms = pipeline.planned_mechanisms()
    assert len(mechanisms) == 3 and pipeline.stages()[:3] == ("semantics", "warmstart", "pretrain")
    assert 0.99 * 10 <= compose_epsilon(mechanisms, 1e-5) <= 10
    without = Pipeline(quick(cache_dir, "warm_start.epsilon_share=0"), tmp_path / "other").validate()
    assert "warmstart" not in without.stages() and len(without.planned_mechanisms()) == 2
    # The warm start costs DP-SGD noise: its σ rises.
    assert mechanisms[-1].noise_multiplier > without.planned_mechanisms()[-1].noise_multiplier


@pytest.mark.parametrize("share, names_the_share", [(0.8, True), (0, False)])
def test_a_budget_the_releases_before_dp_sgd_use_up_is_refused_naming_what_to_change(share, names_the_share):
    # ε = 0.5: the query (ε 0.375 alone) and 0.8 of ε leave DP-SGD nothing; ε = 0.05: the query alone is too much.
    epsilon = 0.5 if share else 0.05
    cfg = load_config("default", overrides=[f"privacy.epsilon={epsilon}", f"warm_start.epsilon_share={share}"])
    earlier = [RELEASE_MODULES["semantics"].mechanism(cfg)]
    if share:
        earlier.append(RELEASE_MODULES["warmstart"].mechanism(cfg))
    with pytest.raises(UserError, match="semantics.query_sigma") as refused:
        RELEASE_MODULES["finetune"].mechanism(cfg, 4000, earlier)
    assert ("warm_start.epsilon_share" in str(refused.value)) == names_the_share


@pytest.mark.parametrize("share", [-0.1, 1.0, "half"])
def test_an_epsilon_share_outside_zero_to_one_is_refused_in_one_line(cache_dir, share):
    with pytest.raises(UserError, match="warm_start.epsilon_share must be in"):
        quick(cache_dir, f"warm_start.epsilon_share={share}")


@pytest.mark.parametrize("share", [-0.1, 1.5, "half"])
def test_a_sample_warm_start_share_outside_zero_to_one_is_refused_in_one_line(cache_dir, share):
    with pytest.raises(UserError, match="sample.warm_start_share must lie in"):
        quick(cache_dir, f"sample.warm_start_share={share}")


@pytest.mark.parametrize("setting", ["warm_start_sigma=0", "warm_start_sigma=-1", "warm_start_steps=0"])
def test_a_redraw_setting_out_of_range_is_refused_in_one_line(cache_dir, setting):
    with pytest.raises(UserError, match=f"sample.{setting.split('=')[0]} must be"):
        quick(cache_dir, f"sample.{setting}")


def test_despeckling_removes_lone_pixels_keeps_strokes_and_never_mixes_images_or_channels():
    images = np.zeros((3, 9, 9, 3), np.uint8)
    images[0, 4, 4, 0] = 255          # a lone speck
    images[1, :, 3:6, 1] = 200        # a vertical stroke three pixels wide, in the second channel only
    data = ImageDataset(images, np.zeros(3, np.int64), ("a",), name="speckled")
    out = despeckle(data, 3).images
    assert out[0].max() == 0
    assert (out[1, :, 3:6, 1] == 200).all() and out[1, ..., [0, 2]].max() == 0
    assert out[1, :, [0, 1, 2, 6, 7, 8], 1].max() == 0
    assert out[2].max() == 0          # neither neighbour leaks into it
    assert (despeckle(data, 1).images == images).all()


@pytest.mark.parametrize("share", [-0.1, 1.5, "half"])
def test_a_public_features_share_outside_zero_to_one_is_refused_in_one_line(cache_dir, share):
    with pytest.raises(UserError, match="warm_start.public_features must be in"):
        quick(cache_dir, f"warm_start.public_features={share}")


@pytest.mark.parametrize("width", [0, 2, 2.5, "wide"])
def test_a_median_filter_that_is_not_an_odd_positive_width_is_refused_in_one_line(cache_dir, width):
    with pytest.raises(UserError, match="warm_start.median_filter must be an odd positive integer"):
        quick(cache_dir, f"warm_start.median_filter={width}")


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("warm") / "run"
    return root, finished_run(root, quick(cache_dir, "warm_start.samples=30"))


def test_every_release_is_booked_and_released_once_within_the_target(warm_run):
    root, _ = warm_run
    ledger = json.loads((root / "privacy.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["semantics", "warmstart", "finetune"]
    assert all(e["released_steps"] == e["steps"] for e in ledger["entries"])
    assert 9.9 <= ledger["spent"]["epsilon"] <= 10.0


def test_the_released_embedding_is_the_exact_sum_plus_noise_of_the_booked_std(warm_run):
    """Reference: the exact sum recomputed from the training split; the difference is the noise."""
    residual, sigma = release_residual(*warm_run, "warmstart")
    assert residual.std().item() == pytest.approx(sigma, rel=0.05)


def test_the_model_pretrained_on_warm_start_images_stays_out_of_the_shared_cache(warm_run, cache_dir):
    root, pipeline = warm_run
    model = (root / "pretrain" / "model.safetensors").read_bytes()
    cached = list((cache_dir / "pretrained").glob("*.safetensors"))
    assert all(path.read_bytes() != model for path in cached)
    # and it saw the public images that fit (pretrain.public_fit) plus the warm start's 30
    selected = json.loads((root / "semantics.json").read_text())["public_images"]
    pretrain = json.loads((root / "stages" / "pretrain.json").read_text())
    assert pretrain["public_images"] <= selected and pretrain["pretraining_images"] == pretrain["public_images"] + 30


def test_the_synthetic_set_takes_its_warm_start_share_from_the_generator_redrawn_with_balanced_labels(warm_run):
    root, pipeline = warm_run
    cfg, names = pipeline.cfg, pipeline.sensitive_train.class_names
    synthetic, labels = load_synthetic(pipeline.run), balanced_labels(cfg.sample.n, len(names))
    from_generator = round(cfg.sample.warm_start_share * cfg.sample.n)
    assert 0 < from_generator and (synthetic.labels == labels.numpy()).all()
    drawn = warm_start_images(cfg, pipeline.run, names, pipeline.device, labels[-from_generator:])
    redrawn = synthetic.images[-from_generator:].astype(float)
    # redrawn from noise of the configured sigma: changed, and nearer its own generator image than to another of its class
    assert cfg.sample.warm_start_sigma > 0 and (redrawn != drawn.images).any()
    own = np.abs(redrawn - drawn.images).mean()
    other = np.abs(redrawn - np.roll(drawn.images, len(names), axis=0)).mean()
    assert own < other
    marker = json.loads((root / "stages" / "sample.json").read_text())
    assert (marker["from_noise"], marker["from_warm_start"]) == (cfg.sample.n - from_generator, from_generator)
    # sigma null: the generator's images as drawn (the sample stage reruns under the new setting)
    as_drawn = Pipeline(OmegaConf.merge(cfg, {"sample": {"warm_start_sigma": None}}), root)
    as_drawn.create(["sample"])
    as_drawn.run_stage("sample")
    as_drawn.close()
    assert (load_synthetic(pipeline.run).images[-from_generator:] == drawn.images).all()


def test_pretraining_sees_the_generator_images_median_filtered(warm_run):
    root, pipeline = warm_run
    names = pipeline.sensitive_train.class_names
    raw = warm_start_images(OmegaConf.merge(pipeline.cfg, {"warm_start": {"median_filter": 1}}), pipeline.run, names,
                            pipeline.device)
    data, _ = pretraining_data(pipeline)
    assert pipeline.cfg.warm_start.median_filter == 3 and generator_file(pipeline.run).exists()
    assert (data.images[-30:] == despeckle(raw, 3).images).all() and (data.images[-30:] != raw.images).any()


def test_pretrain_warm_start_share_is_the_share_of_each_batch_its_images_make_up(warm_run):
    root, pipeline = warm_run
    every_pick = OmegaConf.merge(pipeline.cfg, {"pretrain": {"public_fit": None, "warm_start_share": None}})  # all selected images, full weight
    data, weights = pretraining_data(Pipeline(every_pick, root))
    assert weights is None  # null: drawn uniformly from the set
    shared = Pipeline(OmegaConf.merge(every_pick, {"pretrain": {"warm_start_share": 0.75}}), root)
    same, weights = pretraining_data(shared)
    assert len(same) == len(data) == len(weights)
    assert weights[-30:].sum().item() == pytest.approx(0.75)  # the warm start's 30 come last
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[:-30].min() > 0  # every selected public image is still drawn
    for c in range(same.num_classes):  # and the share holds within each class
        in_class = torch.as_tensor(same.labels == c)
        assert weights[-30:][in_class[-30:]].sum() / weights[in_class].sum() == pytest.approx(0.75)


@pytest.mark.parametrize("change", ["warm_start.epsilon_share=0.3", "warm_start.public_features=0"])
def test_a_released_warm_start_whose_file_is_gone_or_whose_settings_changed_refuses(warm_run, tmp_path, cache_dir,
                                                                                     change):
    root, _ = warm_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    before = (run / "privacy.json").read_bytes()
    changed = Pipeline(quick(cache_dir, "warm_start.samples=30", change), run)
    with pytest.raises(UserError, match="other settings"):
        changed.validate().create().run_stage("warmstart")
    changed.close()
    (run / "warmstart" / "embedding.safetensors").unlink()
    pipeline = Pipeline(quick(cache_dir, "warm_start.samples=30"), run).validate().create()
    with pytest.raises(UserError, match="use a new --out"):
        pipeline.run_stage("warmstart", force=True)
    assert (run / "privacy.json").read_bytes() == before


def test_public_fit_draws_each_kept_public_image_by_its_picks_weight_and_the_warm_start_takes_the_rest(warm_run):
    root, pipeline = warm_run
    weight_of = public_fit(pipeline, json.loads((root / "semantics.json").read_text())["selected"])
    noted = json.loads((root / "stages" / "pretrain.json").read_text())["public_fit"]
    assert {pick: round(w, 3) for pick, w in weight_of.items()} == {p: w for row in noted.values() for p, w in row.items()}
    data, weights = pretraining_data(pipeline)
    kept = picked_image_weights(pipeline.public, weight_of)
    kept = kept[kept > 0]
    assert len(data) == len(kept) + 30
    assert weights.sum().item() == pytest.approx(1.0)
    labels, per_image = data.labels[:-30], weights[:-30].numpy()
    assert pipeline.cfg.pretrain.warm_start_share is None  # the public images' share: that of the class's images
    for c in np.unique(labels):  # within a class, a kept image is drawn by its pick's weight, within the public share
        in_class, in_set = labels == c, data.labels == c
        share = in_class.sum() / in_set.sum()
        assert per_image[in_class] / kept[in_class] == pytest.approx(np.full(in_class.sum(), per_image[in_class][0]
                                                                             / kept[in_class][0]))
        assert per_image[in_class].sum() <= share * weights[torch.as_tensor(in_set)].sum().item() + 1e-12
