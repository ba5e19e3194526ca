"""Training input pipeline: seeded order, per-host shards, exact resume, prefetching.

Every source is random access, so the order is a pure function of (seed, epoch): each
epoch every host computes the same seeded permutation of all records, cuts it into
global batches (per-process batch x process count records; a partial last one is
dropped) and host p reads the p-th block of each. Hosts therefore read disjoint records
that together cover the epoch, and the global batch - the hosts' batches in process
order - is the same records in the same order whatever the number of processes, so a
multi-process run trains exactly as a single-process one. Augmentation draws come from a
generator seeded by (seed, epoch, record index), independent of thread scheduling. The
position - (epoch, records consumed this epoch) - is a pair of ints: saved with a
checkpoint and restored with `set_state`, the pipeline yields exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import weakref
from concurrent import futures
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from diffusion_jax import parallel
from diffusion_jax.data.preprocessing import (
    UnreadableImageError,
    area_downsample,
    center_crop_arr,
    prepare_source_image,
    random_crop_arr,
    resolve_preprocessing,
    to_float,
)
from diffusion_jax.data.sources import ImageSource, open_source

# Stream ids keep the order generator and the augmentation generators independent.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


@dataclasses.dataclass(eq=False)
class _BatchProducer:
    """Makes this host's batches from a position; runs in the background thread.

    Kept apart from `InputPipeline` so the thread holds no reference to the pipeline:
    an abandoned pipeline can then be garbage-collected, which stops the thread.
    """

    source: ImageSource
    image_size: int
    batch_size: int
    seed: int
    class_cond: bool
    random_crop: bool
    random_flip: bool
    shuffle: bool
    low_res_size: int
    preprocessing: str  # resolved: 'standard' or 'lsun'
    process_index: int
    process_count: int
    num_threads: int
    num_classes: int | None = None

    def __post_init__(self):
        # Each epoch, the seeded order is cut into global batches of
        # batch_size * process_count records (a partial last one is dropped) and host p
        # reads the p-th block of batch_size records of each: the global batch is then
        # the same records in the same order whatever the process count.
        global_batch = self.batch_size * self.process_count
        self.records_per_epoch = (len(self.source) // global_batch) * self.batch_size  # per host

    # ----- order and examples (pure functions of seed, epoch, index) ----------------

    def epoch_indices(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        if self.shuffle:
            order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(n)
        else:
            order = np.arange(n)
        usable = self.records_per_epoch * self.process_count
        blocks = order[:usable].reshape(-1, self.process_count, self.batch_size)
        return blocks[:, self.process_index].reshape(-1)

    def _load_example(self, epoch: int, index: int) -> tuple[np.ndarray, int] | None:
        try:
            image, label = self.source[int(index)]
        except UnreadableImageError as e:
            logging.warning("skipping unreadable image (epoch %d, record %d): %s", epoch, index, e)
            return None
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, epoch, int(index)])
        image = prepare_source_image(image, self.image_size, self.preprocessing)
        if self.random_crop:
            arr = random_crop_arr(image, self.image_size, rng)
        else:
            arr = center_crop_arr(image, self.image_size)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        # Converted here, in the decoding threads, rather than per batch afterwards.
        return to_float(arr), label  # [S, S, 3] float32

    def _assemble(self, examples: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
        images = np.stack([a for a, _ in examples])  # [B, S, S, 3] float32
        batch = {"image": images}
        if self.class_cond:
            batch["label"] = np.asarray([label for _, label in examples], np.int32)  # [B]
            check_labels(batch["label"], self.num_classes)
        if self.low_res_size:
            batch["low_res"] = area_downsample(images, self.low_res_size)  # [B, s, s, 3]
        return batch

    # ----- background production -----------------------------------------------------

    def run(self, state: dict[str, int], out: queue.Queue, stop: threading.Event) -> None:
        """Puts (batch, position after it) into `out` until `stop` is set.

        An exception is put into `out` instead, for the consumer to re-raise.
        """
        epoch, position, skipped = state["epoch"], state["position"], state["skipped"]
        order = self.epoch_indices(epoch)
        bad_in_a_row = 0
        try:
            with futures.ThreadPoolExecutor(self.num_threads) as pool:
                while not stop.is_set():
                    examples: list[tuple[np.ndarray, int]] = []
                    while len(examples) < self.batch_size:
                        if stop.is_set():
                            return
                        # Take exactly the records still needed, so the position after
                        # a batch does not depend on thread timing.
                        chunk = []
                        while len(chunk) < self.batch_size - len(examples):
                            if position == len(order):
                                epoch, position = epoch + 1, 0
                                order = self.epoch_indices(epoch)
                            chunk.append((epoch, order[position]))
                            position += 1
                        loaded = list(pool.map(lambda ei: self._load_example(*ei), chunk))
                        for item in loaded:
                            if item is None:
                                skipped += 1
                                bad_in_a_row += 1
                            else:
                                examples.append(item)
                                bad_in_a_row = 0
                        if bad_in_a_row >= self.records_per_epoch:
                            raise ValueError(
                                f"a whole epoch ({self.records_per_epoch} records) of the "
                                "dataset was unreadable; check the data files."
                            )
                    new_state = {"epoch": epoch, "position": position, "skipped": skipped}
                    _put(out, stop, (self._assemble(examples), new_state))
        except Exception as e:  # handed to the consumer, which re-raises it
            _put(out, stop, e)


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
    # Also the finalizer of an abandoned pipeline, so it must not reference it.
    stop.set()
    if thread is not threading.current_thread():  # a gc pass can run on any thread
        thread.join()


class InputPipeline:
    """An endless iterator of training batches with a checkpointable position.

    Batches are dicts: `image` float32 [B, S, S, 3] in [-1, 1]; `label` int32 [B] when
    class-conditional; `low_res` float32 [B, s, s, 3] for super-resolution. With a mesh
    they are global `jax.Array`s sharded over the batch axis (B = global batch);
    without, numpy arrays of this process's share.

    The first `next()` starts a background thread that prepares batches ahead. It is
    stopped by `close()`, by leaving a `with` block (`with create_input_pipeline(...) as
    it:`), or, failing both, when the pipeline is garbage-collected. After `close()` the
    pipeline can still be used: the next `next()` restarts the thread where it stopped.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        image_size: int,
        batch_size: int,
        seed: int,
        class_cond: bool = False,
        random_crop: bool = False,
        random_flip: bool = True,
        shuffle: bool = True,
        low_res_size: int = 0,
        preprocessing: str = "auto",
        process_index: int = 0,
        process_count: int = 1,
        mesh: Mesh | None = None,
        prefetch: int = 2,
        device_prefetch: int = 2,
        num_threads: int = 4,
        num_classes: int | None = None,
    ):
        """Configures the pipeline; reading starts at the first `next()`.

        Args:
          source: a random-access source (`open_source`).
          batch_size: this process's examples per batch.
          seed: fixes the order and the augmentation.
          shuffle: reshuffle every epoch; False reads records in dataset order.
          low_res_size: if > 0, add `low_res`, the area-downsampled image.
          preprocessing: 'standard', 'lsun' or 'auto' ('lsun' for a tfds LSUN source);
            see `resolve_preprocessing`.
          process_index: this host's index (multi-host); tests simulate hosts with it.
          mesh: if given, batches become global arrays split over its devices.
          prefetch: host batches prepared ahead in the background thread.
          device_prefetch: batches transferred to devices ahead of use (with a mesh).
          num_classes: the model's class count (`model.num_classes`): a labelled source
            with more classes is refused here, and every batch's labels are checked to
            lie in [0, num_classes) before they reach a device (a label equal to
            num_classes would silently be the classifier-free guidance null class).
            None: no check.

        Raises:
          ValueError: for inconsistent arguments (names the argument).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size (per process) must be positive, got {batch_size}.")
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index} must be in [0, process_count={process_count})."
            )
        if len(source) < batch_size * process_count:
            raise ValueError(
                f"the dataset has {len(source)} records, fewer than one global batch "
                f"({batch_size} per process x {process_count} processes); use a smaller "
                "training.batch_size or more data."
            )
        if class_cond and source.num_classes <= 0:
            raise ValueError(
                "config.data.class_cond=True but the dataset has no class labels; set "
                "class_cond=False or use labelled data (folder: name files CLASS_xxx.jpg)."
            )
        if class_cond and num_classes is not None and source.num_classes > num_classes:
            raise ValueError(
                f"the dataset has {source.num_classes} classes but model.num_classes="
                f"{num_classes}; set --config.model.num_classes={source.num_classes} (or use "
                f"data with at most {num_classes} classes)."
            )
        self._producer = _BatchProducer(
            source,
            image_size=image_size,
            batch_size=batch_size,
            seed=seed,
            class_cond=class_cond,
            random_crop=random_crop,
            random_flip=random_flip,
            shuffle=shuffle,
            low_res_size=low_res_size,
            # Only tfds sources have a `name`; folders and mnist_5k resolve to 'standard'.
            preprocessing=resolve_preprocessing(preprocessing, getattr(source, "name", "")),
            process_index=process_index,
            process_count=process_count,
            num_threads=max(1, num_threads),
            num_classes=num_classes if class_cond else None,
        )
        self.mesh = mesh
        self.prefetch = max(1, prefetch)
        self.device_prefetch = max(1, device_prefetch)
        self._state = {"epoch": 0, "position": 0, "skipped": 0}
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None
        self._host_queue: queue.Queue = queue.Queue(self.prefetch)
        self._device_queue: collections.deque = collections.deque()

    @property
    def source(self) -> ImageSource:
        """The dataset read."""
        return self._producer.source

    @property
    def preprocessing(self) -> str:
        """The route taken: 'standard' or 'lsun' (`resolve_preprocessing`)."""
        return self._producer.preprocessing

    @property
    def records_per_epoch(self) -> int:
        """Records this host reads per epoch."""
        return self._producer.records_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Record indices this host reads in `epoch`, in reading order."""
        return self._producer.epoch_indices(epoch)

    # ----- background thread ------------------------------------------------------------

    def _start(self) -> None:
        stop = threading.Event()
        self._host_queue = queue.Queue(self.prefetch)
        self._device_queue.clear()
        self._thread = threading.Thread(
            target=self._producer.run,
            args=(dict(self._state), self._host_queue, stop),
            daemon=True,
            name="input_pipeline",
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_thread, stop, self._thread)

    def close(self) -> None:
        """Stops the background thread and drops prefetched batches."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_thread once and unregisters it
            self._finalizer = None
        self._thread = None
        self._device_queue.clear()

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----- iterator protocol and position ---------------------------------------------

    def __iter__(self) -> InputPipeline:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._start()
        while len(self._device_queue) < self.device_prefetch:
            item = self._host_queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
            batch, state = item
            if self.mesh is not None:
                # Starts the host->device copy now; the step that uses it comes later.
                batch = parallel.host_to_global(batch, self.mesh)
            self._device_queue.append((batch, state))
        batch, self._state = self._device_queue.popleft()
        return batch

    def get_state(self) -> dict[str, int]:
        """The position after the last batch returned: save it with a checkpoint.

        Returns:
          {'epoch', 'position' (records of this host's epoch consumed), 'skipped'
          (unreadable records so far)}: plain ints, JSON-serialisable.
        """
        return dict(self._state)

    def set_state(self, state: dict[str, int]) -> None:
        """Moves to a position from `get_state`; the next batch follows it exactly."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"pipeline state {state} lacks {sorted(missing)}; use get_state().")
        self.close()
        self._state = {k: int(state.get(k, 0)) for k in ("epoch", "position", "skipped")}

    @property
    def num_skipped(self) -> int:
        """Unreadable records skipped up to the last batch returned."""
        return self._state["skipped"]


def check_labels(labels: np.ndarray, num_classes: int | None) -> None:
    """Raises ValueError unless every label lies in [0, num_classes) (None: no check).

    Done in numpy on the host, before the batch goes to a device: inside the jitted step
    an out-of-range label is an out-of-bounds embedding lookup (NaN or clamped), and
    `num_classes` itself is the null class of classifier-free guidance.
    """
    if num_classes is None or labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"a batch holds label {bad}, outside [0, model.num_classes={num_classes}); set "
            "model.num_classes to the dataset's class count or fix the labels."
        )


def create_input_pipeline(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    mesh: Mesh | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    low_res_size: int | None = None,
    num_threads: int = 4,
    num_classes: int | None = None,
) -> InputPipeline:
    """Builds the training pipeline described by `config.data`.

    Args:
      data_config: `config.data` (dataset, data_dir, split, image_size, class_cond,
        random_crop, random_flip, shuffle_buffer (0 = no shuffle; otherwise a full
        per-epoch shuffle, as random access allows), prefetch, low_res_size,
        preprocessing ('auto' when absent: the paper's LSUN preparation for
        'lsun/<category>', its standard loader otherwise)).
      global_batch_size: `config.training.batch_size`, over all hosts.
      seed: `config.seed`.
      mesh: yields global sharded arrays on it; None yields this host's numpy share.
      process_index, process_count: default `jax.process_index()` / `process_count()`.
      low_res_size: overrides `data_config.low_res_size` (super-resolution input side).
      num_classes: labels are checked against it (see `InputPipeline`).

    Returns:
      An `InputPipeline` (iterator with `get_state` / `set_state` / `close`); use it as
      a context manager, `with create_input_pipeline(...) as batches:`, to stop its
      background thread on exit.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if mesh is not None:
        parallel.check_global_batch(global_batch_size, mesh)
    if global_batch_size % process_count:
        raise ValueError(
            f"batch_size={global_batch_size} must be divisible by the number of processes "
            f"({process_count})."
        )
    if low_res_size is None:
        low_res_size = int(data_config.get("low_res_size", 0) or 0)
    source = open_source(
        data_config.dataset,
        data_dir=data_config.data_dir,
        split=data_config.split,
        class_cond=data_config.class_cond,
    )
    return InputPipeline(
        source,
        image_size=data_config.image_size,
        batch_size=global_batch_size // process_count,
        seed=seed,
        class_cond=data_config.class_cond,
        random_crop=data_config.random_crop,
        random_flip=data_config.random_flip,
        shuffle=data_config.shuffle_buffer != 0,
        low_res_size=low_res_size,
        preprocessing=resolve_preprocessing(
            data_config.get("preprocessing", "auto"), data_config.dataset
        ),
        process_index=process_index,
        process_count=process_count,
        mesh=mesh,
        prefetch=data_config.prefetch,
        num_threads=num_threads,
        num_classes=num_classes,
    )
