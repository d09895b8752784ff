"""``layout-link``: find a patient's second acquisition across two hospitals' keys by placing each
key's slots on the image grid and comparing decoded thumbnails at the best sub-patch shift.

No plaintext of the release and no key. What it does use: images of the same kind as the
release's (the public phantom generator, as an attacker would use public x-rays) encoded under
keys it samples itself. Per site (:mod:`attacks.layout`): undo the shuffles, project the rows on
the site's leading principal directions, place the slots on the grid by matching their
covariances to those of the attacker's own images by position, decode every encoding's 4 x 4
sub-means per patch with an affine map that gives each slot the mean and covariance of the
attacker's images' sub-means at its position, and compare two sites' thumbnails at the best of a
grid of shifts (one site's mirrored where that fits better: a layout is found up to the images'
near left-right symmetry). A pair is claimed by how far it stands out of its row and its column;
the public labels, where the release has them, break near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from ncbench.attacks.acquisitions import SiteComponents
from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.decoding import thumbnail_patches
from ncbench.attacks.gram_link import (
    LABEL_AGREEMENT,
    LinkClaims,
    evidence,
    label_evidence,
    lead,
    sites_to_link,
)
from ncbench.attacks.layout import (
    moment_decoder,
    oriented_similarity,
    placed_thumbnails,
    slot_covariances,
    slot_layout,
)
from ncbench.attacks.pairing import aligned_statistics
from ncbench.attacks.self_keyed import self_encode
from ncbench.attacks.submission import Submission
from ncbench.challenge.encoders import EncoderConfig
from ncbench.challenge.files import Release, SiteView
from ncbench.challenge.phantom import render_phantoms
from ncbench.errors import NcbenchError

# Principal directions per key: the slot covariances are taken on them and the decoder reads them
# all (on five nc7 releases of 2 x 200, mean R-precision 84.7% with the decoder on the leading 16,
# 86.5% on 32, 86.2% with 48 for both).
COMPONENTS = 32
REFERENCE_IMAGES = 200
LAYOUT_HOPS = 200
# Thumbnail cells per patch side: on nine nc7 releases of 2 x 200, mean R-precision 93.8% with
# 2 x 2 sub-means and 95.0% with 4 x 4 (on four of them, the true images' thumbnails would give
# 96.9% and 98.9%).
FINE = 4
# Shifts up to 0.75 patch (12 px at 256 px, beyond a second acquisition's 10), 13 x 13 of them;
# 1.5 patches of border left out (what a shift moves in from outside the image).
SHIFT_REACH = 0.75
SHIFT_STEPS = 13
BORDER = 1.5
# The labels' log-likelihood ratio against the scores in robust standard units, a tie-breaker: on
# nine nc7 releases of 2 x 200, mean R-precision 93.8% without labels, 94.9% at 0.05, 95.0% at
# 0.1, 93.9% at 0.2, 91.5% at 0.4.
LABEL_WEIGHT = 0.1


@dataclass
class Reference:
    """The attacker's own images by position: their slot covariances (P, P), and the mean (P, q)
    and covariance (P, q, q) of their q = FINE^2 sub-means per patch."""

    covariances: np.ndarray
    sub_means: np.ndarray
    sub_covariances: np.ndarray


class PlacedSite(NamedTuple):
    """One site's encodings: the slot of each row (N, P), the rows in slot order on the site's
    principal directions less their slot means (N, P, K), those means (P, K), and the grid
    position of each slot (P,)."""

    slots: np.ndarray
    components: np.ndarray
    slot_means: np.ndarray
    positions: np.ndarray


class LayoutLink(Attack):
    name = "layout-link"
    version = "2.0"
    tasks = ("link",)
    knowledge = ("architecture", "self-sampled-keys", "auxiliary-data", "labels")
    description = (
        "Place each key's slots on the image grid from its slot covariances, decode thumbnails, and link "
        "two sites' encodings at the best sub-patch shift."
    )

    @dataclass
    class Params:
        candidates: int = param(4, "claimed partners per encoding, best first", min=1, max=16)
        reference_images: int = param(
            REFERENCE_IMAGES, "phantoms encoded under a self-sampled key as the layout's reference", min=16, max=10000
        )
        layout_hops: int = param(LAYOUT_HOPS, "restarts of the layout's local search", min=0, max=10000)
        label_weight: float = param(
            LABEL_WEIGHT, "weight of the labels' log-likelihood ratio (standard units; 0: not used)", min=0.0, max=100.0
        )
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        site_pairs = sites_to_link(release, self.name)
        config = release.config
        grid = int(round(np.sqrt(config.n_patches)))
        if config.patch_size % FINE:
            raise NcbenchError(
                f"{release.path}: layout-link needs a patch size that is a multiple of {FINE}, not {config.patch_size}"
            )
        p = self.params
        labels = release.labels
        views = [release.site(site) for site in range(release.n_sites)]
        reference = self.reference(config)
        thumbnails = [self.thumbnails(view, reference, grid) for view in views]
        claims, mirrored = LinkClaims(release, p.candidates), []
        for a, b in site_pairs:
            with self.stage("compare at shifts"):
                scores, flip = oriented_similarity(
                    thumbnails[a],
                    thumbnails[b],
                    reach=SHIFT_REACH * FINE,
                    steps=SHIFT_STEPS,
                    border=int(BORDER * FINE),
                )
            mirrored.append(flip)
            prior = 0.0
            if p.label_weight and labels.ndim == 2 and labels.shape[1]:
                prior = p.label_weight * label_evidence(labels[views[a].rows], labels[views[b].rows], LABEL_AGREEMENT)
            claims.add(views[a], views[b], lead(evidence(scores, 0.0)) + prior)
        return claims.answer(self, {"mirrored_layouts": mirrored})

    def reference(self, config: EncoderConfig) -> Reference:
        """The attacker's phantoms under a key it samples, at the release's width: their slot
        covariances and sub-means' moments by position."""
        seed = int(self.rng("reference").integers(2**62))
        with self.stage("reference images", self.params.reference_images) as advance:
            images, _ = render_phantoms(self.params.reference_images, seed=seed, image_size=config.image_size)
            blocks, mean = self_encode(
                images, config, width=config.width, seed=seed, device=self.device, advance=advance
            )
        encoded = torch.cat([block for _, block in blocks]).float() - mean.to(blocks[0][1].device)
        rows = encoded.reshape(-1, encoded.shape[-1])
        count = min(COMPONENTS, config.n_patches // 4)
        directions = torch.linalg.eigh((rows.T @ rows).double())[1][:, -count:].flip(1).float()
        components = (encoded @ directions).cpu().numpy()
        content = thumbnail_patches(torch.from_numpy(images), config, config.patch_size // FINE).double()
        centred = content - content.mean(0)
        sub_covariances = torch.einsum("npa,npb->pab", centred, centred) / len(content)
        return Reference(slot_covariances(components), content.mean(0).numpy(), sub_covariances.numpy())

    def thumbnails(self, view: SiteView, reference: Reference, grid: int) -> np.ndarray:
        """(N, FINE grid, FINE grid) one site's decoded thumbnails, its slots placed on the grid."""
        placed = self.placed(view, reference, grid)
        with self.stage("decoder"):
            decoder = moment_decoder(
                placed.components,
                placed.slot_means,
                reference.sub_means[placed.positions],
                reference.sub_covariances[placed.positions],
            )
        contents = placed.components + placed.slot_means
        return placed_thumbnails(contents @ decoder[:-1] + decoder[-1], placed.positions, grid)

    def placed(self, view: SiteView, reference: Reference, grid: int) -> PlacedSite:
        """One site's shuffles undone, its rows on its leading principal directions, and its slots
        placed on the grid (:func:`~ncbench.attacks.layout.slot_layout`)."""
        sketch = SiteComponents(COMPONENTS, self.device)
        aligned = aligned_statistics(
            view,
            self,
            chunk=self.params.chunk,
            on_reference_rows=sketch.gather,
            on_rows=partial(sketch.project, n_encoded=view.n_encoded),
            grams=False,
        )
        with self.stage("slot layout"):
            components = sketch.values(aligned.slots)
            positions = slot_layout(
                slot_covariances(components),
                reference.covariances,
                grid=grid,
                hops=self.params.layout_hops,
                rng=self.rng("layout"),
            )
        return PlacedSite(aligned.slots, components, sketch.slot_means(), positions)
