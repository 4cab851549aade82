"""How much each selected public class takes part in pretraining: as much as it fits its sensitive class.

The DP query always picks some public class for every sensitive class, also where the public set holds
nothing like it (animals against a set of letters): pretrained on it, the diffusion model draws letters
under the animals' labels, and DP-SGD does not undo that. The warm start's release says how far each
pick is: its class means are DP-MERF/DP-MEPF mean embeddings of the sensitive classes, so the distance
from the mean embedding of a public class to them is a kernel distance (an MMD) between the two image
distributions. A pick fits its sensitive class when it is about as close to it as the class's nearest
other sensitive class is: no closer than the classes the data owner needs told apart are to each other.

Only released DP outputs and public images enter: post-processing, no privacy cost.
"""

from __future__ import annotations

import numpy as np


def debiased_squared_distances(noisy_means: np.ndarray, noise_var: np.ndarray, points: np.ndarray) -> np.ndarray:
    """‖m_c − u_j‖² for every class c and point j, from noisy means M_c = m_c + N(0, noise_var[c]) per coordinate:
    ‖M_c − u_j‖² overstates it by D·noise_var[c] on average, which is taken off. (C, J)."""
    squared = ((noisy_means[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    return squared - noisy_means.shape[1] * noise_var[:, None]


def fit_ratios(noisy_means: np.ndarray, noise_var: np.ndarray, pick_means: np.ndarray,
               pick_class: np.ndarray) -> np.ndarray:
    """For each pick j (the mean embedding of a public class, selected by sensitive class pick_class[j]):
    its distance to that class over the class's distance to its nearest other sensitive class (both
    debiased). Below 1: the pick is closer to the class than any other sensitive class is."""
    between = debiased_squared_distances(noisy_means, noise_var, noisy_means) - noisy_means.shape[1] * noise_var[None, :]
    np.fill_diagonal(between, np.inf)
    nearest = np.maximum(between.min(axis=1), 1e-12)  # a class closer than the noise to another: barely apart
    to_pick = debiased_squared_distances(noisy_means, noise_var, pick_means)[pick_class, np.arange(len(pick_class))]
    return np.sqrt(np.maximum(to_pick, 0.0) / nearest[pick_class])


def fit_weights(ratios: np.ndarray, full: float, none: float) -> np.ndarray:
    """A pick's weight in pretraining, 0..1: 1 up to ratio `full`, falling linearly to 0 at ratio `none`."""
    if not 0 <= full < none:
        raise ValueError(f"need 0 <= full < none, got full={full}, none={none}")
    return np.clip((none - ratios) / (none - full), 0.0, 1.0)


def draw_weights(public_labels: np.ndarray, public_fit: np.ndarray, warm_labels: np.ndarray,
                 warm_share: float | None) -> np.ndarray:
    """Each pretraining image's chance of being drawn: the kept public images (their sensitive labels and
    picks' fit), then the warm start's images.

    Each class is drawn as often as the warm start's images hold it (the release's class balance). Within a
    class, the warm start's images take `warm_share` of its draws (None: their share of the class's images)
    and its public images the rest, in proportion to their fit; what a pick's shortfall from full fit leaves
    goes to the class's warm-start images. So a public class never outweighs the sensitive style of the class
    that picked it, however easy its shapes are to learn.
    """
    public_w, warm_w = np.zeros(len(public_labels)), np.zeros(len(warm_labels))
    for c in np.unique(warm_labels):
        public, warm = public_labels == c, warm_labels == c
        share = warm.sum() / (warm.sum() + public.sum()) if warm_share is None else warm_share
        public_part = (1 - share) * public_fit[public].mean() if public.any() else 0.0
        class_weight = warm.sum() / len(warm_labels)
        public_w[public] = class_weight * (1 - share) * public_fit[public] / max(public.sum(), 1)
        warm_w[warm] = class_weight * (1 - public_part) / warm.sum()
    return np.concatenate([public_w, warm_w])
