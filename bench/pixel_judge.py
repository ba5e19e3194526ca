"""A pixel-level judge of quickstart samples, independent of this project's networks.

The quickstart's own judge is a convolutional classifier this project trains. This one
is scikit-learn's multinomial logistic regression on raw pixels (16 x 16 x 3, scaled to
[0, 1]), fitted on the same `mnist_5k` training digits: a linear read of the pixels
that, unlike a convolutional network, is thrown off by a coloured background (the kind
of judge issue 19 was filed with). For each sample set of a quickstart workdir it
prints how often the requested digit is recognised, on the images as they are and with
each image's background (its median pixel per channel) subtracted first.

Usage (from the repository root, after `python -m launch.quickstart --workdir=DIR`):
  PYTHONPATH=. python bench/pixel_judge.py DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from etils import epath

from configs import quickstart
from diffusion_jax.quickstart import job

SETS = ("unguided", "guided", "cfg")


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _background_removed(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64)
    x = x - np.median(x, axis=(1, 2), keepdims=True)
    return np.clip(x, 0, 255).astype(np.uint8)


def fit_judge():
    from sklearn.linear_model import LogisticRegression

    config = quickstart.get_config()
    train_x, train_y = job._split_images(config, config.data.split)
    test_x, test_y = job._split_images(config, config.data.eval_split)
    judge = LogisticRegression(C=0.1, max_iter=2000).fit(_features(train_x), train_y)
    return judge, float(np.mean(judge.predict(_features(test_x)) == test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    args = parser.parse_args()
    judge, test_accuracy = fit_judge()
    print(json.dumps({"judge": "pixel logistic regression", "test_accuracy": test_accuracy}))
    for workdir in args.workdirs:
        row = {"workdir": workdir}
        for name in SETS:
            path = epath.Path(workdir) / f"samples_{name}.npz"
            if not path.exists():
                continue
            images, labels = job._read_npz(path)
            row[name] = round(float(np.mean(judge.predict(_features(images)) == labels)), 3)
            flat = judge.predict(_features(_background_removed(images)))
            row[f"{name}_bg_removed"] = round(float(np.mean(flat == labels)), 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
