"""``gram-link``: find the encodings two hospitals' independent keys made of one image or patient.

No plaintext and no key are needed. A wide random ReLU network nearly preserves the geometry of
its input patches whatever its key, so the Gram matrix of an image's slot-centred patches is
nearly the same under two keys, up to the two keys' slot orders. Per pair of sites: undo the
shuffles per site (:mod:`attacks.pairing`), match sorted patch norms (blind to slot order),
recover the slot -> slot permutation from the surest pairs, compare Gram matrices in that order.
Most encodings have no partner, so each claim carries a score that ranks it against all others.

``gram-label-link`` adds the encodings' public labels: a patient's two acquisitions mostly carry
the same findings, two patients' agree only as often as the findings' frequencies allow. Once the
labels have put the slot order mostly right, it also compares the patch contents in a way a shift
smaller than a patch does not break (:mod:`attacks.acquisitions`), and recovers the slot order
again from the pairs all three pieces of evidence trust most.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import combinations
from typing import NamedTuple

import numpy as np
from scipy.special import logsumexp

from ncbench.assignment import match
from ncbench.attacks.acquisitions import COMPONENTS, SiteComponents, acquisition_scores, acquisition_targets
from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.pairing import REFINE_PAIRS, Boosted, aligned_statistics, boost
from ncbench.attacks.statistics import PatchStatistics, sorted_norm_scores
from ncbench.attacks.submission import Submission
from ncbench.challenge.files import Release, SiteView
from ncbench.errors import NcbenchError

NEIGHBOURS = 10  # CSLS neighbourhood
# Two rounds: most encodings have no partner, so the share of mutual best pairs that stops
# gram-hungarian's boosting says little here (more rounds lowered R-precision on tiny releases).
BOOST_ROUNDS = 2
# With the labels in the trusted pairs, these grew more right each round up to the fourth on one
# nc7 release of second acquisitions (2 x 200 phantom images: 7, 20, 30, 37% right; eight rounds
# ended there too). Weights: log-likelihood ratios against CSLS scores in robust standard units.
LABEL_BOOST_ROUNDS = 4
LABEL_AGREEMENT = 0.95
LABEL_WEIGHT = 1.0
TRUSTED_LABEL_WEIGHT = 3.0
# The slot order recovered again from the trusted pairs of the Gram, label and acquisition
# evidence: on eight nc7 releases of second acquisitions (2 x 200 phantom images) its share of
# slots right went from 62-84% to 81-89% in two rounds.
ACQUISITION_ROUNDS = 2
ACQUISITION_WEIGHT = 1.0
# The slot order is recovered from the surest 30% of the first pairs and again from the surest 10%
# and 50%. Each start fails on some keys, its slot order nearly all wrong (R-precision 0-20%): on
# nc7 releases of second acquisitions (2 x 200 phantom images) 0.3 on three of twenty, 0.1 and 0.2
# on two of twelve each, and one key failed 0.1, 0.2 and 0.3 but not 0.5. A failed order shows in
# the acquisition comparison, whose surest pairs then stand out far less (standout 2.4-3.1 against
# 3.8-4.7 where the order came out right).
RESTART_FRACTIONS = (0.1, 0.5)
# The claims' evidence balanced by Sinkhorn iterations at this temperature (standard units): some
# encodings' labels and contents resemble many others', and each encoding has one partner at
# most. On five such releases the mean R-precision of the two halves went from 57.9% to 67.3%
# (1.0: 66.0%, 2.0: 66.3%, 3.0: 65.0%; the CSLS score of the evidence instead: 64.2%).
CLAIM_TEMPERATURE = 1.5
SINKHORN_ITERATIONS = 50


class Start(NamedTuple):
    """The boosting from the surest ``fraction`` of pairs: the slot order ``chosen`` (the labels'
    where ``kept``), its ``acquisitions`` scores (None where they are not compared) and how far
    their surest pairs stand out (:func:`standout`, 0 without them)."""

    fraction: float
    chosen: Boosted
    kept: bool
    acquisitions: np.ndarray | None
    standout: float


@dataclass(frozen=True)
class LinkSite:
    """One site's encodings as the link attacks compare them."""

    statistics: PatchStatistics
    # (N, P, K) and (N, P, q): :class:`~ncbench.attacks.acquisitions.SiteComponents` and their
    # targets, when the attack compares acquisitions
    components: np.ndarray | None = None
    targets: np.ndarray | None = None


class GramLink(Attack):
    name = "gram-link"
    version = "1.0"
    tasks = ("link",)
    knowledge = ("architecture",)
    description = "Link two sites' encodings of one image by Gram statistics, without plaintexts or keys."

    @dataclass
    class Params:
        candidates: int = param(4, "claimed partners per encoding, best first", min=1, max=16)
        trusted: float = param(
            0.3, "fraction of surest first-round pairs the slot order is fitted on", min=0.01, max=1.0
        )
        boost_rounds: int = param(
            BOOST_ROUNDS, "at most this many rounds of slot recovery + Gram re-matching", min=1, max=20
        )
        refine_pairs: int = param(
            REFINE_PAIRS, "trusted pairs whose Gram matrices refine the slot order", min=1, max=100000
        )
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        site_pairs = sites_to_link(release, self.name)
        views = [release.site(site) for site in range(release.n_sites)]
        priors = [self.prior(release, views[a], views[b]) for a, b in site_pairs]  # before the long part
        sites = [self.site(view) for view in views]
        rng = self.rng("refine")
        claims, kept = LinkClaims(release, self.params.candidates), []
        for (a, b), prior in zip(site_pairs, priors, strict=True):
            with self.stage("match sorted norms"):
                first = sorted_norm_scores(sites[a].statistics, sites[b].statistics)
            scores, claim_prior, labels_kept = self.linked(
                sites[a], sites[b], first, prior, rng, release.config.shuffle
            )
            kept.append(labels_kept)
            claims.add(views[a], views[b], self.surety(scores, claim_prior))
        diagnostics = {"label_boost_kept": kept} if any(k is not None for k in kept) else {}
        return claims.answer(self, diagnostics)

    def site(self, view: SiteView) -> LinkSite:
        """One site's statistics, in its own slot order."""
        return LinkSite(aligned_statistics(view, self, chunk=self.params.chunk).statistics)

    def prior(self, release: Release, left: SiteView, right: SiteView) -> np.ndarray | None:
        """(L, R) evidence for each pair of the two sites' encodings besides their Gram statistics
        (a log-likelihood ratio); None: none."""
        return None

    def linked(
        self,
        left: LinkSite,
        right: LinkSite,
        first: np.ndarray,
        prior: np.ndarray | None,
        rng: np.random.Generator,
        shuffle: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, bool | None]:
        """The two sites' Gram scores after the boosting, the evidence the claims add to them, and
        whether the labels' boosting was kept (None: no labels)."""
        return self.boosted(left, right, first, self.params.boost_rounds, None, rng, shuffle).scores, None, None

    def surety(self, scores: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        """(L, R) what ranks the claims: the CSLS scores (:func:`standing`), or with a ``prior``
        their :func:`evidence`."""
        return standing(scores) if prior is None else evidence(scores, prior)

    def boosted(
        self,
        left: LinkSite,
        right: LinkSite,
        first: np.ndarray | None,
        rounds: int,
        prior: np.ndarray | None,
        rng: np.random.Generator,
        shuffle: bool,
        *,
        label: str = "",
        first_pairs: tuple[np.ndarray, np.ndarray] | None = None,
        fraction: float | None = None,
    ) -> Boosted:
        """The Gram comparison after ``rounds`` of boosting: the slot -> slot order recovered from
        each round's trusted pairs (the :func:`surest` ``fraction``, by default the ``trusted``
        parameter, with ``prior`` added to their scores; ``first_pairs`` instead in the first
        round)."""
        with self.stage(label or ("boost" if prior is None else "boost with labels"), rounds) as advance:
            return boost(
                left.statistics,
                right.statistics,
                first,
                rounds=rounds,
                refine_pairs=self.params.refine_pairs,
                rng=rng,
                shuffle=shuffle,
                trusted=partial(surest, fraction=fraction or self.params.trusted, prior=prior),
                advance=advance,
                first_pairs=first_pairs,
            )


class GramLabelLink(GramLink):
    name = "gram-label-link"
    version = "1.5"
    tasks = ("link",)
    knowledge = ("architecture", "labels")
    description = (
        "gram-link, with the public labels' agreement and a shift-tolerant comparison of patch contents "
        "as evidence for every pair it weighs."
    )

    @dataclass
    class Params(GramLink.Params):
        label_boost_rounds: int = param(
            LABEL_BOOST_ROUNDS, "rounds of the second boosting, with the labels in its trusted pairs", min=1, max=20
        )
        label_agreement: float = param(
            LABEL_AGREEMENT, "chance that a label is the same on two acquisitions of one patient", min=0.5, max=0.999
        )
        label_weight: float = param(
            LABEL_WEIGHT, "weight of the labels' log-likelihood ratio in the claims", min=0.0, max=100.0
        )
        trusted_label_weight: float = param(
            TRUSTED_LABEL_WEIGHT, "weight of the labels' log-likelihood ratio in the trusted pairs", min=0.0, max=100.0
        )
        acquisition_weight: float = param(
            ACQUISITION_WEIGHT,
            "weight of the shift-tolerant comparison of patch contents (standard units; 0: not used)",
            min=0.0,
            max=100.0,
        )
        acquisition_rounds: int = param(
            ACQUISITION_ROUNDS, "times the slot order is recovered again from all the evidence", min=0, max=20
        )
        restarts: int = param(
            len(RESTART_FRACTIONS),
            "further starts of the slot order, from the surest 10% and 50% of first-round pairs",
            min=0,
            max=len(RESTART_FRACTIONS),
        )
        claim_temperature: float = param(
            CLAIM_TEMPERATURE,
            "temperature of the Sinkhorn balancing of the claims' evidence (standard units; 0: none)",
            min=0.0,
            max=100.0,
        )

    def site(self, view: SiteView) -> LinkSite:
        """With the site's components and targets for
        :func:`~ncbench.attacks.acquisitions.acquisition_scores`, unless their weight is 0."""
        p = self.params
        if p.acquisition_weight == 0:
            return super().site(view)
        sketch = SiteComponents(COMPONENTS, self.device)
        aligned = aligned_statistics(
            view,
            self,
            chunk=p.chunk,
            on_reference_rows=sketch.gather,
            on_rows=partial(sketch.project, n_encoded=view.n_encoded),
        )
        with self.stage("site components"):
            components = sketch.values(aligned.slots)
            targets = acquisition_targets(components, rng=self.rng("acquisition targets"))
        return LinkSite(aligned.statistics, components, targets)

    def prior(self, release: Release, left: SiteView, right: SiteView) -> np.ndarray:
        labels = release.labels
        if labels.ndim != 2 or labels.shape[1] == 0:
            raise NcbenchError("gram-label-link needs labels; this release has none")
        return label_evidence(labels[left.rows], labels[right.rows], self.params.label_agreement)

    def linked(
        self,
        left: LinkSite,
        right: LinkSite,
        first: np.ndarray,
        prior: np.ndarray | None,
        rng: np.random.Generator,
        shuffle: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, bool | None]:
        """Boosted twice: as gram-link does, and with the labels in the trusted pairs; the slot
        order whose Gram scores stand out more (:func:`standout`) is kept. The labels make the first
        trusted pairs more right, but their coincidences can also lead the slot order astray, which
        the Gram scores then show. Then the patch contents are compared in that slot order
        (:func:`~ncbench.attacks.acquisitions.acquisition_scores`), and the slot order is recovered
        again from the pairs the Gram, label and acquisition evidence trust most together.

        Where the contents are compared, the boosting and the first comparison run from the surest
        ``trusted`` fraction of pairs and from ``restarts`` more (:data:`RESTART_FRACTIONS`), and
        the start whose comparison stands out most goes on: a slot order that came out wrong leaves
        that comparison noise."""
        p = self.params
        compares = left.components is not None and right.components is not None
        fractions = [p.trusted, *RESTART_FRACTIONS[: p.restarts]] if compares and shuffle else [p.trusted]
        fractions = list(dict.fromkeys(fractions))  # a start once, where ``trusted`` is a restart's
        starts = [self._started(left, right, first, prior, rng, shuffle, fraction) for fraction in fractions]
        fraction, chosen, kept, acquisitions, _ = max(starts, key=lambda start: start.standout)
        claim_prior = p.label_weight * prior
        if acquisitions is None:
            return chosen.scores, claim_prior, kept
        for round_ in range(p.acquisition_rounds + 1):
            if round_:
                acquisitions = self._compared(left, right, chosen)
            weighed = claim_prior + p.acquisition_weight * evidence(acquisitions, 0.0)
            if round_ == p.acquisition_rounds or not shuffle:
                break
            trusted = surest(chosen.scores, fraction, prior=weighed)
            chosen = self.boosted(
                left,
                right,
                None,
                1,
                None,
                rng,
                shuffle,
                label="slot order again",
                first_pairs=trusted,
                fraction=fraction,
            )
        return chosen.scores, weighed, kept

    def _started(
        self,
        left: LinkSite,
        right: LinkSite,
        first: np.ndarray,
        prior: np.ndarray,
        rng: np.random.Generator,
        shuffle: bool,
        fraction: float,
    ) -> Start:
        """The boosting, as gram-link does and with the labels, from the surest ``fraction`` of
        pairs, and the first acquisition comparison in the slot order kept."""
        p = self.params
        start = f"from the surest {fraction:.0%}"
        plain = self.boosted(
            left, right, first, p.boost_rounds, None, rng, shuffle, label=f"boost {start}", fraction=fraction
        )
        labelled = self.boosted(
            left,
            right,
            first,
            p.label_boost_rounds,
            p.trusted_label_weight * prior,
            rng,
            shuffle,
            label=f"boost with labels {start}",
            fraction=fraction,
        )
        kept = standout(labelled.scores, fraction) > standout(plain.scores, fraction)
        chosen = labelled if kept else plain
        if left.components is None or right.components is None:
            return Start(fraction, chosen, kept, None, 0.0)
        acquisitions = self._compared(left, right, chosen, f"compare acquisitions {start}")
        return Start(fraction, chosen, kept, acquisitions, standout(acquisitions, p.trusted))

    def _compared(
        self, left: LinkSite, right: LinkSite, chosen: Boosted, label: str = "compare acquisitions"
    ) -> np.ndarray:
        """The acquisition scores in ``chosen``'s slot order."""
        with self.stage(label):
            order = chosen.slot_positions
            return acquisition_scores(
                left.components, left.targets, right.components[:, order], right.targets[:, order]
            )

    def surety(self, scores: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        """The evidence, balanced (:func:`balanced`) unless ``claim_temperature`` is 0."""
        surety = super().surety(scores, prior)
        temperature = self.params.claim_temperature
        return surety if prior is None or temperature == 0 else balanced(surety, temperature)


def standing(scores: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """(L, R) cross-domain similarity local scaling (CSLS, Conneau et al. 2018): twice the score
    minus the mean of each side's ``neighbours`` best scores. Some images resemble many others
    (hubs) and score high with everyone; a partner-less encoding's best score is only the top of
    its noise. Ranking claims by how far a score stands out of both neighbourhoods beats ranking
    by the raw score (R-precision 0.82 vs 0.82 top-1, 0.78 vs 0.72 over all pairs on a sample-source
    nc7 release of 2 x 200)."""
    k = min(neighbours, scores.shape[0], scores.shape[1])
    rows = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:].mean(1, keepdims=True)
    cols = np.partition(scores, scores.shape[0] - k, axis=0)[-k:].mean(0, keepdims=True)
    return 2 * scores - rows - cols


def evidence(scores: np.ndarray, prior: np.ndarray | float) -> np.ndarray:
    """(L, R) the CSLS scores (:func:`standing`) standardised over all pairs (median and
    normal-consistent median absolute deviation: true pairs are few and far out), plus ``prior``."""
    surety = standing(scores)
    centre = np.median(surety)
    spread = 1.4826 * np.median(np.abs(surety - centre))
    return (surety - centre) / max(spread, 1e-12) + prior


def lead(surety: np.ndarray) -> np.ndarray:
    """(L, R) how far each pair's ``surety`` stands above the best other pair of its row and of its
    column (Lowe's ratio test, as a difference, both ways). A partner-less encoding's best pair is
    only the top of its noise, with others close behind; one-to-one partners stand out of both
    their row and their column."""
    rivals = np.full(surety.shape, -np.inf)
    for values, transpose in ((surety, False), (surety.T, True)):
        if values.shape[1] > 1:
            top = np.partition(values, values.shape[1] - 2, axis=1)[:, -2:]  # (n, 2) second best, best
            other = np.where(values >= top[:, 1:], top[:, :1], top[:, 1:])
            rivals = np.maximum(rivals, other.T if transpose else other)
    return surety - np.where(np.isfinite(rivals), rivals, surety)


def standout(scores: np.ndarray, fraction: float) -> float:
    """How far the assigned pairs of ``scores`` stand out: the mean standardised CSLS score
    (:func:`evidence`) of the :func:`surest` ``fraction`` of them."""
    rows, columns = surest(scores, fraction, prior=0.0)
    return float(evidence(scores, 0.0)[rows, columns].mean())


def label_evidence(left: np.ndarray, right: np.ndarray, agreement: float) -> np.ndarray:
    """(L, R) float32 log-likelihood ratio of two encodings' labels (L, K) and (R, K) under "one
    patient" against "two patients": per label, one patient keeps its value with probability
    ``agreement`` (and changes it otherwise), two patients agree as the value's frequency among
    the ``right`` encodings says."""
    total = np.zeros((len(left), len(right)), np.float32)
    for column in range(left.shape[1]):
        values, counts = np.unique(right[:, column], return_counts=True)
        chance = (counts / len(right))[np.searchsorted(values, right[:, column])]  # (R,)
        same = left[:, column, None] == right[None, :, column]
        total += np.log(np.where(same, agreement, 1 - agreement) / chance).astype(np.float32)
    return total


def surest(
    scores: np.ndarray, fraction: float, prior: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``fraction`` of assigned pairs (rows, columns) that stand out most (at least 8); with a
    ``prior``, assigned and ranked by :func:`evidence`.

    An assignment, not mutual best pairs as for reid: a site holds hundreds to a few thousand
    encodings, and on second acquisitions (``patient`` overlap) the assignment's pairs recover the
    slot order better (R-precision 0.12 against 0.02, nc7, 2 x 200 phantom images). Keeping the
    surest 30% rather than all matters where few pairs are right: nc47, R-precision 8% against 0%
    (2 x 100 phantom images); with second acquisitions at nc7 all would do better (0.20)."""
    ranked = standing(scores) if prior is None else evidence(scores, prior)
    matched = match(scores if prior is None else ranked)
    surety = ranked[np.arange(len(matched)), matched]
    keep = np.sort(np.argsort(-surety)[: max(8, int(round(fraction * len(matched))))])
    return keep, matched[keep]


def balanced(surety: np.ndarray, temperature: float, iterations: int = SINKHORN_ITERATIONS) -> np.ndarray:
    """(L, R) the log of the transport plan between uniform margins over the rows and the columns
    whose kernel is exp(``surety`` / ``temperature``) (Sinkhorn iterations, in the log domain): a
    pair scores high when it stands out of both its row and its column, as one-to-one partners do,
    and an encoding that resembles many others shares its weight among them."""
    kernel = surety / temperature
    n_left, n_right = kernel.shape
    rows, columns = np.zeros(n_left), np.zeros(n_right)
    for _ in range(iterations):
        rows = -np.log(n_left) - logsumexp(kernel + columns, axis=1)
        columns = -np.log(n_right) - logsumexp(kernel + rows[:, None], axis=0)
    return kernel + rows[:, None] + columns


def sites_to_link(release: Release, attack: str) -> list[tuple[int, int]]:
    """Every pair of ``release``'s sites, refused (for ``attack``) below two sites."""
    if release.n_sites < 2:
        raise NcbenchError(f"{release.path}: {attack} needs a release with two or more sites")
    return list(combinations(range(release.n_sites), 2))


class LinkClaims:
    """A link answer gathered one pair of sites at a time: each left encoding's ``candidates``
    best partners by the pair's surety (:func:`claims`), named by the release's ids."""

    def __init__(self, release: Release, candidates: int):
        self.release, self.candidates = release, candidates
        self.ids = release.encoded_ids
        self.left: list[str] = []
        self.right: list[str] = []
        self.scores: list[np.ndarray] = []

    def add(self, left: SiteView, right: SiteView, surety: np.ndarray) -> None:
        """The claims between two sites' encodings by ``surety`` (L, R)."""
        rows, cols, values = claims(surety, self.candidates)
        self.left += [self.ids[left.rows[r]] for r in rows]
        self.right += [self.ids[right.rows[c]] for c in cols]
        self.scores.append(values)

    def answer(self, attack: Attack, diagnostics: dict) -> Submission:
        """``attack``'s answer: every claim gathered."""
        return attack.answer(
            self.release,
            encoded_ids=self.ids,
            link_left=self.left,
            link_right=self.right,
            link_scores=np.concatenate(self.scores).astype(np.float32),
            diagnostics=diagnostics,
        )


def claims(surety: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``candidates`` best partners of each left row by ``surety`` (L, R): (rows, columns,
    sureties) flat."""
    k = min(candidates, surety.shape[1])
    cols = np.argsort(-surety, axis=1)[:, :k].ravel()
    rows = np.repeat(np.arange(len(surety)), k)
    return rows, cols, surety[rows, cols]
