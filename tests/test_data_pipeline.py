"""Training pipeline: determinism, exact resume, per-host shards, mesh batches, bad data."""

import gc
import io
import threading
import weakref

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import parallel
from diffusion_jax.data import (
    InputPipeline,
    Mnist5kSource,
    area_downsample,
    create_input_pipeline,
    load_mnist_5k,
    open_source,
    to_float,
)


def _config(**overrides):
    data = ml_collections.ConfigDict(
        dict(
            dataset="mnist_5k",
            data_dir=None,
            split="test",
            image_size=16,
            class_cond=True,
            random_crop=False,
            random_flip=True,
            shuffle_buffer=10_000,
            prefetch=2,
            low_res_size=0,
        )
    )
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def mnist_test():
    return Mnist5kSource("test")


def _take(pipeline, n):
    out = [next(pipeline) for _ in range(n)]
    pipeline.close()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_resume_yields_exactly_the_uninterrupted_batches(mnist_test):
    # 500 records / 48 per batch: the run crosses two epoch boundaries.
    kw = dict(image_size=16, batch_size=48, seed=3, class_cond=True, random_crop=True)
    full = _take(InputPipeline(mnist_test, **kw), 24)
    first = InputPipeline(mnist_test, **kw)
    _take(first, 9)
    state = first.get_state()
    assert state == {"epoch": 0, "position": 9 * 48, "skipped": 0}
    resumed = InputPipeline(mnist_test, **kw)
    resumed.set_state(state)
    for a, b in zip(full[9:], _take(resumed, 15)):
        _assert_same(a, b)
    # A different seed is a different stream; the same seed is the same stream.
    other = _take(InputPipeline(mnist_test, **{**kw, "seed": 4}), 1)[0]
    assert not np.array_equal(other["image"], full[0]["image"])


def test_batches_are_the_paper_preprocessing_of_the_shuffled_records(mnist_test):
    images, labels = load_mnist_5k("test")
    p = InputPipeline(mnist_test, image_size=32, batch_size=50, seed=0, class_cond=True,
                      random_flip=False)  # fmt: skip
    order = np.concatenate([p.epoch_indices(0), p.epoch_indices(1)])
    batches = _take(p, 12)  # 600 > 500 records: into epoch 1
    got = np.concatenate([b["image"] for b in batches])
    assert got.dtype == np.float32 and got.shape == (600, 32, 32, 3)
    np.testing.assert_array_equal(got, to_float(images[order[:600]]))
    got_labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(got_labels, labels[order[:600]])
    assert batches[0]["label"].dtype == np.int32
    # Every epoch is a fresh permutation.
    assert sorted(p.epoch_indices(1)) == list(range(500))
    assert not np.array_equal(p.epoch_indices(0), p.epoch_indices(1))


def test_two_processes_read_disjoint_shards_that_cover_the_data(mnist_test):
    kw = dict(image_size=32, batch_size=10, seed=7, random_flip=False)
    hosts = [InputPipeline(mnist_test, process_index=i, process_count=2, **kw) for i in range(2)]
    for epoch in range(3):
        shards = [set(h.epoch_indices(epoch).tolist()) for h in hosts]
        assert len(shards[0]) == len(shards[1]) == 250
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(500))
    # What host 1 actually yields are its shard's records.
    images, _ = load_mnist_5k("test")
    got = np.concatenate([b["image"] for b in _take(hosts[1], 25)])
    np.testing.assert_array_equal(got, to_float(images[hosts[1].epoch_indices(0)]))
    # Record counts that are not a multiple of the global batch (3 x 10): the partial
    # last global batch is dropped so every host stays in step.
    p = InputPipeline(mnist_test, process_index=0, process_count=3, **kw)
    assert len(p.epoch_indices(0)) == 160


def test_global_batches_do_not_depend_on_the_process_count(mnist_test):
    # Host p reads the p-th block of each global batch, so the global batch (hosts'
    # batches concatenated in process order) is the single process's batch, record
    # for record - the condition for multi-process training == single-process training.
    def global_orders(process_count, epoch):
        local = 24 // process_count
        hosts = [
            InputPipeline(
                mnist_test,
                image_size=32,
                batch_size=local,
                seed=3,
                process_index=i,
                process_count=process_count,
            )
            for i in range(process_count)
        ]
        rows = [h.epoch_indices(epoch).reshape(-1, local) for h in hosts]
        return np.concatenate(rows, axis=1).reshape(-1)

    for epoch in (0, 1):
        single = global_orders(1, epoch)
        assert len(single) == 480  # 500 // 24 global batches
        for count in (2, 3, 4):
            np.testing.assert_array_equal(global_orders(count, epoch), single)


def test_flips_are_seeded_per_record_and_half_the_time(mnist_test):
    kw = dict(image_size=32, batch_size=100, seed=0, shuffle=False)
    plain = _take(InputPipeline(mnist_test, random_flip=False, **kw), 1)[0]["image"]
    flip = _take(InputPipeline(mnist_test, random_flip=True, **kw), 1)[0]["image"]
    flipped = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
                        for f, p in zip(flip, plain)])  # fmt: skip
    unchanged = np.array([np.array_equal(f, p) for f, p in zip(flip, plain)])
    assert (flipped | unchanged).all() and 30 < flipped.sum() < 70


def test_global_batch_on_the_mesh_with_low_res():
    mesh = parallel.create_mesh()
    config = _config(low_res_size=8)
    p = create_input_pipeline(config, global_batch_size=16, seed=1, mesh=mesh)
    batch = _take(p, 1)[0]
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (16, 16, 16, 3) and batch["low_res"].shape == (16, 8, 8, 3)
    assert batch["image"].sharding.is_equivalent_to(parallel.data_sharding(mesh), 4)
    assert batch["image"].dtype == jax.numpy.float32 and batch["label"].dtype == jax.numpy.int32
    host = _take(create_input_pipeline(config, global_batch_size=16, seed=1), 1)[0]
    _assert_same(batch, host)
    np.testing.assert_array_equal(host["low_res"], area_downsample(host["image"], 8))
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        create_input_pipeline(config, global_batch_size=12, seed=1, mesh=mesh)


@pytest.fixture(scope="module")
def folder_with_bad_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    images, labels = load_mnist_5k("test")
    for i in range(12):
        Image.fromarray(images[i * 40]).save(root / f"{labels[i * 40]}_{i:02d}.png")
    buf = io.BytesIO()
    Image.fromarray(images[1]).resize((200, 200)).save(buf, format="JPEG")
    (root / "5_truncated.jpg").write_bytes(buf.getvalue()[:300])
    return root


def test_unreadable_images_are_skipped_counted_and_resumable(folder_with_bad_file):
    config = _config(dataset="folder", data_dir=str(folder_with_bad_file))
    full = _take(create_input_pipeline(config, global_batch_size=4, seed=0), 10)  # 40 > 13
    p = create_input_pipeline(config, global_batch_size=4, seed=0)
    _take(p, 10)
    # The bad file is skipped once each time its epoch's order reaches it.
    bad = [f.name for f in p.source.files].index("5_truncated.jpg")
    state = p.get_state()
    expected = sum(bad in p.epoch_indices(e) for e in range(state["epoch"]))
    expected += bad in p.epoch_indices(state["epoch"])[: state["position"]]
    assert state["epoch"] == 3 and p.num_skipped == state["skipped"] == expected >= 3
    assert state["position"] == 40 + expected - 3 * 12  # 13 records, 12 an epoch (3 x 4)
    resumed = create_input_pipeline(config, global_batch_size=4, seed=0)
    p = create_input_pipeline(config, global_batch_size=4, seed=0)
    _take(p, 4)
    resumed.set_state(p.get_state())
    for a, b in zip(full[4:], _take(resumed, 6)):
        _assert_same(a, b)


def test_all_unreadable_fails_clearly_instead_of_hanging(tmp_path):
    for i in range(3):
        (tmp_path / f"x_{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    p = create_input_pipeline(_config(dataset="folder", data_dir=str(tmp_path)),
                              global_batch_size=2, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="unreadable"):
        next(p)


def test_bad_configuration_messages(mnist_test, tmp_path):
    with pytest.raises(ValueError, match="process_index"):
        InputPipeline(mnist_test, image_size=8, batch_size=2, seed=0, process_index=2,
                      process_count=2)  # fmt: skip
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        create_input_pipeline(_config(), global_batch_size=5, seed=0, process_count=2)
    (tmp_path / "plain.png").write_bytes(b"")
    folder = open_source("folder", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="class_cond"):
        InputPipeline(folder, image_size=8, batch_size=1, seed=0, class_cond=True)
    with pytest.raises(ValueError, match="lacks"):
        InputPipeline(mnist_test, image_size=8, batch_size=2, seed=0).set_state({"epoch": 1})


def _pipeline_threads():
    return {t for t in threading.enumerate() if t.name == "input_pipeline"}


def test_background_thread_stops_on_with_exit_and_on_garbage_collection(mnist_test):
    kw = dict(image_size=8, batch_size=4, seed=0, prefetch=1)
    before = _pipeline_threads()
    with InputPipeline(mnist_test, **kw) as p:
        next(p)
        (thread,) = _pipeline_threads() - before
        assert thread.is_alive()  # blocked on the full prefetch queue
    assert not thread.is_alive()
    # Still usable after close: the next batch restarts the thread where it stopped.
    with p:
        resumed = next(p)
    _assert_same(resumed, _take(InputPipeline(mnist_test, **kw), 2)[1])

    # Never closed: dropping the last reference stops the thread.
    p = InputPipeline(mnist_test, **kw)
    next(p)
    (thread,) = _pipeline_threads() - before
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None and not thread.is_alive()
    assert _pipeline_threads() == before


def test_create_input_pipeline_is_a_context_manager():
    before = _pipeline_threads()
    with create_input_pipeline(_config(), global_batch_size=8, seed=0) as batches:
        assert next(batches)["image"].shape == (8, 16, 16, 3)
        assert len(_pipeline_threads() - before) == 1
    assert _pipeline_threads() == before
