"""Score a submission against a challenge's private key (docs/tasks.md#scoring-rules).

Everything about the submission is validated before any metric is computed; each problem is one
:class:`NcbenchError` line. Metrics are computed separately on the public (split 0) and private
(split 1) scoring halves recorded in the key. Nothing here touches the results database.

Nothing is trusted but the key. The release must be the file the key was issued with (its sha256
is in the key). The submission is hostile until checked: its size, layout and declared shapes are
checked against limits derived from the challenge before any of it is read, and only the parts
the task uses are read (:func:`submission_limits`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncbench.assignment import match
from ncbench.attacks.submission import ID_BYTES, KNOWLEDGE, ReadLimits, Submission, read_submission
from ncbench.challenge.files import Key, Release, ReleaseLayout, key_file, open_key, open_release, release_file
from ncbench.errors import NcbenchError
from ncbench.h5io import sha256_file
from ncbench.leaderboard import metrics
from ncbench.leaderboard.metrics import HEADLINE_METRIC
from ncbench.progress import progress

REQUIRED_PARTS = {
    "reid": ("mapping", "scores"),
    "transfer": ("encodings",),
    "invert": ("reconstructions",),
    "link": ("link_scores",),
}
USED_PARTS = {
    "reid": {"mapping", "scores", "patch_positions"},
    "transfer": {"encodings", "patch_positions"},
    "invert": {"reconstructions", "patch_positions"},
    "link": {"link_scores"},
}
# The ids that name the rows or columns of a part come with it.
COMPANION_IDS = {"scores": ("plain_ids",), "encodings": ("target_ids",), "link_scores": ("link_left", "link_right")}
LINK_CLAIMS_PER_ENCODING = 16  # link: a submission claims at most 16 N pairs
# A submission file may be this many times the size of every part at its largest (8-byte items),
# plus a floor for attributes and chunk indexes: gzip never grows data by more than a few bytes.
FILE_SLACK = 2
FILE_FLOOR_BYTES = 64 << 20
REFUSED_ATTACKS = ("oracle",)  # baselines that read the key: calibration only
REFUSED_KNOWLEDGE = ("key",)
_SHOWN = 3  # ids quoted in an error message before "..."


@dataclass(frozen=True)
class ChallengeInfo:
    """The public facts of a challenge that the results store keeps beside its scores."""

    challenge_id: str
    task: str
    preset: str
    n_encoded: int
    key_commitment: str
    encoder_config: str  # JSON of the resolved encoder configuration
    test_release: bool = False  # built from a guessable seed: its key is public
    n_sites: int = 1  # hospitals, each with its own key

    @classmethod
    def from_release(cls, release: Release) -> ChallengeInfo:
        attrs = release.h5.attrs
        return cls(
            challenge_id=release.challenge_id,
            task=release.task,
            preset=str(attrs.get("preset", release.config.preset)),
            n_encoded=release.n_encoded,
            key_commitment=str(attrs["key_commitment"]),
            encoder_config=str(attrs["encoder_config"]),
            test_release=release.test_release,
            n_sites=release.n_sites,
        )


@dataclass
class ScoreResult:
    """What scoring one submission found: the challenge, the attack, and metrics per split.

    ``metrics[split][name]``: split 0 = public half, 1 = private half; values are floats
    (``inf`` for an effective k-anonymity at zero accuracy, ``nan`` for a half with no items).
    ``notes``: findings that did not reject the submission (e.g. a mapping that is not
    one-to-one).
    """

    challenge: ChallengeInfo
    attack: str
    attack_version: str
    params: dict
    knowledge: tuple[str, ...]
    runtime_s: float
    sha256: str
    metrics: dict[int, dict[str, float]]
    notes: list[str] = field(default_factory=list)

    @property
    def headline_metric(self) -> str:
        return HEADLINE_METRIC[self.challenge.task]

    def headline(self, split: int = 0) -> float:
        return self.metrics[split][self.headline_metric]


def score_submission(
    submission_path: str | os.PathLike, key_path: str | os.PathLike, release_path: str | os.PathLike | None = None
) -> ScoreResult:
    """Validate ``submission_path`` against the key and compute its metrics on both halves.

    ``key_path``: ``private/key.h5`` or the release directory; the release is found beside it
    (``<dir>/public/release.h5``) unless ``release_path`` is given.
    """
    submission_path = Path(submission_path)
    key_path, release_path = locate_release(key_path, release_path)
    with open_key(key_path) as key:
        check_release_digest(key, release_path)
        with open_release(release_path) as release:
            return _score(submission_path, key, release)


def _score(submission_path: Path, key: Key, release: Release) -> ScoreResult:
    check_key_matches_release(key, release)
    if not submission_path.is_file():
        raise NcbenchError(f"{submission_path}: no such file")
    submission = load_submission(submission_path, release.challenge_id, submission_limits(release))
    digest = sha256_file(submission_path)  # after the size check: a huge file is never hashed
    check_identity(submission, release, submission_path)
    try:
        answer = validate_answer(submission, release)
    except NcbenchError as error:
        raise NcbenchError(f"{submission_path}: {error}") from None
    with progress(f"scoring {release.challenge_id}", 1) as advance:
        values, notes = compute_metrics(answer, release, key)
        advance(1)
    return ScoreResult(
        challenge=ChallengeInfo.from_release(release),
        attack=submission.attack,
        attack_version=submission.attack_version,
        params=submission.params,
        knowledge=tuple(submission.knowledge),
        runtime_s=float(submission.runtime_s),
        sha256=digest,
        metrics=values,
        notes=answer.notes + notes,
    )


def locate_release(key_path: str | os.PathLike, release_path: str | os.PathLike | None) -> tuple[Path, Path]:
    """(key file, release file): the release defaults to ``<dir>/public/release.h5`` beside the key."""
    key_path = key_file(key_path)
    if not key_path.is_file():
        raise NcbenchError(f"{key_path}: no such key file")
    if release_path is not None:
        return key_path, release_file(release_path)
    beside = ReleaseLayout.of_key(key_path).release
    if not beside.is_file():
        raise NcbenchError(f"no release found beside the key (looked for {beside}); pass --release")
    return key_path, beside


def check_release_digest(key: Key, release_path: Path) -> None:
    """The release must be, byte for byte, the file the key was issued with: the key records its
    sha256 (``release_sha256``). Checked before the release is opened, so nothing in a tampered
    release (a swapped id, a changed preset, an added dataset or link) is ever read."""
    recorded = key.h5.attrs.get("release_sha256")
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise NcbenchError(f"{key.path}: the key records no release sha256, so no release can be checked against it")
    if not release_path.is_file():
        raise NcbenchError(f"{release_path}: no such release file")
    if sha256_file(release_path) != recorded:
        raise NcbenchError(
            f"{release_path} is not the release this key was issued with (its sha256 differs from the key's record)"
        )


def check_key_matches_release(key: Key, release: Release) -> None:
    """The key must belong to the release: same challenge id, and its commitment as published."""
    if key.challenge_id != release.challenge_id:
        raise NcbenchError(
            f"{key.path} is the key of challenge {key.challenge_id!r}, "
            f"but {release.path} is challenge {release.challenge_id!r}"
        )
    if key.commitment() != str(release.h5.attrs["key_commitment"]):
        raise NcbenchError(
            f"{key.path}: the key's commitment does not match the one published in "
            f"{release.path} (wrong or tampered key)"
        )


def submission_limits(release: Release) -> ReadLimits:
    """What a submission to ``release`` may hold, from the challenge's N, M, T, P, D and S.

    Each part may declare at most its legitimate shape at 8 bytes an item (float64 or int64),
    each id :data:`ID_BYTES`; only the parts the task uses (and their ids) are read. The file may
    be :data:`FILE_SLACK` times every part together, plus :data:`FILE_FLOOR_BYTES`.
    """
    config, h5 = release.config, release.h5
    n, p, d, s = release.n_encoded, config.n_patches, config.width, config.image_size
    m = int(h5["plain/ids"].shape[0]) if "plain/ids" in h5 else 0
    t = int(h5["target/ids"].shape[0]) if "target/ids" in h5 else 0
    part_bytes = {
        "encoded_ids": n * ID_BYTES,
        "mapping": n * ID_BYTES,
        "plain_ids": m * ID_BYTES,
        "target_ids": t * ID_BYTES,
        "scores": n * m * 8,
        "patch_positions": n * p * 8,
        "reconstructions": n * s * s * 8,
        "encodings": t * p * d * 8,
        "link_left": LINK_CLAIMS_PER_ENCODING * n * ID_BYTES,
        "link_right": LINK_CLAIMS_PER_ENCODING * n * ID_BYTES,
        "link_scores": LINK_CLAIMS_PER_ENCODING * n * 8,
    }
    used = USED_PARTS[release.task]
    readable = {"encoded_ids", *used, *(ids for part in used for ids in COMPANION_IDS.get(part, ()))}
    return ReadLimits(
        file_bytes=FILE_FLOOR_BYTES + FILE_SLACK * sum(part_bytes.values()),
        part_bytes=part_bytes,
        read=frozenset(readable),
        csv_rows=n,
    )


def load_submission(path: Path, challenge_id: str, limits: ReadLimits | None = None) -> Submission:
    """Read a submission file within ``limits``; anything unreadable becomes one NcbenchError line."""
    try:
        return read_submission(path, challenge_id=challenge_id, limits=limits)
    except NcbenchError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeError, RuntimeError) as error:
        raise NcbenchError(f"{path}: unreadable submission ({type(error).__name__}: {error})") from None


def check_identity(submission: Submission, release: Release, path: Path) -> None:
    """Attributes: the right challenge, sane params / knowledge / runtime, and no key-reading attack."""
    if not isinstance(submission.params, dict):
        raise NcbenchError(f"{path}: attribute 'params' must be a JSON object")
    knowledge = submission.knowledge
    if not all(isinstance(item, str) for item in knowledge):
        raise NcbenchError(f"{path}: attribute 'knowledge' must be a JSON list of strings")
    if unknown := sorted(set(knowledge) - set(KNOWLEDGE)):
        raise NcbenchError(f"{path}: unknown knowledge {_quote(unknown)}; the vocabulary is {', '.join(KNOWLEDGE)}")
    if submission.attack.strip().lower() in REFUSED_ATTACKS or any(k in REFUSED_KNOWLEDGE for k in knowledge):
        raise NcbenchError(
            f"{path}: attack {submission.attack!r} reads the secret key; key-reading "
            f"baselines are for calibration only and are not accepted by the leaderboard"
        )
    if not submission.attack.strip():
        raise NcbenchError(f"{path}: attribute 'attack' is empty")
    if not (math.isfinite(submission.runtime_s) and submission.runtime_s >= 0):
        raise NcbenchError(
            f"{path}: runtime_s must be a finite, non-negative number of seconds, got {submission.runtime_s}"
        )
    if submission.challenge_id != release.challenge_id:
        raise NcbenchError(
            f"{path}: submission is for challenge {submission.challenge_id!r}, "
            f"but the key is for {release.challenge_id!r}"
        )


@dataclass
class Answer:
    """A validated submission, rows in release order.

    ``rows``: (R,) release row index of each answered encoding; mapping (R,) plain index;
    scores (R, M) columns in ``plain/ids`` order; patch_positions (R, P); reconstructions
    (R, H, W) float64 on 0-255; encodings (T, P, D) or (T, D) in ``target/ids`` order.
    """

    rows: np.ndarray
    mapping: np.ndarray | None = None
    scores: np.ndarray | None = None
    patch_positions: np.ndarray | None = None
    reconstructions: np.ndarray | None = None
    encodings: np.ndarray | None = None
    links: np.ndarray | None = None
    link_scores: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def validate_answer(submission: Submission, release: Release) -> Answer:
    """Check ids, shapes, dtypes and values of every part the task uses; reorder to release order."""
    task, config = release.task, release.config
    parts = set(submission.parts()) | set(submission.unread)
    needed = REQUIRED_PARTS[task]
    if not parts & set(needed):
        raise NcbenchError(
            f"the {task} task needs {' or '.join(repr(p) for p in needed)}; "
            f"this submission has {', '.join(sorted(parts)) or 'no answer'}"
        )
    notes = [f"ignored {name} (not used by the {task} task)" for name in sorted(parts - USED_PARTS[task])]
    used = parts & USED_PARTS[task]

    release_ids = release.encoded_ids
    order_in_submission = _match_ids(
        submission.encoded_ids,
        release_ids,
        what="encoded id",
        optional=set(release.pair_encoded_ids) if task == "invert" else set(),
        may_be_empty=task == "link" or (task == "transfer" and "patch_positions" not in used),
    )
    # Release rows scored, and the submission row that answers each of them. The known pairs of
    # `invert` are never scored, even when the submission answers them.
    known = set(release.pair_encoded_ids) if task == "invert" else set()
    rows = np.array(
        [r for r, s in enumerate(order_in_submission) if s >= 0 and release_ids[r] not in known], dtype=np.int64
    )
    source = np.array([order_in_submission[r] for r in rows], dtype=np.int64)
    n_sub = len(submission.encoded_ids)
    answer = Answer(rows=rows, notes=notes)

    if "mapping" in used:
        mapping = submission.mapping
        if len(mapping) != n_sub:
            raise NcbenchError(f"mapping has {len(mapping)} entries for {n_sub} encoded ids")
        plain_index = {pid: j for j, pid in enumerate(release.plain_ids)}
        unknown = sorted({pid for pid in mapping if pid not in plain_index})
        if unknown:
            raise NcbenchError(f"mapping names {len(unknown)} plaintext id(s) not in the release: {_quote(unknown)}")
        answer.mapping = np.array([plain_index[mapping[s]] for s in source], dtype=np.int64)
        repeats = metrics.duplicate_count(answer.mapping)
        if repeats:
            answer.notes.append(f"mapping is not one-to-one: {repeats} encoding(s) share a plaintext id with another")
    if "scores" in used:
        plain_ids = release.plain_ids
        scores = _numeric(submission.scores, "scores", ndim=2, kinds="fiu")
        if scores.shape[0] != n_sub:
            raise NcbenchError(f"scores has {scores.shape[0]} rows for {n_sub} encoded ids")
        if submission.plain_ids is None:
            if scores.shape[1] != len(plain_ids):
                raise NcbenchError(
                    f"scores has {scores.shape[1]} columns for {len(plain_ids)} plaintexts "
                    f"(give 'plain_ids' to name the columns)"
                )
            columns = np.arange(len(plain_ids))
        else:
            if len(submission.plain_ids) != scores.shape[1]:
                raise NcbenchError(
                    f"plain_ids has {len(submission.plain_ids)} entries for {scores.shape[1]} score columns"
                )
            columns = np.array(_match_ids(submission.plain_ids, plain_ids, what="plaintext id"))
        # Large (N, M) matrices: copy only when the rows or columns really need reordering.
        if not np.array_equal(source, np.arange(scores.shape[0])):
            scores = scores[source]
        if not np.array_equal(columns, np.arange(scores.shape[1])):
            scores = scores[:, columns]
        answer.scores = scores
    if "patch_positions" in used:
        positions = _numeric(submission.patch_positions, "patch_positions", ndim=2, kinds="iu")
        if positions.shape != (n_sub, config.n_patches):
            raise NcbenchError(f"patch_positions must be ({n_sub}, {config.n_patches}), got {positions.shape}")
        if positions.size and (positions.min() < 0 or positions.max() >= config.n_patches):
            raise NcbenchError(f"patch_positions must lie in 0..{config.n_patches - 1}")
        answer.patch_positions = positions[source].astype(np.int64)
    if "reconstructions" in used:
        images = _numeric(submission.reconstructions, "reconstructions", ndim=3, kinds="fiu")
        expected = (n_sub, config.image_size, config.image_size)
        if images.shape != expected:
            raise NcbenchError(f"reconstructions must be {expected}, got {images.shape}")
        images = images[source].astype(np.float64)
        if images.size and (images.min() < 0 or images.max() > 255):
            answer.notes.append("reconstructions outside 0-255 were clipped")
            images = np.clip(images, 0, 255)
        answer.reconstructions = images
    if "encodings" in used:
        encodings = _numeric(submission.encodings, "encodings", ndim=None, kinds="fiu")
        target_ids = release.target_ids
        shapes = ((config.n_patches, config.width), (config.width,))
        if encodings.ndim not in (2, 3) or encodings.shape[1:] not in shapes:
            raise NcbenchError(
                f"encodings must be (M, {config.n_patches}, {config.width}) or "
                f"(M, {config.width}), got {encodings.shape}"
            )
        if submission.target_ids is None:
            if len(encodings) != len(target_ids):
                raise NcbenchError(
                    f"encodings has {len(encodings)} rows for {len(target_ids)} targets "
                    f"(give 'target_ids' to name the rows)"
                )
            order = np.arange(len(target_ids))
        else:
            if len(submission.target_ids) != len(encodings):
                raise NcbenchError(
                    f"target_ids has {len(submission.target_ids)} entries for {len(encodings)} encodings"
                )
            order = _match_ids(submission.target_ids, target_ids, what="target id")
        answer.encodings = encodings[order].astype(np.float64)
    if "link_scores" in used:
        answer.links, answer.link_scores = _link_claims(submission, release, answer.notes)
    return answer


def _link_claims(submission: Submission, release: Release, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(L, 2) claimed pairs as release rows, each ordered (smaller, larger), and their (L,) scores."""
    scores = _numeric(submission.link_scores, "link_scores", ndim=1, kinds="fiu")
    left, right = submission.link_left, submission.link_right
    if left is None or right is None:
        raise NcbenchError("link_scores needs link_left and link_right (the two encoded ids of each pair)")
    if not len(left) == len(right) == len(scores):
        raise NcbenchError(
            f"link_left, link_right and link_scores must have one entry per pair, got {len(left)}, {len(right)} and {len(scores)}"
        )
    row_of = {eid: r for r, eid in enumerate(release.encoded_ids)}
    unknown = sorted({i for i in (*left, *right) if i not in row_of})
    if unknown:
        raise NcbenchError(f"{len(unknown)} unknown encoded id(s) in the pairs: {_quote(unknown)}")
    pairs = np.array([[row_of[a], row_of[b]] for a, b in zip(left, right)], np.int64).reshape(-1, 2)
    pairs.sort(axis=1)
    if (pairs[:, 0] == pairs[:, 1]).any():
        raise NcbenchError("a pair links an encoding with itself")
    cap = LINK_CLAIMS_PER_ENCODING * release.n_encoded
    if len(pairs) > cap:
        raise NcbenchError(f"{len(pairs)} pairs claimed: at most {LINK_CLAIMS_PER_ENCODING} x N = {cap}")
    if len(np.unique(pairs, axis=0)) != len(pairs):
        raise NcbenchError("a pair is claimed more than once (in either order)")
    sites = release.sites
    same_site = int((sites[pairs[:, 0]] == sites[pairs[:, 1]]).sum())
    if same_site:
        notes.append(f"{same_site} pair(s) within one site can never be true (each site holds an image once)")
    return pairs, scores.astype(np.float64)


def compute_metrics(answer: Answer, release: Release, key: Key) -> tuple[dict[int, dict[str, float]], list[str]]:
    """Metrics per split (0 public, 1 private) of a validated answer; see :mod:`leaderboard.metrics`."""
    task = release.task
    split = key.read("truth/split").astype(np.int64)
    notes: list[str] = []
    values: dict[int, dict[str, float]] = {s: {} for s in metrics.SPLIT_NAMES}
    row_split = split[answer.rows]
    with np.errstate(all="ignore"):  # absurd but finite submitted values must not abort scoring
        if task == "reid":
            truth = key.read("truth/plain_index").astype(np.int64)[answer.rows]
            n_plain = len(release.plain_ids)
            if answer.mapping is not None:
                predicted = answer.mapping
                if answer.scores is not None:
                    notes.append("reid_accuracy comes from the mapping; the scores give top-k and MRR")
            else:
                predicted = match(answer.scores)
            for s, out in values.items():
                mask = row_split == s
                out["n"] = float(mask.sum())
                out["chance"] = metrics.chance_level(n_plain)
                out["reid_accuracy"] = metrics.reid_accuracy(predicted[mask], truth[mask])
                if answer.mapping is not None:
                    out["one_to_one"] = float(metrics.duplicate_count(answer.mapping) == 0)
                if answer.scores is not None:
                    half_scores = answer.scores[mask]  # one copy of the half's rows for every score metric
                    out["top1_accuracy"] = metrics.top_k_accuracy(half_scores, truth[mask], 1)
                    out["top5_accuracy"] = metrics.top_k_accuracy(half_scores, truth[mask], 5)
                    out["mrr"] = metrics.mean_reciprocal_rank(half_scores, truth[mask])
                    rates = metrics.tpr_at_fpr(half_scores, truth[mask], list(metrics.TPR_AT_FPR.values()))
                    out.update(zip(metrics.TPR_AT_FPR, rates.tolist()))
                    del half_scores
        elif task == "invert":
            images = answer.reconstructions
            truth_images = key.read("truth/images")[answer.rows]
            # Candidates are the plaintexts of every scored encoding (the known pairs are not).
            nearest = metrics.nearest_candidates(images, truth_images)
            psnr, ssim = metrics.psnr(images, truth_images), metrics.ssim(images, truth_images)
            for s, out in values.items():
                mask = row_split == s
                out["n"] = float(mask.sum())
                out["chance"] = metrics.chance_level(len(answer.rows))
                out["reid_accuracy"] = metrics.reid_accuracy(nearest[mask], np.flatnonzero(mask))
                out["psnr"] = float(psnr[mask].mean()) if mask.any() else math.nan
                out["ssim"] = float(ssim[mask].mean()) if mask.any() else math.nan
        elif task == "link":
            _link_metrics(values, answer, release, key, split)
        else:  # transfer
            true_encodings = key.read("truth/target_encodings")
            target_split = key.read("truth/target_split").astype(np.int64)
            nearest = metrics.transfer_nearest_predictions(answer.encodings, true_encodings)
            for s, out in values.items():
                mask = target_split == s
                out["n"] = float(mask.sum())
                out["chance"] = metrics.chance_level(len(true_encodings))
                out["nn_accuracy"] = metrics.reid_accuracy(nearest[mask], np.flatnonzero(mask))
        if answer.patch_positions is not None:
            perm = key.read("truth/patch_perm").astype(np.int64)[answer.rows]
            for s, out in values.items():
                mask = row_split == s
                out["patch_position_accuracy"] = metrics.patch_position_accuracy(
                    answer.patch_positions[mask], perm[mask]
                )
    for out in values.values():
        headline = out[HEADLINE_METRIC[task]]
        out["k_anonymity"] = metrics.effective_k_anonymity(headline)
    return values, notes


def _link_metrics(values: dict, answer: Answer, release: Release, key: Key, split: np.ndarray) -> None:
    """A pair (true or claimed) counts in the half of its earlier encoding."""
    truth = np.sort(key.read("truth/link_pairs").astype(np.int64), axis=1)
    sites = release.sites
    later = len(sites) - np.searchsorted(np.sort(sites), sites, side="right")  # rows of later sites
    for s, out in values.items():
        true_half = truth[split[truth[:, 0]] == s]
        claimed = split[answer.links[:, 0]] == s
        # n and chance would tell the public half's number of true pairs: n is the half's
        # encodings, and chance (T / C) is given for the private half only, revealed at the close.
        out["n"] = float((split == s).sum())
        out["chance"] = (
            len(true_half) / max(int(later[split == s].sum()), 1) if metrics.SPLIT_NAMES[s] == "private" else math.nan
        )
        out.update(metrics.link_ranking(answer.links[claimed], answer.link_scores[claimed], true_half))


def _match_ids(
    given: list[str], expected: list[str], *, what: str, optional: set[str] = frozenset(), may_be_empty: bool = False
) -> list[int]:
    """For each expected id, its position in ``given`` (-1 for an optional id left out).

    ``given`` must hold every expected id except those in ``optional``, each once, and nothing else.
    """
    if may_be_empty and not given:
        return [-1] * len(expected)
    counts = Counter(given)
    repeated = sorted(i for i, c in counts.items() if c > 1)
    if repeated:
        raise NcbenchError(f"{len(repeated)} {what}(s) appear more than once: {_quote(repeated)}")
    known = set(expected)
    unknown = sorted(i for i in counts if i not in known)
    if unknown:
        raise NcbenchError(f"{len(unknown)} unknown {what}(s) not in the release: {_quote(unknown)}")
    missing = [i for i in expected if i not in counts and i not in optional]
    if missing:
        raise NcbenchError(f"{len(missing)} {what}(s) of the release are missing: {_quote(missing)}")
    position = {i: k for k, i in enumerate(given)}
    return [position.get(i, -1) for i in expected]


def _numeric(values: np.ndarray, name: str, *, ndim: int | None, kinds: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind not in kinds:
        wanted = "integers" if kinds == "iu" else "numbers"
        raise NcbenchError(f"{name} must hold {wanted}, found dtype {values.dtype}")
    if ndim is not None and values.ndim != ndim:
        raise NcbenchError(f"{name} must have {ndim} dimensions, got shape {values.shape}")
    if values.dtype.kind == "f":
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise NcbenchError(f"{name} holds {bad} NaN or infinite value(s)")
    return values


def _quote(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN])
    return shown + (", ..." if len(ids) > _SHOWN else "")
