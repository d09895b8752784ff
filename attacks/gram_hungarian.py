"""``gram-hungarian``: re-identify NeuraCrypt encodings by Gram statistics and assignment solvers.

Carlini et al. (2021) broke the challenge with learned patch similarity networks; here plain
statistics suffice (:mod:`attacks.pairing` has the steps): undo the shuffles by assignment (beyond 8
blocks blind to the direction along which a patch's content moves its row in every slot), match
Gram statistics of the encodings with those of the plaintexts under a self-sampled key, boost.
Where repeated patches give exact pairs (:mod:`attacks.duplicates`), they start the boosting; at
depth (full width, more than 8 blocks) they start, instead of any Gram statistics, a comparison of
each slot's first principal component with a function of each plaintext patch's mean and spread,
fitted on those pairs and then on its own matching, the slots placed by the same fit; then of each
slot's 8 leading components together, whitened by the residual covariance of their fit; where
boosting stalls on narrower keys, the same comparison starts from the boosted matching.
From 10,000 encodings, thumbnails decoded with the matching's own pairs re-match the encodings
(:mod:`attacks.decoding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.decoding import DECODE_FROM, DECODE_PAIRS
from ncbench.attacks.pairing import (
    ASSIGN_MAX,
    BOOST_ROUNDS,
    CANDIDATES,
    HELD_MAX,
    REFINE_PAIRS,
    SCORES_MAX,
    gram_pairing,
)
from ncbench.attacks.submission import Submission
from ncbench.challenge.files import Release


class GramHungarian(Attack):
    name = "gram-hungarian"
    version = "2.8"
    tasks = ("reid",)
    knowledge = ("architecture", "self-sampled-keys", "plaintext-pool")
    description = "Exact pairs from repeated patches; undo shuffles, match self-keyed Gram statistics, boost."

    @dataclass
    class Params:
        self_width: int = param(
            0,
            "width of the self-sampled encoder for the plaintext pool; 0: 128 up to 8 blocks (256+ patches), else 512",
            min=0,
            max=8192,
        )
        channels: int = param(
            0,
            "encoding channels the alignment and Gram statistics use; 0: 512 up to 8 blocks (256+ patches), else all",
            min=0,
            max=8192,
        )
        boost_rounds: int = param(BOOST_ROUNDS, "most rounds of slot recovery + Gram re-matching", min=1, max=20)
        refine_pairs: int = param(REFINE_PAIRS, "pairs whose Gram matrices refine the slot order", min=1, max=100000)
        # Beyond assign_max: sampled boosting rounds and a sparse final assignment on shortlists.
        assign_max: int = param(
            ASSIGN_MAX, "N up to which matching is dense (beyond: sampled, sparse)", min=2, max=1_000_000
        )
        candidates: int = param(CANDIDATES, "plaintext candidates per encoding when sparse", min=1, max=1024)
        scores_max: int = param(SCORES_MAX, "encodings up to which the (N, M) scores are kept", min=1, max=10_000_000)
        held_max: int = param(
            HELD_MAX,
            "plaintexts up to which their Gram matrices are held when sparse (beyond: encoded again for the final scores)",
            min=1,
            max=10_000_000,
        )
        chunk: int = chunk_param()
        insider_key: str = param("", "another site's key file (`challenge site-key`) to encode the plaintexts with")
        duplicates: bool = param(True, "start from exact pairs of repeated patches (one site, up to assign_max)")
        decode_pairs: int = param(
            DECODE_PAIRS,
            "matched pairs a pixel decoder is fitted on to re-match by decoded thumbnails (0: off)",
            min=0,
            max=100_000,
        )
        decode_from: int = param(
            DECODE_FROM, "encodings from which to re-match by decoded thumbnails", min=1, max=10_000_000
        )

    def run(self, release: Release) -> Submission:
        p = self.params
        if p.insider_key:
            self.knowledge = (*type(self).knowledge, "insider-key")
        pairing = gram_pairing(
            release,
            self,
            self_width=p.self_width,
            channels=p.channels,
            boost_rounds=p.boost_rounds,
            refine_pairs=p.refine_pairs,
            chunk=p.chunk,
            insider_key=p.insider_key,
            assign_max=p.assign_max,
            candidates=p.candidates,
            scores_max=p.scores_max,
            held_max=p.held_max,
            duplicates=p.duplicates,
            decode_pairs=p.decode_pairs,
            decode_from=p.decode_from,
        )
        plain_ids = release.plain_ids
        return self.answer(
            release,
            mapping=[plain_ids[j] for j in pairing.matched],
            scores=pairing.scores,
            plain_ids=plain_ids,
            patch_positions=pairing.patch_positions.astype(np.int16),
            diagnostics={
                "mutual_best_fraction_per_round": pairing.mutual_fraction,
                "boost_attempts_set_aside": pairing.set_aside,
                "unplaced_by_shortlists": pairing.unplaced,
                "exact_pairs": pairing.exact,
                "rematched_by_decoding": pairing.rematched,
            },
        )
