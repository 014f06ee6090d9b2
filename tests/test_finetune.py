"""configs/finetune.py: it fine-tunes from a Keras file and beats training from scratch.

The pretrained weights must carry information, so they come from a short pre-training run of the
same network (`xception_tiny`) on five classes of the procedural images
(stripes three ways, checkerboard, dots), written out as a Keras-layout `_notop` .h5 file
(tests/keras_reference.py). The fine-tuning task is the other five classes (rings, speckle,
clouds, plain, shape scenes) from another render seed, as an `imagefolder:` dataset, a few
hundred images like a user's small folder. `configs/finetune.py:runlocal` runs on it twice for
the same number of steps: from the Keras file (its recipe: frozen batch norm, a fresh head), and
from scratch (the same recipe with batch norm training, as a network without statistics needs).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import keras_reference
from configs import finetune
from configs import quickstart
from xception_jax import checkpointing
from xception_jax import models
from xception_jax import train
from xception_jax.data import shapes

PRETRAIN_CLASSES = range(0, 5)
FINETUNE_CLASSES = range(5, 10)
IMAGE_SIZE = 72


def render_folder(root, classes, counts: dict[str, int], seed: int) -> str:
  """ROOT/split/CLASS/*.jpg with `counts[split]` images of `classes` (shapes.py's renders)."""
  for offset, (split, count) in enumerate(counts.items()):
    index = made = 0
    while made < count:
      image, label = shapes.render_single_label(seed + offset, index)
      index += 1
      if label in classes:
        folder = os.path.join(root, split, shapes.SINGLE_LABEL_CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{index}.jpg"), quality=92)
        made += 1
  return str(root)


@pytest.mark.parametrize("name", ["xception_tiny", "inception_v3_tiny"])
def test_frozen_batch_norm_trains_with_the_eval_computation(name):
  """With frozen_batch_norm, train=True computes exactly what eval does (moving statistics, no
  batch statistics, nothing to update); without it, it does not. Compared as traced programs,
  which needs no compilation."""
  images = jax.ShapeDtypeStruct((4, 75, 75, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: models.create(name, num_classes=3).init(
      jax.random.PRNGKey(0), x, train=False), images)

  def program(frozen, train):
    model = models.create(name, num_classes=3, frozen_batch_norm=frozen)
    if train:
      return str(jax.make_jaxpr(lambda v, x: model.apply(
          v, x, train=True, mutable=["batch_stats"])[0])(variables, images))
    return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images))

  assert program(frozen=True, train=True) == program(frozen=True, train=False)
  assert program(frozen=False, train=True) != program(frozen=False, train=False)


def test_finetune_config_recipe():
  config = finetune.get_config()
  assert (config.model_name, config.init_from, config.dataset) == (
      "xception", "keras:xception_notop", "")
  assert config.model.frozen_batch_norm and config.model.dropout_rate == 0.2
  assert (config.optimizer.name, config.lr.base, config.lr.reference_batch_size,
          config.lr.schedule, config.weight_decay) == ("sgd", 0.1, 256, "cosine", 0.0)
  local = finetune.get_config("runlocal,model=inception_v3")
  assert (local.model_name, local.init_from, local.dataset, local.image_size) == (
      "inception_v3", "keras:inception_v3_notop", "embedded_shapes", 128)
  with pytest.raises(ValueError, match="config.model_name='xception_tiny'"):
    train.validate_config(_with(local, model_name="xception_tiny"), 8, 1)


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.slow
def test_finetune_runlocal_from_a_keras_file_beats_scratch(tmp_path):
  """Slow: about 6 minutes on a shared 2-core CPU (load 8-10), 2026-11-27. Figures then (eval
  top-1 of the EMA weights on 200 images, 5 classes): pre-training 0.840; after 100 fine-tuning
  steps, from the Keras file 0.450, from scratch 0.220 (chance 0.2). Deterministic on a machine.
  """
  pre_root = render_folder(tmp_path / "pre", PRETRAIN_CLASSES, {"train": 600, "val": 100}, 101)
  ft_root = render_folder(tmp_path / "ft", FINETUNE_CLASSES, {"train": 320, "val": 200}, 201)
  data_dir = str(tmp_path / "tfds")

  # Pre-training: the quickstart recipe on the tiny network, five classes.
  pre = _with(quickstart.get_config("runlocal"), dataset=f"imagefolder:{pre_root}",
              data_dir=data_dir, image_size=IMAGE_SIZE, total_steps=150, eval_every_steps=150,
              checkpoint_every_steps=150, log_every_steps=50, **{"lr.schedule": "cosine"})
  pre_result = train.train_and_evaluate(pre, str(tmp_path / "pre_run"))
  state = checkpointing.load_variables(str(tmp_path / "pre_run"), use_ema=True)
  keras_file = keras_reference.save_as_keras_h5(
      models.create("xception_tiny", num_classes=5), state, tmp_path / "pre_notop.h5",
      include_top=False)

  def run(name, **overrides):
    config = _with(finetune.get_config("runlocal"), model_name="xception_tiny",
                   dataset=f"imagefolder:{ft_root}", data_dir=data_dir, image_size=IMAGE_SIZE,
                   total_steps=100, eval_every_steps=100, checkpoint_every_steps=100, **overrides)
    return train.train_and_evaluate(config, str(tmp_path / name))

  tuned = run("finetune", init_from=str(keras_file))
  scratch = run("scratch", init_from="", **{"model.frozen_batch_norm": False})
  figures = (f"pre-training eval top-1 {pre_result['eval/ema_top1']:.3f}; fine-tuning 100 steps: "
             f"from the Keras file {tuned['eval/ema_top1']:.3f} (raw {tuned['eval/top1']:.3f}), "
             f"from scratch {scratch['eval/ema_top1']:.3f} (raw {scratch['eval/top1']:.3f})")
  print(figures)
  assert pre_result["eval/ema_top1"] > 0.6, figures  # the file carries real information
  assert tuned["eval/ema_top1"] > scratch["eval/ema_top1"] + 0.1, figures
