"""The same ImageNet recipe for Inception V3 (no auxiliary tower), with weight decay 4e-5.

  python -m xception_jax.main --config=configs/inception_v3_imagenet.py --workdir=DIR
"""
import os
import sys

import ml_collections

# `configs` importable when this file is loaded from another working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.append(_REPO)

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import imagenet  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg)
  c = imagenet.recipe("inception_v3", weight_decay=4e-5)
  if options.runlocal:
    common.apply_runlocal(c)
  return c.lock()
