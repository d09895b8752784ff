"""Reference points for every leaderboard: ``chance`` (a uniformly random answer) and ``oracle``
(reads the key: for tests and calibrating the scorer only; the leaderboard refuses it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncbench.attacks.base import Attack, param
from ncbench.attacks.submission import Submission
from ncbench.challenge.files import Release, open_key
from ncbench.errors import NcbenchError


class Chance(Attack):
    name = "chance"
    version = "1.0"
    tasks = ("reid", "transfer", "invert")
    knowledge = ("architecture",)
    description = "Uniformly random answer: a random matching, random target encodings, mean images."

    def run(self, release: Release) -> Submission:
        rng = self.rng("chance")
        submission = self.answer(release)
        if release.task == "reid":
            plain_ids = release.plain_ids
            submission.mapping = [plain_ids[j] for j in rng.permutation(len(plain_ids))[: release.n_encoded]]
        elif release.task == "transfer":
            # Random rows of the released encodings, with no link to the targets.
            rows = rng.choice(release.n_encoded, size=len(release.target_ids), replace=True)
            submission.encodings = release.encoded_rows(rows).mean(axis=1)
            submission.target_ids = release.target_ids
        else:
            mean_image = release.plain_images.mean(axis=0)
            submission.reconstructions = np.broadcast_to(mean_image, (release.n_encoded, *mean_image.shape)).astype(
                np.float32
            )
        return submission


class Oracle(Attack):
    name = "oracle"
    version = "1.0"
    tasks = ("reid", "transfer", "invert")
    knowledge = ("key",)
    description = "Reads the private key: the perfect answer, for tests and scorer calibration only."

    @dataclass
    class Params:
        key: str = param("", "path of the private key.h5 (required)")

    def run(self, release: Release) -> Submission:
        if not self.params.key:
            raise NcbenchError("the oracle needs --param key=PATH/TO/key.h5")
        submission = self.answer(release)
        with open_key(self.params.key) as key:
            if key.challenge_id != release.challenge_id:
                raise NcbenchError(f"key is for {key.challenge_id}, release is {release.challenge_id}")
            submission.patch_positions = key.read("truth/patch_perm").astype(np.int16)
            if release.task == "reid":
                plain_ids = release.plain_ids
                submission.mapping = [plain_ids[j] for j in key.read("truth/plain_index")]
            elif release.task == "transfer":
                submission.encodings = key.read("truth/target_encodings").astype(np.float32)
                submission.target_ids = release.target_ids
            else:
                submission.reconstructions = key.read("truth/images")
        return submission
