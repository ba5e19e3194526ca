"""Input-pipeline throughput on ImageNet-style JPEGs (images/s), with the paper code's.

Writes N photographic JPEGs (crops of scikit-learn's sample photographs at ImageNet-like
sizes, ~300-500 px a side) to a temporary folder, then measures, in one run:
  * `InputPipeline` (folder source, image_size 256, random flip) for several thread counts;
  * `iterate_uint8_images` (sequential center crops, as for FID reference batches);
  * the paper code's `ImageDataset.__getitem__` in a plain loop (one process), the work
    one of its DataLoader workers does per image.
Warm-up excluded; median of repeats.

Usage (from the repository root):
  PYTHONPATH=. python bench/bench_data.py [--num_images=512] [--repeats=3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import types

import numpy as np
from etils import epath
from PIL import Image

from diffusion_jax.data import ImageFolderSource, InputPipeline, iterate_uint8_images


def write_jpegs(root: epath.Path, num_images: int, seed: int = 0) -> float:
    """Writes `num_images` JPEG crops of real photographs; returns their mean pixel count."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        sys.exit("needs scikit-learn (requirements-dev.txt) for its sample photographs")
    images_dir = epath.Path(spec.origin).parent / "datasets" / "images"
    photos = [Image.open(images_dir / n).convert("RGB") for n in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    pixels = []
    for i in range(num_images):
        photo = photos[i % 2]
        w, h = int(rng.integers(300, 501)), int(rng.integers(260, 441))  # ImageNet-like
        # A random crop of 60-100% of the photo, rescaled to (w, h): real content, and the
        # JPEG decoder and resizer see photographic statistics rather than flat shapes.
        cw = int(photo.width * rng.uniform(0.6, 1.0))
        ch = int(photo.height * rng.uniform(0.6, 1.0))
        x, y = (
            int(rng.integers(0, photo.width - cw + 1)),
            int(rng.integers(0, photo.height - ch + 1)),
        )
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        img.save(root / f"n{i % 10:08d}_{i}.JPEG", format="JPEG", quality=90)
        pixels.append(w * h)
    return float(np.mean(pixels))


def time_pipeline(root, image_size, batch_size, num_batches, num_threads, repeats):
    rates = []
    source = ImageFolderSource(root, class_cond=True)
    for r in range(repeats):
        p = InputPipeline(
            source,
            image_size=image_size,
            batch_size=batch_size,
            seed=r,
            class_cond=True,
            num_threads=num_threads,
            prefetch=2,
        )
        next(p)  # warm-up: thread start, first decodes
        start = time.perf_counter()
        for _ in range(num_batches):
            next(p)
        rates.append(num_batches * batch_size / (time.perf_counter() - start))
        p.close()
    return statistics.median(rates)


def time_uint8(root, image_size, num_threads, repeats):
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(
            len(b)
            for b in iterate_uint8_images(
                str(root), image_size, batch_size=64, num_threads=num_threads
            )
        )
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def time_paper_code(root, image_size, num_images, repeats):
    sys.modules.setdefault("mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace()))
    from guided_diffusion import image_datasets

    files = [str(f) for f in ImageFolderSource(root).files][:num_images]
    dataset = image_datasets.ImageDataset(image_size, files)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=str, default="1,2,4", help="Decode-thread counts, e.g. 1,4,8,16."
    )
    args = parser.parse_args()

    import jax
    import PIL

    with tempfile.TemporaryDirectory() as tmp:
        root = epath.Path(tmp)
        mean_pixels = write_jpegs(root, args.num_images)
        num_batches = max(1, args.num_images // args.batch_size - 1)
        rows = []
        thread_counts = [int(n) for n in args.threads.split(",")]
        for threads in thread_counts:
            rate = time_pipeline(
                root, args.image_size, args.batch_size, num_batches, threads, args.repeats
            )
            rows.append((f"InputPipeline, {threads} decode thread(s)", rate))
        top = max(thread_counts)
        rows.append(
            (
                f"iterate_uint8_images, {top} threads",
                time_uint8(root, args.image_size, top, args.repeats),
            )
        )
        rows.append(
            (
                "paper ImageDataset, 1 process (loop)",
                time_paper_code(root, args.image_size, 256, args.repeats),
            )
        )

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, jax {jax.__version__}, pillow {PIL.__version__}"
    )
    print(
        f"{args.num_images} JPEGs, mean {mean_pixels:,.0f} px "
        "(ImageNet train averages ~400x350), quality 90; "
        f"image_size {args.image_size}, batch {args.batch_size}, median of {args.repeats}"
    )
    print(f"| {'pipeline':<40} | images/s |")
    print(f"|{'-' * 42}|---------:|")
    for name, rate in rows:
        print(f"| {name:<40} | {rate:8.1f} |")


if __name__ == "__main__":
    main()
