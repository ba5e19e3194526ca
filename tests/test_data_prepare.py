"""Preparing tfds data as ArrayRecord: the Python-API prepare and the TFRecord converter.

A tiny tfds builder (PNG images of assorted sizes, 3 classes, train in 3 shards and test
in 2) is prepared as TFRecord, converted, and read back through the pipeline; the
reference is tfds' own TFRecord reader on the original files.
"""

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from diffusion_jax.data import (
    center_crop_arr,
    convert_to_array_record,
    create_input_pipeline,
    iterate_uint8_images,
    open_source,
    prepare_tfds_dataset,
    to_float,
)

NAME = "diffusion_jax_tiny_images"
MANUAL_NAME = "diffusion_jax_tiny_manual"
ROOT = epath.Path(__file__).parents[1]

# Builder source, run here and in the launcher subprocess (which must register it too).
BUILDERS = """
import io
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def tiny_images(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (9 + i % 4, 7 + 2 * (i % 3), 3), np.uint8) for i in range(n)]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class DiffusionJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)),
                 "label": tfds.features.ClassLabel(num_classes=3)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 5)}

    def _generate_examples(self, seed, n):
        for i, array in enumerate(tiny_images(seed, n)):
            yield f"{seed}-{i}", {"image": _png(array), "label": (i + seed) % 3}


class DiffusionJaxTinyManual(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("2.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "images.npz"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3))}),
        )

    def _split_generators(self, dl_manager):
        with (dl_manager.manual_dir / "images.npz").open("rb") as f:
            images = np.load(f)["images"]
        return {"train": self._generate_examples(images)}

    def _generate_examples(self, images):
        for i, array in enumerate(images):
            yield i, {"image": _png(array)}
"""


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


@pytest.fixture(scope="module")
def builders(tfds):
    """Registers the two test builders with tfds (once per process)."""
    namespace = {"__name__": "tiny_tfds_builders"}
    exec(BUILDERS, namespace)
    return namespace


def _hashes(root: epath.Path) -> dict[str, str]:
    hashes = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def tfrecord_dir(tfds, builders, tmp_path_factory):
    """The tiny dataset prepared in tfds' default (TFRecord) format."""
    data_dir = tmp_path_factory.mktemp("tfrecord")
    builder = tfds.builder(NAME, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    assert builder.info.file_format.value == "tfrecord"
    return data_dir


def _tfrecord_examples(tfds, data_dir, split):
    """(PIL images, labels) read from the TFRecord files by tfds, in dataset order."""
    builder = tfds.builder(NAME, data_dir=str(data_dir))
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    records = list(ds.as_numpy_iterator())
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in records]
    return images, [int(r["label"]) for r in records]


def test_converted_data_reads_as_the_tfrecord_did(tfds, tfrecord_dir, tmp_path):
    before = _hashes(tfrecord_dir)
    target = tmp_path / "converted"
    version_dir = convert_to_array_record(NAME, str(tfrecord_dir), str(target))
    assert version_dir == target / NAME / "1.0.0"
    # Shard files named as tfds names array_record shards, one per TFRecord shard.
    shards = sorted(p.name for p in version_dir.iterdir() if ".array_record-" in p.name)
    assert shards == [f"{NAME}-test.array_record-0000{i}-of-00003" for i in range(3)] + [
        f"{NAME}-train.array_record-0000{i}-of-00003" for i in range(3)
    ]
    original = json.loads((tfrecord_dir / NAME / "1.0.0" / "dataset_info.json").read_text())
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record" and original["fileFormat"] == "tfrecord"
    assert info["splits"] == original["splits"]  # same shard lengths, same template
    assert (version_dir / "features.json").exists()

    for split, count in (("train", 12), ("test", 5)):
        images, labels = _tfrecord_examples(tfds, tfrecord_dir, split)
        assert len(images) == count and len(set(labels)) == 3
        source = open_source(NAME, data_dir=str(target), split=split, class_cond=True)
        assert len(source) == count and source.num_classes == 3
        for i in range(count):
            image, label = source[i]
            np.testing.assert_array_equal(np.asarray(image), np.asarray(images[i]))
            assert label == labels[i]
        batches = list(iterate_uint8_images(NAME, 6, data_dir=str(target), split=split))
        expected = np.stack([center_crop_arr(im, 6) for im in images])
        np.testing.assert_array_equal(np.concatenate(batches), expected)

    # The training pipeline, in dataset order without flips: the same records.
    config = ml_collections.ConfigDict(
        dict(dataset=NAME, data_dir=str(target), split="train", image_size=6, class_cond=True,
             random_crop=False, random_flip=False, shuffle_buffer=0, prefetch=1)
    )  # fmt: skip
    images, labels = _tfrecord_examples(tfds, tfrecord_dir, "train")
    with create_input_pipeline(config, global_batch_size=4, seed=0) as batches:
        got = [next(batches) for _ in range(3)]
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in got]),
        to_float(np.stack([center_crop_arr(im, 6) for im in images])),
    )
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), labels)

    # The source is only read.
    assert _hashes(tfrecord_dir) == before

    # Converting again into the same data_dir is a no-op returning the same directory.
    def stamps():
        return {n: os.stat(version_dir / n).st_mtime_ns for n in os.listdir(version_dir)}

    before_again = stamps()
    assert convert_to_array_record(NAME, str(tfrecord_dir), str(target)) == version_dir
    assert stamps() == before_again
    assert not (target / NAME / "1.0.0.converting").exists()


def test_convert_refuses_unsafe_or_pointless_targets(tfds, tfrecord_dir, tmp_path):
    with pytest.raises(ValueError, match="is the source data_dir"):
        convert_to_array_record(NAME, str(tfrecord_dir), str(tfrecord_dir))
    # A version dir that is not a finished conversion is never overwritten.
    stale = tmp_path / "stale"
    (stale / NAME / "1.0.0").mkdir(parents=True)
    (stale / NAME / "1.0.0" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete ArrayRecord conversion"):
        convert_to_array_record(NAME, str(tfrecord_dir), str(stale))
    assert (stale / NAME / "1.0.0" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="not prepared"):
        convert_to_array_record(NAME, str(tmp_path / "empty"), str(tmp_path / "out"))
    # Broken sources: a missing shard, a truncated shard. Named; no half-made target.
    broken = tmp_path / "broken"
    shutil.copytree(tfrecord_dir, broken)
    shard = broken / NAME / "1.0.0" / f"{NAME}-train.tfrecord-00001-of-00003"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=rf"cannot read shard {re.escape(str(shard))} after \d+ records"
    ):
        convert_to_array_record(NAME, str(broken), str(tmp_path / "from_broken"))
    assert not (tmp_path / "from_broken" / NAME / "1.0.0").exists()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing, e.g. {re.escape(str(shard))}"):
        convert_to_array_record(NAME, str(broken), str(tmp_path / "from_broken"))
    with pytest.raises(ValueError, match="not a tfds dataset name"):
        convert_to_array_record("no_such_dataset_xyz", str(tfrecord_dir), str(tmp_path / "x"))


def test_tfrecord_data_error_gives_a_working_convert_command(tfds, tfrecord_dir):
    with pytest.raises(ValueError, match="no random access") as e:
        open_source(NAME, data_dir=str(tfrecord_dir))
    target = f"{tfrecord_dir}_array_record"
    command = (
        f"python -m launch.prepare_data --dataset={NAME} --convert_existing={tfrecord_dir} "
        f"--data_dir={target}"
    )
    assert f"`{command}`" in str(e.value) and f"config.data.data_dir={target!r}" in str(e.value)
    # The command as printed, run as the launcher (after registering the test builder).
    argv = shlex.split(command)[2:]
    script = f"{BUILDERS}\nfrom absl import app\nfrom launch import prepare_data\n"
    script += f"app.run(prepare_data.main, argv={argv!r})"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--config.data.data_dir={target}" in result.stdout
    (batch,) = iterate_uint8_images(NAME, 5, data_dir=target, split="test")
    images, _ = _tfrecord_examples(tfds, tfrecord_dir, "test")
    np.testing.assert_array_equal(batch, np.stack([center_crop_arr(im, 5) for im in images]))


def test_prepare_through_the_python_api_writes_array_record(builders, tfrecord_dir, tmp_path):
    version_dir = prepare_tfds_dataset(NAME, str(tmp_path))
    assert version_dir == tmp_path / NAME / "1.0.0"
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    assert any(".array_record-" in p.name for p in version_dir.iterdir())
    assert not any(".tfrecord-" in p.name for p in version_dir.iterdir())
    # What the builder generated, in tfds' order (tfds sorts examples by hashed key).
    source = open_source(NAME, data_dir=str(tmp_path), split="train", class_cond=True)
    generated = {a.tobytes() for a in builders["tiny_images"](0, 12)}
    assert {np.asarray(source[i][0]).tobytes() for i in range(len(source))} == generated
    # Already prepared: returns at once; prepared as TFRecord: says how to convert.
    assert prepare_tfds_dataset(NAME, str(tmp_path)) == version_dir
    with pytest.raises(ValueError, match="--convert_existing="):
        prepare_tfds_dataset(NAME, str(tfrecord_dir))


def test_prepare_passes_the_manual_dir(builders, tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (4, 8, 8, 3), np.uint8)
    manual = tmp_path / "manual"
    manual.mkdir()
    np.savez(manual / "images.npz", images=images)
    with pytest.raises(FileNotFoundError, match="manual_dir="):
        prepare_tfds_dataset(MANUAL_NAME, str(tmp_path / "data"), str(tmp_path / "absent"))
    prepare_tfds_dataset(MANUAL_NAME, str(tmp_path / "data"), str(manual))
    (batch,) = iterate_uint8_images(MANUAL_NAME, 8, data_dir=str(tmp_path / "data"))
    assert {a.tobytes() for a in batch} == {a.tobytes() for a in images}
