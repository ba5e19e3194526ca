"""compute_features across processes: 2 processes x 4 devices == 1 process x 8 devices.

A real `jax.distributed` run on localhost (tests/multiprocess.py): each process passes its
own images and gets back the features of all of them, in process order. The network has
seeded random weights (He-scaled, so features are informative) built from the parameter
shapes alone, so both sides build the same model without a weights file.

This file is also the child script (`run_processes(__file__, ...)` runs `_child`).
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from multiprocess import run_processes

from diffusion_jax import parallel
from diffusion_jax.evaluation import (
    Inception,
    InceptionV3FID,
    compute_features,
    inception,
    multihost,
)

NUM_IMAGES, SIZE, BATCH = 12, 32, 8  # 8 = one image per device in every run below
KEYS = ("pool", "spatial", "logits")
# name -> what processes 0 and 1 pass (see `_inputs`), and how many of the images.
SPLITS = {"equal": NUM_IMAGES, "unequal": NUM_IMAGES, "empty": 4}


def random_inception(seed: int = 0) -> Inception:
    """The FID Inception with seeded He-scaled random weights, deterministic everywhere."""
    module = InceptionV3FID()
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in ("kernel", "fc_kernel"):  # He scaling keeps activations O(1)
            std = (2.0 if name == "kernel" else 1.0) / np.prod(shape[:-1])
            return (rng.standard_normal(shape) * std**0.5).astype(np.float32)
        if name in ("scale", "var"):  # positive, as in test_inception's torch weights
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name in ("bias", "mean"):
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        raise KeyError(f"unexpected parameter {path}")

    params = jax.tree_util.tree_map_with_path(fill, inception.init_params_shapes(module))
    return Inception(params=params, fingerprint=f"random-{seed}", module=module)


def test_images() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3), np.uint8)


test_images.__test__ = False  # a helper shared with the child, not a test


def _inputs(split: str, process_id: int, images: np.ndarray):
    """What process `process_id` passes to compute_features in `split`."""
    if split == "equal":
        return images[:6] if process_id == 0 else images[6:]
    if split == "unequal":  # 7 streamed as [2, 5] (3 steps: 2, 4, 1) / 5 as one array
        return iter([images[:2], images[2:7]]) if process_id == 0 else images[7:]
    if split == "empty":  # process 0 has no images, not even a resolution
        return iter([]) if process_id == 0 else images[:4]
    raise KeyError(split)


def _child(argv):
    from multiprocess import init_child

    flags, rest = init_child(argv)
    out = pathlib.Path(rest[0])
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model, images = random_inception(), test_images()
    arrays, errors = {}, {}
    for split in SPLITS:
        feats = compute_features(_inputs(split, flags.process_id, images), model, batch_size=BATCH)
        arrays.update({f"{split}/{k}": v for k, v in feats.items()})
    # Bad input on process 1 only: both processes raise (none hangs in a collective).
    bad = images.astype(np.float32) if flags.process_id == 1 else images[:6]
    # Nothing anywhere: both raise the same error.
    for name, x in [("bad", bad), ("none", np.zeros((0, SIZE, SIZE, 3), np.uint8))]:
        try:
            compute_features(x, model, batch_size=BATCH)
            errors[name] = None
        except (ValueError, RuntimeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    np.savez(out / f"features{flags.process_id}.npz", **arrays)
    (out / f"errors{flags.process_id}.json").write_text(json.dumps(errors))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess_features")
    run_processes(__file__, [str(out)], num_processes=2, devices_per_process=4, timeout=600)
    feats = [dict(np.load(out / f"features{i}.npz")) for i in range(2)]
    errors = [json.loads((out / f"errors{i}.json").read_text()) for i in range(2)]
    return feats, errors


@pytest.fixture(scope="module")
def one_process():
    assert jax.device_count() == 8
    return compute_features(test_images(), random_inception(), batch_size=BATCH)


def test_random_features_are_informative(one_process):
    # Otherwise equality below would prove nothing (e.g. all-zero features).
    for k in KEYS:
        assert one_process[k].shape[0] == NUM_IMAGES
        assert np.all(np.isfinite(one_process[k]))
        assert np.std(one_process[k], axis=0).mean() > 1e-2 * np.abs(one_process[k]).mean(), k
        assert not np.allclose(one_process[k][0], one_process[k][1]), k


@pytest.mark.slow  # the two-process run: 25-30 s on 2 busy cores (both compile Inception)
@pytest.mark.parametrize("split", SPLITS)
def test_two_processes_get_all_features_as_one_process(two_processes, one_process, split):
    feats, _ = two_processes
    for k in KEYS:
        a, b = feats[0][f"{split}/{k}"], feats[1][f"{split}/{k}"]
        want = one_process[k][: SPLITS[split]]
        assert a.shape == want.shape, (split, k)
        np.testing.assert_array_equal(a, b)  # every process holds the same result
        np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        # Same per-device batches (one image a device) -> the same bits as one process.
        np.testing.assert_array_equal(a, want)


def test_pad_shard_unpad_in_one_process():
    mesh = parallel.create_mesh()
    run = multihost.PadShardUnpad(jax.jit(lambda x: {"y": 2 * x}), mesh, 8)
    assert run.local_batch_size == 8
    assert [r.tolist() for r in run.rows] == [list(range(8))]
    x = np.arange(10, 15, dtype=np.float32)
    (out,) = run(x)
    np.testing.assert_array_equal(out["y"], 2 * x)  # padding dropped
    (out,) = run(x[:0])
    assert out["y"].shape == (0,)
    with pytest.raises(ValueError, match="at most 8"):
        run(np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        multihost.PadShardUnpad(lambda x: x, mesh, 12)


@pytest.mark.slow
def test_bad_input_on_one_process_raises_on_every_process(two_processes):
    _, errors = two_processes
    assert errors[1]["bad"].startswith("ValueError: images must have dtype uint8")
    assert errors[0]["bad"] == (
        "RuntimeError: compute_features failed on process(es) [1]; see their logs."
    )
    for e in errors:
        assert e["none"] == "ValueError: compute_features got no images from its input."


if __name__ == "__main__":
    _child(sys.argv[1:])
