"""The paper's JFT recipe on the closest public analog, Open Images (multi-label).

RMSprop (TF semantics) with momentum 0.9, lr 0.001 decayed x0.9 every 3,000,000 samples,
sigmoid multi-label loss over all classes, no dropout, MAP@100 eval with classes weighted by how
common they are (like the paper's FastEval14k). `fc` adds the two 4096-wide FC layers of the
paper's figure 7/8 variant. Open Images V4 image-level labels: 19,995 classes (tfds open_images_v4).

  python -m xception_jax.main --config=configs/jft_like.py --workdir=DIR
  python -m xception_jax.main --config=configs/jft_like.py:fc,model=inception_v3 --workdir=DIR
  python -m xception_jax.main --config=configs/jft_like.py:runlocal --workdir=DIR   # CPU, embedded
"""
import os
import sys

import ml_collections

# `configs` importable when this file is loaded from another working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.append(_REPO)

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, fc=False, model="xception")
  c = common.base_config()
  c.model_name = options.model
  c.model = ml_collections.ConfigDict(dict(
      dropout_rate=0.0, fc_layers=(4096, 4096) if options.fc else ()))
  c.dtype = "bfloat16"
  c.dataset = "open_images_v4"
  c.image_size = 299
  c.batch_size = 1024
  c.num_epochs = 30.0
  c.loss = "sigmoid"
  c.optimizer.name = "rmsprop_tf"
  c.optimizer.momentum = 0.9
  c.optimizer.rms_decay = 0.9
  c.optimizer.eps = 1.0
  c.lr.base = 0.001
  c.lr.decay_rate = 0.9
  c.lr.decay_every_samples = 3_000_000
  c.lr.staircase = True
  c.weight_decay = 1e-5
  c.ema.decay = 0.9999
  c.map_class_weighting = "frequency"
  c.best_metric = "eval/ema_map100"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  if options.runlocal:
    common.apply_runlocal(c, multi_label=True)
    c.lr.base = 0.01
  return c.lock()
