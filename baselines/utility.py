"""The utility baseline: how well a downstream model learns the findings from encoded images.

The downstream model is the one of the NeuraCrypt paper: a one-layer transformer encoder over
the P patch tokens with a learned CLS token and a multi-label linear head. On encodings it has
no positional embedding, so its prediction does not depend on the (secret, per-image) patch
shuffle. The non-private reference trains the same model on the raw normalised pixel patches,
with a convolutional stem over the patch grid and a learned positional embedding. Both are
scored by AUC per label on held-out images.

The token embedding is a small MLP (linear, + position for raw patches, LayerNorm, GELU,
linear), not one linear map: with a linear embedding the CLS token starts by averaging tokens,
and the average of linearly embedded raw patches forgets where each patch was, so the raw
reference stayed at chance AUC on CPU-sized runs. Even so, the raw reference (mean AUC 0.743,
seed 0) lost to models on nc3 / nc7 encodings at seed 2026, whose tokens carry NeuraCrypt's own
positional embedding: raw patches know neither where they are nor what surrounds them until
the model learns it. Since model version 3 the raw reference embeds its tokens with a
convolutional stem (two 3x3 convolutions over the 16 x 16 grid of patches: each raw token sees
its neighbours and the border) and trains :data:`RAW_EPOCHS` times as many epochs; with both it
is the best model at every seed and depth measured (benchmarks/RESULTS.md). The
encoded model is unchanged: a shuffled patch has no neighbours to convolve. Tokens are standardised per feature with
training-set statistics, since encodings of different presets differ in scale by orders of
magnitude.

Several sites (``sites`` K > 1, the paper's "multiple hospitals, using independent private
encoders, can collaborate"): the training and held-out images are each cut into K contiguous
shares, one per site, and each site encodes its share under its own key and shuffles. Per-site
models, one model on the union of every site's encodings, and one model on the same union under
one key (the upper bound of collaboration) are all scored on each site's held-out images.

Pure functions (:func:`auc`, :func:`build_model`, :func:`train_model`, :func:`predict`,
:func:`evaluate`, :func:`site_slices`, :func:`score_rows`) do the work; :func:`run_utility` is the
one entry point.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from ncbench.baselines.settings import DEFAULTS  # noqa: F401  (re-exported: the CPU-sized defaults)
from ncbench.challenge.encoders import (
    PRESETS,
    Encoder,
    derive_seed,
    images_to_patches,
    resolve_config,
    sample_permutations,
)
from ncbench.errors import NcbenchError
from ncbench.progress import progress

D_MODEL = 64
N_HEADS = 4
FEEDFORWARD = 128
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
MODEL_NAME = f"transformer-1layer-d{D_MODEL}-h{N_HEADS}-cls-mlp-embed"
MODEL_VERSION = 3  # bump when training changes, so recorded results are not mistaken for new ones
RAW_PRESET = "raw"  # the preset recorded for the reference model on plaintext patches
# The raw reference trains this many times ``epochs`` (settings ``trained_epochs``): with 8 epochs
# it lost to the nc7 model at seed 1 (0.734 against 0.768 mean AUC), with 16 it beat every
# encoded model at seeds 0 and 1 (benchmarks/RESULTS.md).
RAW_EPOCHS = 2


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula; ties count one half. NaN with one class.

    scores: (N,) floats; labels: (N,) in {0, 1} (entries < 0, unknown, are ignored).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    known = labels >= 0
    scores, positive = scores[known], labels[known] == 1
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class TokenTransformer(nn.Module):
    """MLP token embedding -> [CLS] + tokens -> 1 layer -> head.

    ``positional``: the tokens are raw patches in row-major order on a square grid; they are
    embedded by a convolutional stem over that grid (instead of a linear map per token) and get a
    learned positional embedding. Otherwise (encodings) the model is permutation-invariant.
    """

    def __init__(self, token_dim: int, n_tokens: int, n_labels: int, positional: bool):
        super().__init__()
        self.project = self.stem = self.pos = None
        if not positional:
            self.project = nn.Linear(token_dim, D_MODEL)
        else:
            # Two 3x3 convolutions over the patch grid let each token see its neighbours and,
            # through the zero padding, the image border.
            self.grid = math.isqrt(n_tokens)
            if self.grid**2 != n_tokens:
                raise NcbenchError(f"a convolutional stem needs a square patch grid, got {n_tokens} tokens")
            self.stem = nn.Sequential(
                nn.Conv2d(token_dim, D_MODEL, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(D_MODEL, D_MODEL, 3, padding=1),
            )
            # N(0, 1) like NeuraCrypt's own positional embedding: on the scale of the projected
            # patches, so position matters from the first step (std 0.02 left raw AUCs at chance).
            self.pos = nn.Parameter(torch.randn(1, n_tokens, D_MODEL))
        # Position enters before the nonlinearity, so pooled tokens can tell where content was.
        self.embed = nn.Sequential(nn.LayerNorm(D_MODEL), nn.GELU(), nn.Linear(D_MODEL, D_MODEL))
        self.cls = nn.Parameter(torch.zeros(1, 1, D_MODEL))
        nn.init.normal_(self.cls, std=0.02)
        self.layer = nn.TransformerEncoderLayer(
            D_MODEL, N_HEADS, dim_feedforward=FEEDFORWARD, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, n_labels)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, P, token_dim) float32, standardised -> embeddings (B, P, D_MODEL)."""
        if self.project is not None:
            x = self.project(tokens)
        else:  # (B, P, T) in row-major patch order -> (B, T, g, g) -> (B, P, D_MODEL)
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)
            x = self.stem(grid).flatten(2).transpose(1, 2)
        if self.pos is not None:
            x = x + self.pos
        return self.embed(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, P, token_dim) float32, standardised -> logits (B, K)."""
        x = self.embed_tokens(tokens)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.layer(x)
        return self.head(self.norm(x[:, 0]))


def standardise(tokens: torch.Tensor, train: slice) -> torch.Tensor:
    """Per-feature z-scores of (N, P, T) ``tokens``, in place (full width is gigabytes), with the
    mean and standard deviation of ``tokens[train]`` over images and tokens."""
    mean = tokens[train].mean(dim=(0, 1))
    std = tokens[train].std(dim=(0, 1)).clamp(min=1e-6)
    return tokens.sub_(mean).div_(std)


def build_model(token_dim: int, n_tokens: int, n_labels: int, *, positional: bool, seed: int) -> TokenTransformer:
    """A freshly initialised model (deterministic in ``seed``)."""
    torch.manual_seed(derive_seed(seed, "utility-model") % (2**63))
    return TokenTransformer(token_dim, n_tokens, n_labels, positional)


def train_model(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    positional: bool,
    epochs: int,
    seed: int,
    device: str = "cpu",
    label: str = "training",
) -> TokenTransformer:
    """Train on (N, P, T) tokens and (N, K) labels in {1, 0, -1 unknown}; returns the model (eval mode)."""
    n, n_tokens, token_dim = tokens.shape
    model = build_model(token_dim, n_tokens, labels.shape[1], positional=positional, seed=seed).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    targets = labels.clamp(min=0).float()
    known = (labels >= 0).float()
    generator = torch.Generator().manual_seed(derive_seed(seed, "utility-batches"))
    model.train()
    with progress(label, epochs) as advance:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                batch = tokens[index].to(device)
                mask = known[index].to(device)
                loss = loss_fn(model(batch), targets[index].to(device))
                loss = (loss * mask).sum() / mask.sum().clamp(min=1.0)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            advance(1)
    return model.eval()


@torch.no_grad()
def predict(model: TokenTransformer, tokens: torch.Tensor, *, device: str = "cpu", batch_size: int = 128) -> np.ndarray:
    """Probabilities (N, K) for (N, P, T) tokens, model in eval mode."""
    model.eval()
    parts = [
        torch.sigmoid(model(tokens[s : s + batch_size].to(device))).cpu() for s in range(0, len(tokens), batch_size)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.head.out_features), np.float32)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, label_names) -> dict[str, float]:
    """AUC per label name."""
    return {name: auc(probabilities[:, k], labels[:, k]) for k, name in enumerate(label_names)}


def encode_images(images: np.ndarray, config, *, seed: int, device: str, site: int | None = None) -> torch.Tensor:
    """Encode with a fresh key of ``config`` (drawn from ``seed``), shuffled per image: (N, P, D).

    ``site`` k draws site k's own key and shuffles (purposes ``utility-key-site-k``,
    ``utility-permutations-site-k``); None draws the single key of a one-key run.
    """
    suffix = "" if site is None else f"-site-{site}"
    encoder = Encoder.from_seed(config, derive_seed(seed, f"utility-key{suffix}"), device)
    perms = sample_permutations(config, seed, len(images), purpose=f"utility-permutations{suffix}")
    # Filled batch by batch: at full width the tokens of 1,600 images are 3.4 GB, so no second copy.
    tokens = torch.empty((len(images), config.n_patches, config.width), dtype=torch.float32)
    for start, encoded in encoder.encode_stream(images, perms):
        tokens[start : start + len(encoded)] = encoded
        del encoded
    return tokens


def site_slices(n: int, sites: int, *, offset: int = 0) -> list[slice]:
    """``sites`` contiguous shares of the rows ``offset`` .. ``offset + n``, in order; share sizes
    differ by at most one (site k holds rows ``offset + n*k//sites`` up to ``offset + n*(k+1)//sites``)."""
    edges = [offset + n * k // sites for k in range(sites + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def encode_sites(
    images: np.ndarray, config, train_sites: list[slice], test_sites: list[slice], *, seed: int, device: str
) -> torch.Tensor:
    """(N, P, D) encodings of the (N, S, S) ``images``, site k's rows (``train_sites[k]`` and
    ``test_sites[k]``) under site k's own key and shuffles (:func:`encode_images`), each site
    standardised with its own training statistics.

    Per-site statistics because keys differ in scale and a hospital can compute its own
    statistics locally, without sharing anything; statistics pooled over the union would let the
    site whose key has the largest scale set everyone's.
    """
    tokens = torch.empty((len(images), config.n_patches, config.width), dtype=torch.float32)
    for site, (train, test) in enumerate(zip(train_sites, test_sites)):
        n_train = train.stop - train.start
        local = encode_images(
            np.concatenate([images[train], images[test]]), config, seed=seed, device=device, site=site
        )
        standardise(local, slice(0, n_train))
        tokens[train], tokens[test] = local[:n_train], local[n_train:]
        del local
    return tokens


def fit_predict(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    train: slice,
    test: slice,
    *,
    positional: bool,
    epochs: int,
    seed: int,
    device: str,
    label: str,
) -> np.ndarray:
    """Train on ``tokens[train]`` (standardised (N, P, T)) and return probabilities (len(test), K)
    for ``tokens[test]``."""
    model = train_model(
        tokens[train], labels[train], positional=positional, epochs=epochs, seed=seed, device=device, label=label
    )
    return predict(model, tokens[test], device=device)


def score_rows(
    probabilities: np.ndarray,
    truth: np.ndarray,
    label_names,
    *,
    preset: str,
    kind: str,
    settings: dict,
    sites: dict[int, slice] | None = None,
) -> list[dict]:
    """Rows {preset, label, auc, model_kind, settings} of one model: AUC per label of its (M, K)
    ``probabilities`` against the (M, K) ``truth``; with ``sites`` ({k: rows of site k among the
    M}) one set of rows per site, whose settings add ``eval_site`` k."""
    parts = {None: slice(None)} if sites is None else sites
    rows = []
    for site, part in parts.items():
        scores = evaluate(probabilities[part], truth[part], label_names)
        shown = settings if site is None else {**settings, "eval_site": site}
        rows += [
            {"preset": preset, "label": name, "auc": value, "model_kind": kind, "settings": shown}
            for name, value in scores.items()
        ]
    return rows


def depth_preset(preset: str, depth: int | None) -> str:
    """The name a utility row gives ``preset`` with its private blocks overridden to ``depth``:
    the preset's own name when the override changes nothing (None, or its own depth), else
    ``nc7-depth16``, so the board never files another depth's AUC under a named preset."""
    return preset if depth is None or depth == PRESETS[preset].depth else f"{preset}-depth{depth}"


def run_utility(
    *,
    presets: tuple[str, ...] | list[str],
    n_train: int,
    n_test: int,
    width: int,
    image_size: int,
    patch_size: int,
    epochs: int,
    seed: int,
    device: str,
    raw: bool = True,
    source: str = "phantom",
    sites: int = 1,
    depth: int | None = None,
    one_key: bool = True,
) -> list[dict]:
    """Train and score the downstream model on each preset's encodings of labelled images, and
    (``raw``) once on the plaintext patches as the non-private reference.

    ``source`` is any image source with labels: ``phantom`` (default) or a user's labelled
    ``folder:PATH?labels=CSV`` / ``manifest:FILE``; the first ``n_train`` images train, the
    next ``n_test`` are held out.

    Returns one row per (model, label): {preset, label, auc, model_kind, settings}; the
    reference's rows have preset ``RAW_PRESET`` and model_kind ``raw``. ``depth`` overrides the
    number of private blocks of every preset (meant for the mixing, shuffling presets nc3 / nc7 /
    nc47); then encoded rows name the preset as :func:`depth_preset` does and their settings
    carry ``depth``.

    ``sites`` K > 1 cuts the training and the held-out images each into K contiguous shares
    (:func:`site_slices`), site k's under its own key (:func:`encode_sites`), and returns one row
    per (model, evaluated site, label), always AUC on one site's held-out images. Their settings
    add ``sites`` (K), ``eval_site`` (k, 0-based) and ``training``: ``site`` (model_kind
    ``encoded``, trained on site k's training encodings only), ``union`` (``encoded``, one model
    trained on every site's training encodings, each under its site's key: the paper's
    collaboration), ``one-key`` (``encoded``, the same images all under one key, the model of a
    single-site run: the upper bound of collaboration) or ``raw`` (model_kind ``raw``, the same
    images as plaintext patches). ``one_key`` False skips the one-key model (a third of a
    multi-site run's training, when only per-site against union is measured). Means over sites are left to the reader
    (``leaderboard.tables.multi_site_table``). With K = 1 rows carry none of these keys and mean
    what they always meant.
    """
    from ncbench.challenge.sources import load_images

    for name, value in (("n_train", n_train), ("n_test", n_test), ("epochs", epochs), ("sites", sites)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NcbenchError(f"{name} must be a positive integer, got {value!r}")
    if sites > min(n_train, n_test):
        raise NcbenchError(
            f"{sites} sites need at least {sites} training and {sites} test images, got {n_train} and {n_test}; "
            "raise --n-train / --n-test or lower --sites"
        )
    # auto: bf16 only where the device multiplies it natively; settings record the resolved value.
    configs = {
        preset: resolve_config(
            preset,
            width=width,
            image_size=image_size,
            patch_size=patch_size,
            bn_batch=min(256, n_train + n_test),
            precision="auto",
            depth=depth,
        ).for_device(device)
        for preset in presets
    }
    data = load_images(source, n=n_train + n_test, seed=seed, image_size=image_size)
    if not data.label_names:
        raise NcbenchError(f"source {source!r} has no labels; use phantom or a folder with a labels CSV")
    labels = torch.from_numpy(data.labels.astype(np.int64))
    train, test = slice(0, n_train), slice(n_train, n_train + n_test)
    train_sites, test_sites = site_slices(n_train, sites), site_slices(n_test, sites, offset=n_train)
    for site, site_test in enumerate(test_sites):
        for k, name in enumerate(data.label_names):
            column = data.labels[site_test, k]
            if not ((column == 1).any() and (column == 0).any()):
                if sites == 1:
                    raise NcbenchError(f"the test set has one class only for label {name!r}; raise --n-test")
                raise NcbenchError(
                    f"site {site}'s test set ({len(column)} images) has one class only for label {name!r}; "
                    "raise --n-test or lower --sites"
                )

    runs = [(depth_preset(preset, depth), "encoded", config) for preset, config in configs.items()]
    if raw:
        runs.append((RAW_PRESET, "raw", resolve_config("linear", image_size=image_size, patch_size=patch_size)))
    fit = {"epochs": epochs, "seed": seed, "device": device}
    # Held-out rows of each site, counted from the first held-out image (what a union model predicts).
    evaluated = {site: slice(part.start - n_train, part.stop - n_train) for site, part in enumerate(test_sites)}
    rows: list[dict] = []
    for preset, kind, config in runs:
        settings = {
            "preset": preset,
            "n_train": n_train,
            "n_test": n_test,
            "width": width,
            "image_size": image_size,
            "patch_size": patch_size,
            "epochs": epochs,
            "seed": seed,
            "precision": config.precision if kind == "encoded" else "fp32",
            "device": device,
            "source": source,
            "model": MODEL_NAME,
            "model_version": MODEL_VERSION,
            # Training's float sums depend on the thread count, and the AUCs with them (the demo's
            # one-thread nc3 model: 0.681 mean AUC, the same settings on two threads: 0.659).
            "threads": torch.get_num_threads(),
        }
        if kind == "raw":
            settings["trained_epochs"] = RAW_EPOCHS * epochs
        if kind == "encoded" and depth is not None:
            settings["depth"] = depth  # marks a run of a depth sweep (benchmarks/depth.py, the board's depth page)
        if kind == "encoded" and sites > 1:
            tokens = encode_sites(data.images, config, train_sites, test_sites, seed=seed, device=device)
            # (name, training, rows trained on, rows scored, scored rows of each site among them)
            models = [
                (f"site {k}", "site", site_train, site_test, {k: slice(None)})
                for k, (site_train, site_test) in enumerate(zip(train_sites, test_sites))
            ]
            models.append((f"union of {sites} keys", "union", train, test, evaluated))
            for name, training, fit_rows, scored_rows, scored_sites in models:
                label = f"utility {preset} {name}"
                probabilities = fit_predict(tokens, labels, fit_rows, scored_rows, positional=False, label=label, **fit)
                rows += score_rows(
                    probabilities,
                    data.labels[scored_rows],
                    data.label_names,
                    preset=preset,
                    kind=kind,
                    settings={**settings, "sites": sites, "training": training},
                    sites=scored_sites,
                )
            del tokens
            if not one_key:
                continue
        if kind == "raw":
            tokens = images_to_patches(torch.from_numpy(data.images), config)
        else:
            tokens = encode_images(data.images, config, seed=seed, device=device)
        tokens = standardise(tokens, train)
        label = f"utility {preset}" + (" one key" if kind == "encoded" and sites > 1 else "")
        if kind == "raw":
            probabilities = fit_predict(
                tokens, labels, train, test, positional=True, label=label, **{**fit, "epochs": RAW_EPOCHS * epochs}
            )
        else:
            probabilities = fit_predict(tokens, labels, train, test, positional=False, label=label, **fit)
        del tokens  # before the next preset's tokens are made: one set in memory at a time
        if sites > 1:
            settings = {**settings, "sites": sites, "training": "raw" if kind == "raw" else "one-key"}
        rows += score_rows(
            probabilities,
            data.labels[test],
            data.label_names,
            preset=preset,
            kind=kind,
            settings=settings,
            sites=evaluated if sites > 1 else None,
        )
    return rows
