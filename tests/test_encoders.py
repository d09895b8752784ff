"""The encoder against docs/tasks.md#encoder, written out layer by layer with torch.nn modules."""

import dataclasses
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from ncbench.challenge.encoders import (
    PRESETS,
    Encoder,
    encode_all,
    key_tensor_names,
    resolve_config,
    sample_key,
    sample_permutations,
)
from ncbench.errors import NcbenchError

TINY = dict(width=64, image_size=32, patch_size=8, bn_batch=6)


class ReferenceNeuraCrypt(nn.Module):
    """docs/tasks.md#encoder as the published code writes it: Conv2d stem, conv + BatchNorm blocks, pos, Linear."""

    def __init__(self, config):
        super().__init__()
        d, p = config.width, config.patch_size
        self.config = config
        self.stem = nn.Conv2d(1, d, kernel_size=p, stride=p)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d, affine=False, track_running_stats=False), nn.ReLU())
            for _ in range(config.depth)
        )
        self.pos = nn.Parameter(torch.zeros(config.n_patches, d))
        self.mix = nn.Linear(d, d)

    def load_key(self, key):
        c = self.config
        with torch.no_grad():
            self.stem.weight.copy_(key["stem.weight"].reshape(c.width, 1, c.patch_size, c.patch_size))
            self.stem.bias.copy_(key["stem.bias"])
            for k, block in enumerate(self.blocks):
                block[0].weight.copy_(key[f"blocks.{k}.weight"][:, :, None, None])
                block[0].bias.copy_(key[f"blocks.{k}.bias"])
            if c.mix:
                self.pos.copy_(key["pos"])
                self.mix.weight.copy_(key["mix.weight"])
                self.mix.bias.copy_(key["mix.bias"])

    def forward(self, images, perms):
        x = (images.float()[:, None] - 43.9) / 63.2
        x = self.stem(x)
        if self.config.stem_relu:
            x = torch.relu(x)
        for block in self.blocks:
            x = block(x)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), row-major patches
        if self.config.mix:
            x = self.mix(torch.relu(x + self.pos))
        # One randperm per image, applied in a Python loop as the original export did.
        return torch.stack([x[b, perms[b]] for b in range(len(x))])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_encoder_equals_layer_by_layer_reference(preset, tiny_images):
    config = resolve_config(preset, **TINY, depth=2 if PRESETS[preset].depth else 0)
    key = sample_key(config, seed=3)
    perms = sample_permutations(config, 3, 6)
    reference = ReferenceNeuraCrypt(config)
    reference.load_key(key)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tiny_images[:6]), torch.from_numpy(perms.astype(np.int64))).numpy()
    got = encode_all(Encoder(config, key), tiny_images[:6], perms)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_encoding_depends_on_batch_companions(tiny_images):
    config = resolve_config("nc7", **TINY)
    encoder = Encoder.from_seed(config, 5)
    alone = encoder.encode_batch(torch.from_numpy(tiny_images[:6]))
    companions = np.concatenate([tiny_images[:1], tiny_images[6:11]])
    changed = encoder.encode_batch(torch.from_numpy(companions))
    assert not torch.allclose(alone[0], changed[0], atol=1e-3)


def test_encoding_is_reproduced_exactly_from_seed_config_and_batch(tiny_images):
    config = resolve_config("nc7", **TINY)
    perms = sample_permutations(config, 11, 12)
    first = encode_all(Encoder.from_seed(config, 11), tiny_images, perms)
    again = encode_all(Encoder.from_seed(config, 11), tiny_images, sample_permutations(config, 11, 12))
    other_key = encode_all(Encoder.from_seed(config, 12), tiny_images, perms)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other_key)


def test_batchnorm_batches_are_consecutive_chunks_of_bn_batch(tiny_images):
    config = resolve_config("nc7", **TINY)
    encoder = Encoder.from_seed(config, 2)
    streamed = encode_all(encoder, tiny_images, None)
    second_batch = encoder.encode_batch(torch.from_numpy(tiny_images[6:12])).numpy()
    assert np.array_equal(streamed[6:12], second_batch)


def test_encode_stream_holds_no_batch_once_the_consumer_drops_it(tiny_images):
    # Peak memory of a build must not grow with N: the generator may not keep batch k alive
    # while it computes batch k + 1 (each full-size batch is 512 MB).
    encoder = Encoder.from_seed(resolve_config("nc7", **TINY), 2)
    encode_batch, alive_while_encoding = encoder.encode_batch, []

    def watched(*args):
        if refs:
            alive_while_encoding.append(refs[-1]() is not None)
        return encode_batch(*args)

    encoder.encode_batch, refs = watched, []
    for _, encoded in encoder.encode_stream(tiny_images, None):
        refs.append(weakref.ref(encoded))
        del encoded
    assert alive_while_encoding == [False]  # two batches of 6 in tiny_images


@pytest.mark.parametrize(
    "preset, depth, mix, shuffle, stem_relu",
    [("linear", 0, False, False, False), ("nc3-noshuffle", 0, True, False, True), ("nc3", 0, True, True, True),
     ("nc7", 4, True, True, True), ("nc47", 44, True, True, True)],
)
def test_preset_structure_matches_the_table(preset, depth, mix, shuffle, stem_relu):
    config = PRESETS[preset]
    assert (config.depth, config.mix, config.shuffle, config.stem_relu) == (depth, mix, shuffle, stem_relu)
    assert (config.width, config.image_size, config.patch_size, config.n_patches) == (2048, 256, 16, 256)
    names = key_tensor_names(config)
    assert sum(n.startswith("blocks.") for n in names) == 2 * depth
    assert ("pos" in names) == mix


def test_key_uses_pytorch_default_init_bounds():
    config = resolve_config("nc7", width=256)
    key = sample_key(config, 0)
    assert key["stem.weight"].abs().max() <= 1 / 16  # fan_in 16*16
    assert key["blocks.0.weight"].abs().max() <= 1 / 16  # fan_in 256
    assert key["blocks.0.weight"].abs().max() > 0.99 / 16
    assert abs(float(key["pos"].std()) - 1) < 0.01


def test_unshuffled_presets_keep_row_major_patch_order(tiny_images):
    config = resolve_config("nc3-noshuffle", **TINY)
    perms = sample_permutations(config, 0, 4)
    assert np.array_equal(perms, np.tile(np.arange(config.n_patches), (4, 1)))


def test_shuffle_is_a_fresh_permutation_per_image():
    perms = sample_permutations(PRESETS["nc7"], 0, 50)
    assert all(np.array_equal(np.sort(p), np.arange(256)) for p in perms)
    assert len({p.tobytes() for p in perms}) == 50


def test_bf16_precision_stays_close_to_fp32(tiny_images):
    config = resolve_config("nc7", **TINY)
    fp32 = encode_all(Encoder.from_seed(config, 4), tiny_images, None)
    bf16 = encode_all(Encoder.from_seed(dataclasses.replace(config, precision="bf16"), 4), tiny_images, None)
    assert np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1] > 0.99


def test_bad_overrides_are_refused():
    with pytest.raises(NcbenchError, match="unknown preset"):
        resolve_config("nc9")
    with pytest.raises(NcbenchError, match="multiple of patch_size"):
        resolve_config("nc7", image_size=30, patch_size=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fp32_equals_cpu(tiny_images):
    config = resolve_config("nc7", **TINY)
    cpu = encode_all(Encoder.from_seed(config, 1), tiny_images, None)
    gpu = encode_all(Encoder.from_seed(config, 1, device="cuda"), tiny_images, None)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
