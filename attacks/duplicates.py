"""Exact pairs from repeated patches: identical plaintext patches at one position encode to
identical rows, at any depth.

NeuraCrypt's blocks see one patch at a time, and the shared positional embedding is added after
them (docs/tasks.md#encoder), so two images of one BatchNorm batch with the same patch at the same
position get bit-identical encoded rows, whatever the key. Radiographs have such patches
(saturated or black regions). The encodings show which images share a row; the plaintext pool
shows which images share a patch at a position; through the unknown pairing the two structures are
the same. Colour refinement (one-dimensional Weisfeiler-Leman) on both at once names every image
whose pattern of shared patches is unique: exact pairs without the key, and the anchors of
:func:`attacks.pairing.anchored_scores`.

Only a release of one BatchNorm batch is paired this way: across batches the same patch encodes to
nearby but different rows, so the encodings show each batch's share of a repeated patch, and the
plaintext pool does not say which plaintexts were encoded together.
"""

from __future__ import annotations

import numpy as np
import torch

_HASH_SEED = 0x6E63_6265_6E63_6821  # fixed: a hash collision only costs the attack a pair
_MIX = np.uint64(0x9E37_79B9_7F4A_7C15)


def row_hashes(rows: torch.Tensor) -> np.ndarray:
    """(..., 2) int64 hashes of each row of ``rows`` (..., D) by its bytes: equal rows, equal
    hashes; two random 64-bit linear hashes, so unequal rows collide with probability ~2^-64."""
    raw = rows.contiguous()
    words = raw.view(torch.uint8).flatten(-1)
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
    left_groups: list[np.ndarray], right_groups: list[np.ndarray], n_left: int, n_right: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns): the left items (encodings) and right items (plaintexts) whose colour after
    joint colour refinement of the two group structures is held by exactly one item on each side.

    Items start with one colour, groups with their size; each round an item's colour becomes a
    hash of its own and of the multiset of its groups' colours, a group's of its own and its
    items'; rounds stop when the colours stop splitting. Equal colours mean equal refined
    structure, so a colour unique on both sides names one pair."""
    if not left_groups or not right_groups:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    sides = [_incidence(left_groups, n_left), _incidence(right_groups, n_right)]
    item_colours = [np.zeros(n, np.int64) for n in (n_left, n_right)]
    group_colours = [np.array([len(g) for g in groups], np.int64) for groups in (left_groups, right_groups)]
    distinct = 0
    for _ in range(n_left + n_right):
        items = [
            _refine(item_colours[k], group_colours[k], sides[k][1], sides[k][0], len(item_colours[k])) for k in (0, 1)
        ]
        item_colours = _relabel(items)
        groups = [
            _refine(group_colours[k], item_colours[k], sides[k][0], sides[k][1], len(group_colours[k])) for k in (0, 1)
        ]
        group_colours = _relabel(groups)
        now = len(np.unique(np.concatenate(item_colours))) + len(np.unique(np.concatenate(group_colours)))
        if now == distinct:
            break
        distinct = now
    left, right = item_colours
    size = max(left.max(), right.max()) + 1
    left_count, right_count = np.bincount(left, minlength=size), np.bincount(right, minlength=size)
    rows = np.flatnonzero((left_count[left] == 1) & (right_count[left] == 1))
    # A left item in a group is never paired with a right item in none (and vice versa): colour 0
    # of the untouched items is never unique unless one item is left out on each side.
    in_group = np.zeros(n_left, bool)
    in_group[sides[0][1]] = True
    rows = rows[in_group[rows]]
    position = {colour: j for j, colour in enumerate(right)}
    return rows, np.array([position[c] for c in left[rows]], np.int64)


def _incidence(groups: list[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(group of each membership, item of each membership)."""
    return np.repeat(np.arange(len(groups)), [len(g) for g in groups]), np.concatenate(groups).astype(np.int64)


def _refine(own: np.ndarray, other: np.ndarray, own_index: np.ndarray, other_index: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) signature of each element: its colour, and the wrapped sum of a mixed hash of its
    neighbours' colours (a multiset hash)."""
    with np.errstate(over="ignore"):
        mixed = _splitmix(other[other_index].astype(np.uint64))
        total = np.zeros(n, np.uint64)
        np.add.at(total, own_index, mixed)
    return np.stack([own, total.view(np.int64)], 1)


def _relabel(signatures: list[np.ndarray]) -> list[np.ndarray]:
    """Dense colours shared by both sides: equal signatures, equal colour."""
    _, inverse = np.unique(np.concatenate(signatures), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    return [inverse[: len(signatures[0])], inverse[len(signatures[0]) :]]


def _splitmix(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
        return z ^ (z >> np.uint64(31))
