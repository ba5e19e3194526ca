"""Datasets: image folders (paper conventions), built-in mnist_5k, tfds (mocked), bad data."""

import importlib.util
import io
import logging
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from diffusion_jax.data import (
    ImageFolderSource,
    center_crop_arr,
    iterate_uint8_images,
    list_image_files,
    load_mnist_5k,
    open_source,
)


@pytest.fixture(scope="module")
def ref():
    sys.modules.setdefault("mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace()))
    from guided_diffusion import image_datasets

    return image_datasets


def _photo():
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (requirements-dev.txt) ships the test photographs")
    return Image.open(epath.Path(spec.origin).parent / "datasets/images/china.jpg").convert("RGB")


FOLDER_FILES = [
    "cat_001.jpg", "dog_002.png", "cat_003.JPEG", "sub/bird_004.jpeg", "sub/deeper/dog_005.gif",
    "ant_006.jpg",
]  # fmt: skip
TRUNCATED = "cat_007_truncated.jpg"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real photo crops in a nested folder, a non-image file and one truncated JPEG."""
    root = tmp_path_factory.mktemp("images")
    photo = _photo()
    for i, name in enumerate(FOLDER_FILES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        crop = photo.crop((40 * i, 10 * i, 40 * i + 150 + 20 * i, 10 * i + 120))
        ext = name.split(".")[-1].lower()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "gif": "GIF"}[ext]
        crop.save(path, format=fmt)
    (root / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    (root / TRUNCATED).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return root


def test_folder_listing_and_labels_follow_the_paper_code(ref, folder):
    theirs = ref._list_image_files_recursively(str(folder))
    assert [str(p) for p in list_image_files(folder)] == theirs
    source = ImageFolderSource(folder, class_cond=True)
    assert source.class_names == ["ant", "bird", "cat", "dog"]
    # The paper's rule: class = file-name prefix before '_', numbered in sorted order.
    names = [p.split("/")[-1].split("_")[0] for p in theirs]
    assert source.labels == [sorted(set(names)).index(n) for n in names]
    assert ImageFolderSource(folder).labels == [-1] * len(theirs)


def test_folder_images_match_the_paper_dataset(ref, folder):
    source = ImageFolderSource(folder, class_cond=True)
    readable = [i for i, f in enumerate(source.files) if f.name != TRUNCATED]
    paths = [str(source.files[i]) for i in readable]
    dataset = ref.ImageDataset(48, paths, random_flip=False)
    for k, i in enumerate(readable):
        image, _ = source[i]
        theirs = np.transpose(dataset[k][0], (1, 2, 0))  # CHW -> HWC, float in [-1, 1]
        ours = center_crop_arr(image, 48).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(ours, theirs)


def test_iterate_uint8_images_skips_and_logs_truncated_file(folder, caplog):
    source = ImageFolderSource(folder)
    expected = [
        center_crop_arr(source[i][0], 40) for i, f in enumerate(source.files) if f.name != TRUNCATED
    ]
    with caplog.at_level(logging.WARNING):
        batches = list(iterate_uint8_images(str(folder), 40, batch_size=4))
    assert [b.shape for b in batches] == [(4, 40, 40, 3), (2, 40, 40, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(expected))
    assert TRUNCATED in caplog.text and "skipped 1 unreadable" in caplog.text
    limited = list(iterate_uint8_images(str(folder), 40, batch_size=4, limit=5))
    np.testing.assert_array_equal(np.concatenate(limited), np.stack(expected[:5]))


def test_missing_folder_messages():
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderSource("/nonexistent/images")
    with pytest.raises(FileNotFoundError, match="looks like a path"):
        next(iterate_uint8_images("/nonexistent/images", 32))
    with pytest.raises(ValueError, match=r"config\.data\.data_dir"):
        open_source("folder", data_dir=None)


def test_mnist_5k_splits_are_real_digits_and_disjoint():
    train_x, train_y = load_mnist_5k("train")
    test_x, test_y = load_mnist_5k("test")
    assert train_x.shape == (4500, 32, 32, 3) and test_x.shape == (500, 32, 32, 3)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(train_y), [450] * 10)
    np.testing.assert_array_equal(np.bincount(test_y), [50] * 10)
    # Black 2-pixel border around a 28x28 digit, replicated over RGB.
    assert train_x[:, :2].max() == 0 and train_x[:, -2:].max() == 0
    assert (train_x[..., 0] == train_x[..., 2]).all()
    assert train_x[:, 2:30, 2:30].mean() > 20  # digits, not blanks
    # Held out: no test digit is also in train.
    train_keys = {x.tobytes() for x in train_x[..., 0]}
    assert not any(x.tobytes() in train_keys for x in test_x[..., 0])
    batches = list(iterate_uint8_images("mnist_5k", 32, split="test", batch_size=200))
    assert [len(b) for b in batches] == [200, 200, 100]
    np.testing.assert_array_equal(np.concatenate(batches), test_x)
    with pytest.raises(ValueError, match="split='validation'"):
        load_mnist_5k("validation")


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def test_tfds_imagenet_through_mock_data(tfds):
    with tfds.testing.mock_data(num_examples=10):
        records = tfds.data_source(
            "imagenet2012", split="train", decoders={"image": tfds.decode.SkipDecoding()}
        )
        expected = [
            center_crop_arr(Image.open(io.BytesIO(records[i]["image"])).convert("RGB"), 16)
            for i in range(10)
        ]
        labels = [int(records[i]["label"]) for i in range(10)]
        batches = list(iterate_uint8_images("imagenet2012", 16, batch_size=4))
        source = open_source("imagenet2012", class_cond=True)
        assert source.num_classes == 1000
        assert [source[i][1] for i in range(10)] == labels
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(expected))


def test_tfds_lsun_is_unconditional(tfds):
    with tfds.testing.mock_data(num_examples=3):
        (batch,) = iterate_uint8_images("lsun/bedroom", 8)
        assert batch.shape == (3, 8, 8, 3)
        with pytest.raises(ValueError, match="no 'label' feature"):
            open_source("lsun/cat", class_cond=True)
        # downsampled_imagenet (unlabelled in tfds) goes through the same tfds path.
        (small,) = iterate_uint8_images("downsampled_imagenet/64x64", 64)
        assert small.shape == (3, 64, 64, 3)


def _photo_jpegs():
    """Real photo crops as JPEG records: landscape, portrait, a rounding tie, small."""
    photo = _photo()
    out = []
    for i, (w, h) in enumerate([(300, 200), (180, 260), (301, 200), (70, 90), (480, 320)]):
        crop = photo.crop((50 * i, 20 * i, 50 * i + max(w, 200), 20 * i + max(h, 200)))
        buf = io.BytesIO()
        crop.resize((w, h), Image.LANCZOS).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("name", ["lsun/bedroom", "imagenet2012"])
def test_tfds_lsun_gets_the_paper_lsun_preparation_and_imagenet_does_not(tfds, ref, name):
    from test_data_preprocessing import paper_lsun_training_image

    from diffusion_jax.data import create_input_pipeline, to_float

    size = 100
    jpegs = _photo_jpegs()
    records = [{"image": b, "label": i, "id": str(i), "file_name": ""} for i, b in enumerate(jpegs)]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    # The paper's two routes: its LSUN script + loader, and its loader alone.
    routes = {
        "lsun": np.stack([paper_lsun_training_image(ref, img, size) for img in decoded]),
        "standard": np.stack([ref.center_crop_arr(img, size) for img in decoded]),
    }
    assert (routes["lsun"] != routes["standard"]).mean() > 0.3
    default, other = ("lsun", "standard") if name.startswith("lsun/") else ("standard", "lsun")
    config = ml_collections.ConfigDict(
        dict(dataset=name, data_dir=None, split="train", image_size=size, class_cond=False,
             random_crop=False, random_flip=False, shuffle_buffer=0, prefetch=1,
             low_res_size=0)
    )  # fmt: skip
    with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: records):
        got = {
            "auto": np.concatenate(list(iterate_uint8_images(name, size, batch_size=2))),
            other: np.concatenate(list(iterate_uint8_images(name, size, preprocessing=other))),
        }
        # No `preprocessing` field (older configs): 'auto', as with the base default.
        with create_input_pipeline(config, global_batch_size=5, seed=0) as batches:
            assert batches.preprocessing == default
            trained = next(batches)["image"]
        config.preprocessing = other
        with create_input_pipeline(config, global_batch_size=5, seed=0) as batches:
            trained_other = next(batches)["image"]
    np.testing.assert_array_equal(got["auto"], routes[default])
    np.testing.assert_array_equal(got[other], routes[other])
    np.testing.assert_array_equal(trained, to_float(routes[default]))
    np.testing.assert_array_equal(trained_other, to_float(routes[other]))


def test_paper_lsun_configs_take_the_lsun_route():
    from configs import imagenet256, lsun_bedroom, lsun_cat, lsun_horse
    from diffusion_jax.data import resolve_preprocessing

    for module in (lsun_bedroom, lsun_cat, lsun_horse):
        data = module.get_config().data
        assert resolve_preprocessing(data.preprocessing, data.dataset) == "lsun"
    data = imagenet256.get_config().data
    assert resolve_preprocessing(data.preprocessing, data.dataset) == "standard"


def test_import_does_not_load_tensorflow():
    code = "import sys, diffusion_jax.data; assert 'tensorflow' not in sys.modules, 'tf'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=epath.Path(__file__).parents[1])


def test_missing_tfds_dataset_says_where_and_how(tfds, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_source("imagenet2012", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "imagenet2012") in msg
    # The command to run, with this data_dir filled in (the tfds CLI needs apache_beam).
    command = "python -m launch.prepare_data --dataset=imagenet2012 --manual_dir=MANUAL_DIR"
    assert f"`{command} --data_dir={tmp_path}`" in msg and "tfds build" not in msg
    with pytest.raises(FileNotFoundError) as e:
        open_source("lsun/horse", data_dir=str(tmp_path))
    assert f"`python -m launch.prepare_data --dataset=lsun/horse --data_dir={tmp_path}`" in str(
        e.value
    )


def test_tfds_training_pipeline_and_resume(tfds):
    from diffusion_jax.data import create_input_pipeline

    config = ml_collections.ConfigDict(
        dict(dataset="imagenet2012", data_dir=None, split="train", image_size=16,
             class_cond=True, random_crop=True, random_flip=True, shuffle_buffer=1,
             prefetch=1, low_res_size=4)
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=12):
        uninterrupted = create_input_pipeline(config, global_batch_size=4, seed=2)
        full = [next(uninterrupted) for _ in range(5)]
        uninterrupted.close()
        first = create_input_pipeline(config, global_batch_size=4, seed=2)
        next(first), next(first)
        resumed = create_input_pipeline(config, global_batch_size=4, seed=2)
        resumed.set_state(first.get_state())
        rest = [next(resumed) for _ in range(3)]
        first.close()
        resumed.close()
    assert full[0]["image"].shape == (4, 16, 16, 3) and full[0]["low_res"].shape == (4, 4, 4, 3)
    assert ((full[0]["label"] >= 0) & (full[0]["label"] < 1000)).all()
    for a, b in zip(full[2:], rest):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_unknown_dataset_name(tfds):
    with pytest.raises(ValueError, match="neither 'mnist_5k', 'folder' nor a tfds"):
        open_source("imagenet_typo")
