"""Entry point of a training run: `python train/train.py CONFIG.yaml [--set key=value ...]`.

The same as `jais2 train`, usable from a checkout without installing the package. On a TPU pod or
a multi-host GPU cluster every host runs this same command (see launch_tpu_pod.sh); the
distributed runtime starts itself when a multi-host launch is detected.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jais2_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
