"""Exact pairs from repeated patches: identical plaintext patches at one position encode to
identical rows, at any depth.

NeuraCrypt's blocks see one patch at a time, and the shared positional embedding is added after
them (docs/tasks.md#encoder), so two images of one BatchNorm batch with the same patch at the same
position get bit-identical encoded rows, whatever the key. Radiographs have such patches
(saturated or black regions). The encodings show how many rows two images of one batch share;
the plaintext pool shows how many (position, patch) pairs two plaintexts share; under the unknown
pairing the first is the second restricted to pairs inside a batch (across batches the same patch
encodes to nearby but different rows, often no nearer than another patch). Constraint propagation
on those counts names the images only one plaintext can be (:func:`exact_pairs`): exact pairs
without the key, the anchors of :func:`attacks.pairing.anchored_scores`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

_HASH_SEED = 0x6E63_6265_6E63_6821  # fixed: a hash collision only costs the attack a pair


def row_hashes(rows: torch.Tensor) -> np.ndarray:
    """(..., 2) int64 hashes of each row of ``rows`` (..., D) by its bytes: equal rows, equal
    hashes; two random 64-bit linear hashes, so unequal rows collide with probability ~2^-64."""
    words = rows.contiguous().view(torch.uint8)
    pad = (-words.shape[-1]) % 8
    if pad:
        words = torch.nn.functional.pad(words, (0, pad))
    words = words.view(torch.int64)
    generator = torch.Generator().manual_seed(_HASH_SEED)
    multipliers = torch.randint(-(2**62), 2**62, (2, words.shape[-1]), generator=generator) * 2 + 1
    return torch.stack([(words * m).sum(-1) for m in multipliers], -1).numpy()


def shared_groups(hashes: np.ndarray) -> list[np.ndarray]:
    """Groups of two or more images sharing a row: hashes (N, P, 2) of each image's rows (or of
    each plaintext's (position, patch)). Returns one (k,) array of images per group; a group that
    holds one image twice (a collision, or a crafted file) is dropped."""
    n, p = hashes.shape[:2]
    _, inverse, counts = np.unique(hashes.reshape(n * p, 2), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    shared = np.flatnonzero(counts[inverse] > 1)
    order = shared[np.argsort(inverse[shared], kind="stable")]
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    groups = [members // p for members in np.split(order, bounds)] if len(order) else []
    return [g for g in groups if len(np.unique(g)) == len(g)]


def patch_hashes(images: np.ndarray, patch_size: int) -> np.ndarray:
    """(M, P, 2) hashes of each plaintext's (position, patch content)."""
    m, side = images.shape[0], images.shape[1] // patch_size
    patches = images.reshape(m, side, patch_size, side, patch_size).transpose(0, 1, 3, 2, 4)
    patches = torch.from_numpy(np.ascontiguousarray(patches).reshape(m, side * side, patch_size**2))
    position = torch.arange(side * side, dtype=torch.int64).view(torch.uint8).reshape(side * side, 8)
    return row_hashes(torch.cat([patches, position.expand(m, -1, -1)], -1))


def exact_pairs(
    left_groups: list[np.ndarray], right_groups: list[np.ndarray], n_left: int, n_right: int, *, rounds: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns): the left items (encodings) that only one right item (plaintext) can be.

    Two encodings of one batch share as many rows as their plaintexts share (position, patch)
    pairs, and encodings of two batches share none; so under the pairing, the left graph of shared
    counts is the right one's restriction to the pairs inside each batch. A right item is a
    candidate for a left one while it has, at every count, at least as many neighbours; arc
    consistency then keeps a candidate only if, for each left neighbour at count w, it has a
    neighbour at count w among that neighbour's candidates; a left item down to one candidate takes
    it from everyone else. Rounds stop when nothing changes. A left item without candidates, or
    two that need the same one, mean the structures disagree (a hash collision, or a file that is
    not what it claims): then no pairs at all.
    """
    none = (np.empty(0, np.int64), np.empty(0, np.int64))
    if not left_groups or not right_groups:
        return none
    left, right = _shared_counts(left_groups, n_left), _shared_counts(right_groups, n_right)
    counts = np.unique(left.data)
    candidates = np.ones((n_left, n_right), bool)
    for w in counts:
        candidates &= _neighbours_at(left, w)[:, None] <= _neighbours_at(right, w)[None, :]
    sources, targets = left.nonzero()
    weights = np.asarray(left[sources, targets]).ravel()
    at_count = {w: (right == w).astype(np.float32).tocsr() for w in counts}
    for _ in range(rounds):
        before = candidates.sum()
        for w, right_at_w in at_count.items():
            edges = np.flatnonzero(weights == w)
            for chunk in np.array_split(edges, -(-len(edges) // _EDGES_PER_PRODUCT)):
                # supported[e, m]: m has a neighbour at count w among the candidates of targets[e]
                supported = (right_at_w @ candidates[targets[chunk]].T.astype(np.float32)).T > 0
                _and_rows(candidates, sources[chunk], supported)
        single = np.flatnonzero(candidates.sum(1) == 1)
        taken = candidates[single].argmax(1)
        if len(np.unique(taken)) < len(taken):
            return none
        keep = candidates[single]
        candidates[:, taken] = False
        candidates[single] = keep
        if not candidates.any(1).all():
            return none
        if candidates.sum() == before:
            break
    rows = np.flatnonzero(candidates.sum(1) == 1)
    return rows, candidates[rows].argmax(1)


# Edges whose candidate rows are multiplied at once: (right items x this) float32 per product.
_EDGES_PER_PRODUCT = 4096


def _shared_counts(groups: list[np.ndarray], n: int) -> sparse.csr_matrix:
    """(n, n) int32: how many groups hold both items (zero diagonal)."""
    members = np.concatenate(groups)
    group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    incidence = sparse.csr_matrix((np.ones(len(members), np.int32), (members, group)), shape=(n, len(groups)))
    shared = (incidence @ incidence.T).tocsr()
    shared.setdiag(0)
    shared.eliminate_zeros()
    return shared


def _neighbours_at(shared: sparse.csr_matrix, w: int) -> np.ndarray:
    """(n,) how many neighbours each item has at shared count ``w``."""
    return np.asarray((shared == w).sum(1)).ravel()


def _and_rows(candidates: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """candidates[rows[e]] &= values[e] for every e (rows may repeat)."""
    order = np.argsort(rows, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]
    candidates[rows[order[starts]]] &= np.minimum.reduceat(values[order].view(np.uint8), starts, axis=0).astype(bool)
