"""Forward passes on the GPU match the CPU backend: same random weights, same random images.

The GPU program differs from the CPU one in more than the device: `layers.conv_general_dilated`
picks the native cuDNN convolutions there and the shifted multiply-adds / group-batched / dot
formulations on the CPU (`lax.platform_dependent`), so this also checks that both branches
compute one function. Weights are fan-in scaled and batch-norm statistics random and far from
0 / 1 (tests/test_export.py's `random_variables`), so eval-mode batch norm shows in the logits.

float32 runs under `jax.default_matmul_precision("highest")` on both sides (the GPU would
otherwise use TF32 for convolutions and matrix products): logits within 1e-4 of the largest
logit. bfloat16 (the training dtype) runs at default precision and is compared with the float32
CPU reference, within BF16_TOLERANCE of the largest logit. Why that bound: bf16 keeps 8
significant bits, so every stored activation is rounded by up to 2^-9 (0.2%) of itself, and
these roundings add up through the network's depth; on the CPU the bf16 logits landed 0.5% (of
the largest logit, Xception, batch 2 at 299x299, 2026-11-27) from the float32 ones. The GPU rounds
at other places (cuDNN accumulates in float32 and rounds each convolution's output, XLA fuses
differently), so its error is another draw of the same size; 2% allows four times the CPU's
while catching a wrong layer, whose error is of the order of the logits themselves. (The CPU's
bf16 errors, same set-up: Xception 5.3e-3, 4 segments 4.1e-3, Inception V3 2.6e-3; not
recomputed here, to keep the GPU run short.) Each measured error is recorded
(XJ_GPU_TEST_RECORD).
"""
import functools

import jax
import numpy as np
import pytest

from test_export import make_config, random_variables
from xception_jax import train

pytestmark = pytest.mark.gpu

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
NUM_CLASSES = 1000


def _logits(model, variables, images, device, precision):
  variables, images = jax.device_put((variables, images), device)
  with jax.default_matmul_precision(precision):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


@functools.lru_cache(maxsize=None)
def _reference(name, image_size, settings_items, batch, cpu):
  """(variables, images, float32 CPU logits at highest precision) for one model, computed once."""
  config = make_config(name, image_size, **dict(settings_items))
  config.dtype = "float32"
  model = train.create_model(config, NUM_CLASSES)
  variables = random_variables(model, image_size)
  images = np.random.default_rng(1).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(
      np.float32)
  return variables, images, _logits(model, variables, images, cpu, "highest")


def _relative(a, b, scale):
  return float(np.max(np.abs(a - b)) / scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_index", [0, 1, 2], ids=["xception", "xception-4-segments",
                                                        "inception_v3"])
def test_forward_matches_cpu(setup, record, model_index, dtype):
  name, image_size, settings = setup.parity_models[model_index]
  variables, images, reference = _reference(name, image_size, tuple(sorted(settings.items())),
                                            setup.parity_batch, setup.reference)
  config = make_config(name, image_size, **settings)
  config.dtype = dtype
  model = train.create_model(config, NUM_CLASSES)
  precision = "highest" if dtype == "float32" else "default"
  ours = _logits(model, variables, images, setup.device, precision)
  assert ours.dtype == np.float32 and np.all(np.isfinite(ours))
  scale = float(np.max(np.abs(reference)))
  error = _relative(ours, reference, scale)
  values = {"test": "forward_parity", "model": name, "settings": settings, "dtype": dtype,
            "device": setup.device.device_kind, "image_size": image_size,
            "max_abs_logit": scale, "error_vs_cpu_fp32": error}
  tolerance = FP32_TOLERANCE if dtype == "float32" else BF16_TOLERANCE
  record(**values, tolerance=tolerance)
  assert error <= tolerance
