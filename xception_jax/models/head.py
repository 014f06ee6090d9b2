"""The classifier head of Xception and Inception V3, written once.

Global average pooling, optional fully connected ReLU layers (the paper's JFT runs use two of
4096), dropout (0.5 in the paper's ImageNet recipe), then the logistic regression: a Dense layer
with bias, the only bias in either network. `classifier_head` is called from inside a module's
compact `__call__`, so its layers are that module's children and keep the Keras names
(`predictions`) that the weight importer (`xception_jax.convert`) matches.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xception_jax.models import layers

CLASSIFIER_NAME = "predictions"


def fc_name(index: int) -> str:
  """Name of the index-th (from 0) fully connected layer before the classifier: fc1, fc2, ..."""
  return f"fc{index + 1}"


def classifier_head(x: jax.Array, *, num_classes: int | None, fc_layers: Sequence[int],
                    dropout_rate: float, train: bool, dtype: Any) -> jax.Array:
  """Logits [B, num_classes] (float32) from the final feature map [B, h, w, C].

  Headless (num_classes 0 or None): the feature map itself, as float32.
  """
  if not num_classes:
    return jnp.asarray(x, jnp.float32)
  x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(dtype)
  for i, features in enumerate(fc_layers):
    x = nn.relu(nn.Dense(features, dtype=dtype, kernel_init=layers.kernel_init,
                         name=fc_name(i))(x))
  if dropout_rate > 0:
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  x = nn.Dense(num_classes, dtype=dtype, kernel_init=layers.kernel_init, name=CLASSIFIER_NAME)(x)
  return jnp.asarray(x, jnp.float32)
