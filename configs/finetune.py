"""Fine-tuning from Keras's ImageNet weights on your own images (or any dataset string).

  python -m xception_jax.main --config=configs/finetune.py --workdir=/tmp/ft \
      --config.dataset=imagefolder:$HOME/photos
  python -m xception_jax.main --config=configs/finetune.py:runlocal --workdir=/tmp/ft_cpu \
      --config.dataset=imagefolder:$HOME/photos          # a small folder on a laptop CPU
  python -m xception_jax.main --config=configs/finetune.py:model=inception_v3 --workdir=...

Arguments (after ':'): model=xception|inception_v3, runlocal. Without a --config.dataset,
`runlocal` uses the embedded shapes (so it runs as is) and the full recipe stops with an error
asking for one. The weights come from `keras:xception_notop` (or `keras:inception_v3_notop`):
fetched from the URL Keras uses, checked against Keras's md5 and cached in ~/.keras/models/.

Where each choice comes from:
  * The body starts from ImageNet weights without Keras's classifier (the `_notop` file, as
    `include_top=False` in Keras's transfer-learning guide,
    https://keras.io/guides/transfer_learning/), and the new classifier is initialised as Keras's
    `Dense` is (glorot-uniform kernel, zero bias) with dropout 0.2 before it (the guide's head).
  * Batch norm is frozen: it normalises with the ImageNet moving statistics and does not update
    them (`model.frozen_batch_norm`); its scale and offset still train. The Keras guide keeps
    batch norm "in inference mode" when fine-tuning, because small batches of a new dataset
    would otherwise replace well-estimated statistics with noisy ones and wreck the pretrained
    features in the first steps.
  * The whole network trains from the first step (the guide's second phase, without its first
    phase of training the head alone; timm's train.py fine-tunes the whole network,
    https://huggingface.co/docs/timm/training_script), with SGD and momentum 0.9 (timm's default
    optimizer; the BiT fine-tuning rule, Kolesnikov et al. 2020, arXiv:1912.11370, uses the same)
    at timm's default base rate, 0.1 per 256 images scaled linearly with the batch (0.025 at batch
    64, 0.00625 at 16), about half the paper's from-scratch 0.045. Ten times lower (0.01 per 256)
    left the new head nearly untrained after 100 steps in tests/test_finetune.py's setting (eval
    top-1 0.39 against 0.455; 0.3 per 256 gave 0.70 there, but that is above the from-scratch
    rate, which risks destroying the pretrained features of a network this size).
  * Cosine decay after a linear warm-up of one epoch (timm's default `--sched cosine` with
    `--warmup-epochs`; BiT warms up linearly too): the warm-up keeps the first, large gradients of
    the random head from disturbing the pretrained body.
  * No weight decay (BiT: fine-tuning needs no regularisation towards zero), 15 epochs (the
    guide trains 20 + 10 epochs on 23,000 images; BiT runs 500-20,000 steps by dataset size),
    299x299 (the size the weights were trained at; the guide uses 150x150 to be quick), batch 64.
    EMA of the weights (decay 0.999 with TF's warm-up) for evaluation, as in the other recipes.
  * runlocal: batch 16 at 128x128, 200 steps, warm-up over the first 20: a few minutes on a
    laptop CPU (about 150 GFLOP per step for Xception).
"""
import os
import sys

import ml_collections

# `configs` importable when this file is loaded from another working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.append(_REPO)

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_KERAS_WEIGHTS = {"xception": "keras:xception_notop", "inception_v3": "keras:inception_v3_notop"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, model="xception")
  if options.model not in _KERAS_WEIGHTS:
    raise ValueError(f"configs/finetune.py: model={options.model!r}; valid: "
                     f"{sorted(_KERAS_WEIGHTS)}.")
  c = common.base_config()
  c.model_name = options.model
  c.model = ml_collections.ConfigDict(dict(dropout_rate=0.2, frozen_batch_norm=True))
  c.init_from = _KERAS_WEIGHTS[options.model]
  c.dataset = ""  # required: --config.dataset=imagefolder:ROOT (or any dataset string)
  c.image_size = 299
  c.batch_size = 64
  c.num_epochs = 15.0
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.lr.base = 0.1
  c.lr.reference_batch_size = 256
  c.lr.schedule = "cosine"
  c.lr.warmup_epochs = 1.0
  c.weight_decay = 0.0
  c.ema.decay = 0.999
  c.log_every_steps = 20
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  if options.runlocal:
    c.dataset = "embedded_shapes"  # the default only: --config.dataset=... still applies
    c.image_size = 128
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 200
    c.lr.warmup_steps = 20  # one epoch of a 320-image folder; embedded_shapes has 3,000
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
  return c.lock()
