"""TensorFlow runs on the host CPU only: in the input pipeline and the SavedModel export.

A GPU build of TensorFlow (the `tensorflow` package on a machine with NVIDIA GPUs) claims the
memory of every visible GPU at its first op, memory that JAX needs for the model. So TensorFlow
is shown no accelerators: `hide_accelerators()` runs right after TensorFlow is imported by the
modules that use it, before any TensorFlow op. JAX is not affected (it enumerates devices itself).
"""
from __future__ import annotations

import logging

import tensorflow as tf


def hide_accelerators() -> None:
  """Makes GPUs (and TPUs) invisible to TensorFlow in this process; a no-op on CPU-only builds."""
  for kind in ("GPU", "TPU"):
    if not tf.config.list_physical_devices(kind):
      continue
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError as e:  # TensorFlow already initialised its devices (an op ran earlier)
      logging.warning("Could not hide the %ss from TensorFlow (%s); it may hold accelerator memory "
                      "that JAX needs.", kind, e)
