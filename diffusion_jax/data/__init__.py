"""Input pipelines: the paper's preprocessing, datasets, and sharded training batches.

tensorflow / tensorflow_datasets are imported lazily, only when a tfds dataset is
opened, so `import diffusion_jax.data` works without them.
"""

from diffusion_jax.data.builtin import MNIST_5K, Mnist5kSource, load_mnist_5k
from diffusion_jax.data.folder import ImageFolderSource, list_image_files
from diffusion_jax.data.pipeline import InputPipeline, create_input_pipeline
from diffusion_jax.data.prepare import convert_to_array_record, prepare_tfds_dataset
from diffusion_jax.data.preprocessing import (
    UnreadableImageError,
    area_downsample,
    center_crop_arr,
    decode_image,
    lsun_crop_arr,
    random_crop_arr,
    resolve_preprocessing,
    to_float,
)
from diffusion_jax.data.sources import open_source, resolve_source
from diffusion_jax.data.uint8_images import iterate_uint8_images

__all__ = [
    "MNIST_5K",
    "ImageFolderSource",
    "InputPipeline",
    "Mnist5kSource",
    "UnreadableImageError",
    "area_downsample",
    "center_crop_arr",
    "convert_to_array_record",
    "create_input_pipeline",
    "decode_image",
    "iterate_uint8_images",
    "list_image_files",
    "load_mnist_5k",
    "lsun_crop_arr",
    "open_source",
    "prepare_tfds_dataset",
    "random_crop_arr",
    "resolve_preprocessing",
    "resolve_source",
    "to_float",
]
