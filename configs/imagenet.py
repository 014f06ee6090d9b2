"""The paper's ImageNet recipe for Xception (section 4.3 of Chollet 2016).

SGD with momentum 0.9, lr 0.045 decayed x0.94 every 2 epochs (staircase), weight decay 1e-5,
dropout 0.5 before the logistic regression, Polyak averaging (EMA) of the weights for eval,
299x299 inputs, synchronous data-parallel training. The paper does not state its batch size;
1024 here, with lr.base used as is (set lr.reference_batch_size to scale lr with batch_size).

  python -m xception_jax.main --config=configs/imagenet.py --workdir=DIR
  python -m xception_jax.main --config=configs/imagenet.py:runlocal --workdir=DIR   # CPU, embedded data
"""
import os
import sys

import ml_collections

# `configs` importable when this file is loaded from another working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.append(_REPO)

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def recipe(model_name: str, weight_decay: float) -> ml_collections.ConfigDict:
  """The ImageNet recipe shared by Xception and Inception V3 (they differ in weight decay)."""
  c = common.base_config()
  c.model_name = model_name
  c.model = ml_collections.ConfigDict(dict(dropout_rate=0.5))
  c.dtype = "bfloat16"
  c.dataset = "imagenet2012"
  c.image_size = 299
  c.batch_size = 1024
  c.num_epochs = 100.0
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.lr.base = 0.045
  c.lr.decay_rate = 0.94
  c.lr.decay_every_epochs = 2.0
  c.lr.staircase = True
  c.weight_decay = weight_decay
  c.ema.decay = 0.9999
  c.log_every_steps = 100
  c.eval_every_steps = 2500  # about two epochs at batch 1024
  c.checkpoint_every_steps = 1000
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg)
  c = recipe("xception", weight_decay=1e-5)
  if options.runlocal:
    common.apply_runlocal(c)
  return c.lock()
