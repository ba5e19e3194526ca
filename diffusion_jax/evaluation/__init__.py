"""The paper's evaluator (FID, sFID, Inception Score, Precision/Recall) without TensorFlow."""

from diffusion_jax.evaluation.evaluator import (
    EvaluationResult,
    ReferenceEvaluator,
    activations_and_statistics,
    evaluate_npz,
    evaluation_sizes,
    write_reference_batch,
)
from diffusion_jax.evaluation.features import (
    ClassifierFeatures,
    FeatureNetwork,
    Inception,
    check_images,
    compute_features,
    compute_statistics,
    load_classifier_features,
    load_inception,
)
from diffusion_jax.evaluation.inception import InceptionV3FID, preprocess, resize_bilinear_tf1
from diffusion_jax.evaluation.inception_weights import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    fetch_default_weights,
    read_state_dict,
    save_inception_npz,
    state_dict_to_params,
)
from diffusion_jax.evaluation.metrics import (
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)
from diffusion_jax.evaluation.npz_io import ImageNpz, NpzReadError, open_image_npz

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "ClassifierFeatures",
    "EvaluationResult",
    "FeatureNetwork",
    "ImageNpz",
    "Inception",
    "InceptionV3FID",
    "NpzReadError",
    "ReferenceEvaluator",
    "activations_and_statistics",
    "check_images",
    "compute_features",
    "compute_statistics",
    "evaluate_npz",
    "evaluation_sizes",
    "fetch_default_weights",
    "frechet_distance",
    "inception_score",
    "load_classifier_features",
    "load_inception",
    "manifold_radii",
    "open_image_npz",
    "pairwise_distances",
    "precision_recall",
    "preprocess",
    "read_state_dict",
    "resize_bilinear_tf1",
    "save_inception_npz",
    "state_dict_to_params",
    "write_reference_batch",
]
