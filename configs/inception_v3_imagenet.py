"""The same ImageNet recipe for Inception V3 (no auxiliary tower), with weight decay 4e-5.

  python -m xception_jax.main --config=configs/inception_v3_imagenet.py --workdir=DIR
"""
import ml_collections

from configs import common
from configs import imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg)
  c = imagenet.recipe("inception_v3", weight_decay=4e-5)
  if options.runlocal:
    common.apply_runlocal(c)
  return c.lock()
