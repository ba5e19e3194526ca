"""Prepares tfds datasets as ArrayRecord, the random-access format the pipeline reads.

Two routes, both through the tfds Python API (the `tfds build` command line needs
apache_beam in tfds 4.9.10 and fails where beam is not installed):

- `prepare_tfds_dataset`: download (or read from `manual_dir`) and write ArrayRecord
  files, as `tfds build --file_format=array_record` would.
- `convert_to_array_record`: copy a dataset already prepared in tfds' default TFRecord
  format into ArrayRecord files under another data_dir, record by record, without
  downloading or re-encoding anything. The source is only read.

tfds lays a prepared dataset out as `DATA_DIR/<name>[/<config>]/<version>/`, holding
`dataset_info.json` (features, splits with per-shard example counts and the shard file
name template, the file format), `features.json`, label files and the shards, named
`{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}` by default
(`imagenet2012-train.tfrecord-00000-of-01024`). A conversion therefore writes the
same shards with `array_record` in place of `tfrecord` in their names, copies the
other metadata files and sets `fileFormat` to `array_record` in `dataset_info.json`.

tensorflow, tensorflow_datasets and array_record are imported inside the functions.
The command lines printed by the pipeline's error messages come from
`prepare_command` / `convert_command` here.
"""

from __future__ import annotations

import difflib
import json
import logging as logging_lib
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent import futures
from typing import Any

from absl import logging
from etils import epath

from diffusion_jax.files import files_under, read_json
from diffusion_jax.progress import absl_records_dropped

ARRAY_RECORD = "array_record"
TFRECORD = "tfrecord"
# Records are read one at a time by index, so each record is its own group.
_WRITER_OPTIONS = "group_size:1"
_DATASET_INFO = "dataset_info.json"
# Suffix of the folder a conversion writes into before renaming it to the version dir;
# tfds ignores it (not a version number), and only this module creates it.
_CONVERTING_SUFFIX = ".converting"
_LAUNCHER = "python -m launch.prepare_data"


def prepare_command(name: str, data_dir: str | None = None) -> str:
    """The `python -m launch.prepare_data ...` command that prepares tfds dataset `name`
    (e.g. 'lsun/bedroom') as ArrayRecord; data_dir None writes the literal text DATA_DIR."""
    manual = " --manual_dir=MANUAL_DIR" if name.split("/")[0] == "imagenet2012" else ""
    return f"{_LAUNCHER} --dataset={name}{manual} --data_dir={data_dir or 'DATA_DIR'}"


def convert_command(name: str, source_data_dir: str, data_dir: str) -> str:
    """The command that converts a TFRecord-prepared dataset to ArrayRecord in data_dir."""
    return (
        f"{_LAUNCHER} --dataset={name} --convert_existing={source_data_dir} --data_dir={data_dir}"
    )


def prepare_hint(name: str, data_dir: str | None = None) -> str:
    """How to prepare tfds dataset `name` for the pipeline, as a sentence (`prepare_command`)."""
    command = prepare_command(name, data_dir)
    if name.split("/")[0] == "imagenet2012":
        return (
            "ImageNet is a manual download: get ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar from image-net.org into MANUAL_DIR, then run `{command}`."
        )
    if name.split("/")[0] == "lsun":
        return f"run `{command}` (downloads the LSUN archive)."
    return f"run `{command}`."


def default_converted_dir(source_data_dir: str) -> str:
    """The target the error messages suggest for converting `source_data_dir`."""
    return source_data_dir.rstrip("/") + "_array_record"


def _did_you_mean(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


def open_builder(
    name: str, data_dir: epath.PathLike | None = None, *, not_found: str | None = None, **kwargs
) -> Any:
    """`tfds.builder(name, data_dir, **kwargs)`, with one-line errors for an unknown name
    or config; `not_found` replaces the sentence for an unknown dataset name.

    Raises:
      ValueError: for an unknown dataset name or builder config, naming close matches
        (`lsun/bedrom` -> 'lsun/bedroom') instead of tfds' list of every dataset.
    """
    import tensorflow_datasets as tfds

    try:
        # tfds logs where it looked at INFO level; the errors below say what matters.
        with absl_records_dropped(lambda r: r.levelno < logging_lib.WARNING):
            return tfds.builder(
                name, data_dir=None if data_dir is None else os.fspath(data_dir), **kwargs
            )
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split(":")[0].split("/")[0]
        known = tfds.list_builders(with_community_datasets=False)
        sentence = not_found or f"dataset={name!r} is not a tfds dataset name"
        raise ValueError(
            f"{sentence}{_did_you_mean(base, known)} (e.g. 'imagenet2012', 'lsun/bedroom', "
            "'downsampled_imagenet/64x64')."
        ) from None
    except ValueError as e:
        if "BuilderConfig" not in str(e):
            raise
        base, _, config = name.split(":")[0].partition("/")
        configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
        raise ValueError(
            f"{name!r}: tfds dataset {base!r} has no config {config!r}"
            f"{_did_you_mean(config, configs)}; its configs: {', '.join(configs)}."
        ) from None


# Archives a manual-download dataset must have in its manual_dir before preparing.
_MANUAL_ARCHIVES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def _check_manual_dir(builder: Any, name: str, manual_dir: epath.PathLike | None) -> None:
    """Fails in one line, naming what to put where, if manual downloads are missing."""
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return
    given = manual_dir is not None
    root = data_dir_root(builder)
    folder = epath.Path(manual_dir) if given else root / "downloads" / "manual"
    needed = _MANUAL_ARCHIVES.get(name.split(":")[0].split("/")[0], ())
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    missing = [archive for archive in needed if archive not in present]
    if present and not missing:
        return
    flag = "" if given else " (tfds' default; or pass --manual_dir=DIR)"
    if missing:
        what = f"{' and '.join(missing)} (from image-net.org, after registering)"
    else:  # a manual dataset whose files we do not know by name: tfds' own instructions
        what = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
    command = f"{_LAUNCHER} --dataset={name} --manual_dir={folder} --data_dir={root}"
    raise FileNotFoundError(
        f"{name!r} is a manual download, and {folder}{flag} lacks {what}. Put the "
        f"files there, then run `{command}`."
    )


def _check_reachable(builder: Any, name: str, connect: Callable[..., Any]) -> None:
    """Fails in one line if the hosts of a dataset's download URLs cannot be reached.

    Without this, tfds retries each URL for about 200 s before failing with a traceback.
    Skipped when the builder lists no URLs, when anything is already downloaded (tfds
    may not need the network) and behind a proxy (a direct connection proves nothing).
    """
    root = data_dir_root(builder)
    downloads = root / "downloads"
    if downloads.is_dir() and any(downloads.iterdir()):
        return
    urls = list(getattr(builder, "url_infos", None) or {})
    proxies = urllib.request.getproxies()
    for host, scheme, port in sorted(
        {(u.hostname, u.scheme, u.port) for u in map(urllib.parse.urlparse, urls) if u.hostname}
    ):
        if scheme in proxies or "all" in proxies:
            continue
        try:
            connect((host, port or (443 if scheme == "https" else 80)), timeout=10).close()
        except OSError as e:
            raise ConnectionError(
                f"cannot reach {host} to download {name!r} ({type(e).__name__}: {e}): no "
                "network? Prepare it on a machine with network access "
                f"(`{prepare_command(name)}`) and copy that DATA_DIR to {root}."
            ) from None


def is_prepared(builder: Any) -> bool:
    """`builder.is_prepared()`, without tfds' warning line when it is not."""
    with absl_records_dropped(lambda r: str(r.msg).startswith("Variant folder")):
        return builder.is_prepared()


def data_dir_root(builder: Any) -> epath.Path:
    """The data_dir a builder reads from (its version dir minus `<name>[/<config>]/<version>`)."""
    version_dir = epath.Path(builder.data_dir)
    for _ in builder.info.full_name.split("/"):
        version_dir = version_dir.parent
    return version_dir


def _file_formats(builder: Any) -> set[str]:
    return {f.value for f in builder.info.available_file_formats()}


def prepare_tfds_dataset(
    name: str,
    data_dir: epath.PathLike | None = None,
    manual_dir: epath.PathLike | None = None,
    *,
    connect: Callable[..., Any] = socket.create_connection,
) -> epath.Path:
    """Downloads and prepares a tfds dataset as ArrayRecord files (tfds Python API).

    Does what `tfds build NAME --file_format=array_record` does, without the command
    line (which needs apache_beam). Already prepared as ArrayRecord: returns at once.

    Args:
      name: tfds name, e.g. 'imagenet2012', 'lsun/bedroom', 'downsampled_imagenet/64x64'.
      data_dir: where to write (`config.data.data_dir`); None = tfds' default.
      manual_dir: the folder holding manually downloaded archives (ImageNet:
        ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar); None = tfds' default
        (`<data_dir>/downloads/manual`).
      connect: `socket.create_connection`, used to check that the download hosts are
        reachable before tfds starts (tests pass one that fails).

    Returns:
      The prepared version directory (`<data_dir>/<name>/<version>`).

    Raises:
      ValueError: if `name` is not a tfds dataset or config (naming close matches), or
        if `data_dir` already holds it in another format (the message gives the
        conversion command).
      FileNotFoundError: if `manual_dir` is given but is not a directory, or the manual
        downloads are missing (naming the archives and the folder to put them in).
      ConnectionError: if the download hosts cannot be reached (no network).
    """
    import tensorflow_datasets as tfds

    if manual_dir is not None and not epath.Path(manual_dir).is_dir():
        raise FileNotFoundError(
            f"manual_dir={os.fspath(manual_dir)!r} is not a directory; it should hold the "
            f"manually downloaded archives of {name!r}."
        )
    existing = open_builder(name, data_dir)
    if is_prepared(existing):
        if ARRAY_RECORD in _file_formats(existing):
            logging.info("%s is already prepared as ArrayRecord in %s.", name, existing.data_dir)
            return epath.Path(existing.data_dir)
        root = os.fspath(data_dir_root(existing))
        command = convert_command(name, root, default_converted_dir(root))
        raise ValueError(
            f"{name!r} is already prepared in {existing.data_dir} as "
            f"{existing.info.file_format.value}, which has no random access. Convert it "
            f"without downloading again: `{command}`."
        )
    builder = open_builder(name, data_dir, file_format=ARRAY_RECORD)
    _check_manual_dir(builder, name, manual_dir)
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        _check_reachable(builder, name, connect)
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir),
        # tfds' prepared copies on GCS are TFRecord, which has no random access.
        try_download_gcs=False,
    )
    builder.download_and_prepare(download_config=config)
    return epath.Path(builder.data_dir)


def _copy_shard(source: epath.Path, target: epath.Path, expected: int) -> int:
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    target.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(target), _WRITER_OPTIONS)
    if not writer.ok():
        raise OSError(
            f"cannot create {target}: ArrayRecordWriter writes to local paths only. Convert "
            "into a local data_dir (then copy the folder to cloud storage if needed)."
        )
    count = 0
    try:
        records = tf.data.TFRecordDataset(os.fspath(source), buffer_size=16 << 20)
        # Batched: one eager step per 256 records instead of one per record (~2.5x faster).
        for batch in records.batch(256):
            for record in batch.numpy():  # [<=256] bytes
                writer.write(record)
                count += 1
    except tf.errors.OpError as e:
        raise ValueError(
            f"cannot read shard {source} after {count} records ({e.message}); the source "
            "data is corrupt or truncated. Re-prepare it."
        ) from e
    finally:
        writer.close()
    reader = ArrayRecordReader(os.fspath(target))
    written = reader.num_records()
    reader.close()
    if count != expected or written != expected:
        raise ValueError(
            f"shard {source} holds {count} records (written: {written}) but its "
            f"dataset_info.json says {expected}; the source data is incomplete or corrupt. "
            "Re-prepare it."
        )
    return count


def _is_complete_conversion(version_dir: epath.Path, info: Any) -> bool:
    try:
        data = read_json(version_dir / _DATASET_INFO)
    except (FileNotFoundError, ValueError):
        return False
    if data.get("fileFormat") != ARRAY_RECORD:
        return False
    for split in info.splits.values():
        template = split.filename_template.replace(
            data_dir=version_dir, filetype_suffix=ARRAY_RECORD
        )
        if not all(p.exists() for p in template.sharded_filepaths(split.num_shards)):
            return False
    return True


def convert_to_array_record(
    name: str,
    source_data_dir: epath.PathLike | None,
    data_dir: epath.PathLike,
    *,
    num_workers: int = 8,
) -> epath.Path:
    """Copies a TFRecord-prepared tfds dataset into ArrayRecord files in another data_dir.

    Each TFRecord shard's serialized examples are written, in order, to an ArrayRecord
    shard of the same index, so record `i` of a split is the same example in both and
    no image is decoded or re-encoded. Nothing is downloaded and the source is only
    read. The result is written to `<version>.converting` and renamed to the version
    dir when complete, so an interrupted run never looks prepared; the next run
    starts it over.

    Converting again into a data_dir that already holds a complete conversion of the
    dataset does nothing and returns its path (idempotent); any other existing version
    dir there is an error.

    Args:
      source_data_dir: the data_dir holding the TFRecord version; None = tfds' default.
      data_dir: the data_dir to write into (a local path, as ArrayRecordWriter writes
        local files); must differ from the source. Use it as `config.data.data_dir`.
      num_workers: shards converted concurrently.

    Returns:
      The converted version directory (`<data_dir>/<name>/<version>`).

    Raises:
      ValueError: if `name` is not a tfds dataset, the source already has ArrayRecord
        files or another format, source and target are the same, or a shard is
        unreadable or its record count disagrees with dataset_info.json.
      FileNotFoundError: if the dataset is not prepared in `source_data_dir` or a shard
        listed in its dataset_info.json is missing.
      FileExistsError: if the target version dir exists but is not a complete
        ArrayRecord conversion.
      OSError: if a target shard cannot be created (e.g. a gs:// data_dir).
    """
    source = open_builder(name, source_data_dir)
    source_dir = epath.Path(source.data_dir)
    if not is_prepared(source):
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {source_dir} (source data_dir "
            f"{os.fspath(data_dir_root(source))}), so there is nothing to convert. "
            f"Prepare it directly as ArrayRecord: `{prepare_command(name, os.fspath(data_dir))}`."
        )
    info = source.info
    formats = _file_formats(source)
    if ARRAY_RECORD in formats:
        raise ValueError(
            f"{name!r} in {source_dir} already has ArrayRecord files; no conversion needed: "
            f"set config.data.data_dir={os.fspath(data_dir_root(source))!r}."
        )
    if formats != {TFRECORD}:
        raise ValueError(
            f"{name!r} in {source_dir} is stored as {sorted(formats)}; only TFRecord data can "
            f"be converted. Prepare it again: `{prepare_command(name, os.fspath(data_dir))}`."
        )
    target_dir = epath.Path(data_dir) / info.full_name
    if os.path.realpath(os.fspath(target_dir)) == os.path.realpath(os.fspath(source_dir)):
        raise ValueError(
            f"data_dir={os.fspath(data_dir)!r} is the source data_dir; the conversion writes "
            "a new copy and never modifies the source. Choose another --data_dir."
        )
    if target_dir.exists():
        if _is_complete_conversion(target_dir, info):
            logging.info("%s is already converted to ArrayRecord in %s.", name, target_dir)
            return target_dir
        raise FileExistsError(
            f"{target_dir} exists but is not a complete ArrayRecord conversion of {source_dir}; "
            "delete it or choose another --data_dir."
        )

    work_dir = target_dir.parent / (target_dir.name + _CONVERTING_SUFFIX)
    jobs = []  # (source shard, target shard, expected record count)
    for split in info.splits.values():
        template = split.filename_template
        sources = template.replace(data_dir=source_dir).sharded_filepaths(split.num_shards)
        targets = template.replace(
            data_dir=work_dir, filetype_suffix=ARRAY_RECORD
        ).sharded_filepaths(split.num_shards)
        jobs.extend(zip(sources, targets, split.shard_lengths))
    shard_files = {os.fspath(s) for s, _, _ in jobs}
    missing = [os.fspath(s) for s, _, _ in jobs if not s.exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) listed in {source_dir / _DATASET_INFO} are missing, "
            f"e.g. {missing[0]}; the source data is incomplete. Re-prepare it."
        )

    if work_dir.exists():
        logging.warning("removing %s, left by an interrupted conversion.", work_dir)
        work_dir.rmtree()
    work_dir.mkdir(parents=True)
    total = 0
    with futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending = [pool.submit(_copy_shard, *job) for job in jobs]
        try:
            for done, future in enumerate(futures.as_completed(pending), 1):
                total += future.result()
                logging.log_every_n_seconds(
                    logging.INFO, "converted %d / %d shards of %s", 30, done, len(jobs), name
                )
        except BaseException:
            # Fail fast: drop the queued shards instead of converting them for nothing.
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    # Metadata: every other file of the version dir, then dataset_info.json with the
    # new format (alternative formats dropped: their files are not copied).
    for path in files_under(source_dir):  # no rglob on tfds' gfile backend
        if os.fspath(path) in shard_files or path.name == _DATASET_INFO:
            continue
        destination = work_dir / path.relative_to(source_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.copy(destination)
    metadata = read_json(source_dir / _DATASET_INFO)
    metadata["fileFormat"] = ARRAY_RECORD
    metadata.pop("alternativeFileFormats", None)
    (work_dir / _DATASET_INFO).write_text(json.dumps(metadata, indent=2, sort_keys=True))

    work_dir.rename(target_dir)
    logging.info("converted %d records of %s into %s", total, name, target_dir)
    return target_dir
