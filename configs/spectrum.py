"""Xception with the spectrum knobs: the points between Inception modules and depthwise separable
convolutions that the paper left open, on the ImageNet recipe.

Arguments (after ':'): segments=N|depthwise (channel segments of every separable layer's spatial
conv; 1 = a full 3x3 conv), order=depthwise_first|pointwise_first, mid_activation=none|relu|elu,
residual=true|false, budget=params|none (params: widths re-solved so that every point has
Xception's parameter count, within 1%), runlocal.

  python -m xception_jax.main --config=configs/spectrum.py:segments=4,budget=params --workdir=DIR
  python -m xception_jax.main --config=configs/spectrum.py:segments=8,runlocal --workdir=DIR
"""
import os
import sys

import ml_collections
from ml_collections import config_dict

# `configs` importable when this file is loaded from another working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.append(_REPO)

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import imagenet  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, segments="depthwise", order="depthwise_first",
                             mid_activation="none", residual=True, budget="none")
  c = imagenet.recipe("xception", weight_decay=1e-5)
  c.model = ml_collections.ConfigDict(dict(
      dropout_rate=0.5,
      segments=str(options.segments),  # "depthwise" or a number; a string so overrides parse
      order=options.order,
      mid_activation=options.mid_activation,
      residual=bool(options.residual),
      budget=config_dict.placeholder(str) if options.budget == "none" else options.budget,
  ))
  if options.runlocal:
    common.apply_runlocal(c)
  return c.lock()
