"""A template attack plugin: copy this file, rename the class, fill in ``run``.

Run it without installing anything::

    ncbench attack run attacks/template.py:MeanPatchNearest --release public/release.h5 --out sub.h5

or publish it in your own package under the ``ncbench.attacks`` entry-point group::

    [project.entry-points."ncbench.attacks"]
    my-attack = "my_package.my_module:MyAttack"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncbench.assignment import match
from ncbench.attacks import Attack, Release, Submission, param
from ncbench.challenge.encoders import images_to_patches


class MeanPatchNearest(Attack):
    # What the attack is: shown by `ncbench attack list` and recorded in every submission.
    name = "template-mean-patch"
    version = "0.1"
    tasks = ("reid",)  # the base class refuses other tasks before any work is done
    knowledge = ("architecture", "plaintext-pool")  # words from attacks.submission.KNOWLEDGE
    description = "Template: match by the norm of each image's mean patch (weak on purpose)."

    # Typed parameters; `--param chunk=64` is converted and range-checked by the base class.
    @dataclass
    class Params:
        chunk: int = param(64, "images per streamed block", min=1, max=4096)

    def run(self, release: Release) -> Submission:
        # Stream the encodings: releases can be larger than memory.
        encoded_norm = np.empty(release.n_encoded)
        with self.stage("read encodings", release.n_encoded) as advance:
            for start, block in release.iter_encoded(self.params.chunk):
                encoded_norm[start : start + len(block)] = np.linalg.norm(block.mean(axis=1), axis=1)
                advance(len(block))
        plain = images_to_patches(torch.from_numpy(release.plain_images), release.config).mean(1).norm(dim=1).numpy()
        # Higher score = more likely; one-to-one matching by assignment.
        scores = -np.abs(_rank(encoded_norm)[:, None] - _rank(plain)[None, :])
        matched = match(scores)
        return self.answer(
            release,
            mapping=[release.plain_ids[j] for j in matched],
            scores=scores.astype(np.float32),
            plain_ids=release.plain_ids,
        )


def _rank(values: np.ndarray) -> np.ndarray:
    """(N,) ranks scaled to [0, 1]."""
    return np.argsort(np.argsort(values)) / max(len(values) - 1, 1)
