"""The public-fit rule: a selected public class takes part in pretraining as much as the release says it fits."""

import numpy as np
import pytest

from privimage.data import ImageDataset
from privimage.semantics.public_fit import debiased_squared_distances, draw_weights, fit_ratios, fit_weights
from privimage.stages.pretrain import picked_image_weights
from privimage.stages.semantics import pretraining_set


def test_the_noise_is_taken_off_the_squared_distance_on_average():
    rng = np.random.default_rng(0)
    true_means = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    point = np.array([[0.0, 2.0, 0.0, 0.0]])
    noise_var = np.array([0.5, 2.0])
    draws = [debiased_squared_distances(true_means + rng.normal(size=(2, 4)) * np.sqrt(noise_var)[:, None], noise_var,
                                        point)[:, 0] for _ in range(20000)]
    # ‖m_c − u‖² is 4 and 1 + 4; undebiased the means would be 4 + 4 * 0.5 and 5 + 4 * 2. Standard errors ≤ 0.06.
    assert np.mean(draws, axis=0) == pytest.approx([4.0, 5.0], abs=0.25)


def test_a_pick_is_measured_against_its_class_nearest_other_class():
    means = np.array([[0.0, 0.0], [2.0, 0.0], [6.0, 0.0]])  # class 0's nearest other: 2 away; class 2's: 4 away
    picks = np.array([[1.0, 0.0], [0.0, 4.0], [6.0, 2.0]])
    ratios = fit_ratios(means, np.zeros(3), picks, np.array([0, 0, 2]))
    assert ratios == pytest.approx([0.5, 2.0, 0.5])


def test_noise_does_not_make_a_near_pick_look_far():
    rng = np.random.default_rng(1)
    dim, var = 400, 2.5e-3  # noise of norm 1 on each class mean
    means = np.zeros((3, dim))
    means[1], means[2] = 0.1, -0.1  # both 2 away from class 0
    noisy = means + rng.normal(size=means.shape) * np.sqrt(var)
    picks = np.stack([means[0], means[0] + 6.0 / np.sqrt(dim)])  # 0 and 6 away from class 0
    ratios = fit_ratios(noisy, np.full(3, var), picks, np.array([0, 0]))
    # Not debiased the first ratio would be about sqrt(1 / (4 + 2)) = 0.41.
    assert ratios[0] < 0.25 and ratios[1] == pytest.approx(3.0, abs=0.3)


def test_the_weight_falls_from_full_to_none():
    assert fit_weights(np.array([0.2, 1.0, 1.25, 1.5, 3.0]), 1.0, 1.5) == pytest.approx([1, 1, 0.5, 0, 0])
    with pytest.raises(ValueError):
        fit_weights(np.array([1.0]), 1.5, 1.0)


def test_each_image_of_the_pretraining_set_gets_its_picks_weight():
    public = ImageDataset(np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1), np.array([2, 0, 1, 2, 0, 1]),
                          ("a", "b", "c"), name="public")
    selected = pretraining_set(public, {"x": ["c"], "y": ["a"]}, ("x", "y"))
    weights = picked_image_weights(public, {"c": 0.25, "a": 1.0})
    assert selected.images[:, 0, 0, 0].tolist() == [0, 1, 3, 4]  # public order: c, a, c, a
    assert weights.tolist() == [0.25, 1.0, 0.25, 1.0]


def test_each_class_keeps_the_warm_starts_balance_and_its_public_picks_at_most_their_share():
    """Class 0 picks three public images that fit fully, class 1 two that fit half; the warm start holds
    class 0 twice and class 1 four times."""
    public_labels, fit = np.array([0, 0, 0, 1, 1]), np.array([1.0, 1.0, 1.0, 0.5, 0.5])
    warm_labels = np.array([0, 0, 1, 1, 1, 1])
    weights = draw_weights(public_labels, fit, warm_labels, 0.9)
    public, warm = weights[:5], weights[5:]
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()
    for c, class_weight in [(0, 2 / 6), (1, 4 / 6)]:  # each class drawn as often as the warm start holds it
        assert public[public_labels == c].sum() + warm[warm_labels == c].sum() == pytest.approx(class_weight)
    assert public[public_labels == 0].sum() == pytest.approx(0.1 * 2 / 6)  # the share left to public images
    assert public[public_labels == 1].sum() == pytest.approx(0.1 * 0.5 * 4 / 6)  # ... times the picks' fit
    assert np.ptp(public[public_labels == 0]) == 0 and np.ptp(warm[warm_labels == 1]) == 0  # uniform within


def test_a_class_of_few_public_images_cannot_be_crowded_out_by_a_large_pick():
    """300 images of an easy public class against 50 warm-start images of the class that picked it: with no
    share set they are most of the class's draws; with 0.9 a tenth."""
    public_labels, warm_labels = np.zeros(300, dtype=int), np.repeat([0, 1], 50)
    by_set = draw_weights(public_labels, np.ones(300), warm_labels, None)
    capped = draw_weights(public_labels, np.ones(300), warm_labels, 0.9)
    assert by_set[:300].sum() / 0.5 == pytest.approx(300 / 350)
    assert capped[:300].sum() / 0.5 == pytest.approx(0.1)
