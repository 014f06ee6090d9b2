"""An export written in a GPU process loads and predicts on a machine without one.

The variables live on the GPU (as a trained state does) when `export.write_export` writes them;
a fresh process with JAX_PLATFORMS=cpu, standing in for a CPU-only machine, loads the export with
`export.load` and predicts. Its logits must match the GPU's own float32 forward pass (highest
precision) within 1e-4 of the largest logit.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_export import make_config, random_variables
from xception_jax import export
from xception_jax import train

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-4
NUM_CLASSES = 10

_PREDICT_ON_CPU = """
import sys
import numpy as np
from xception_jax import export
predictor = export.load(sys.argv[1])
np.save(sys.argv[3], predictor.run(np.load(sys.argv[2]))["logits"])
"""


def test_export_written_on_the_gpu_predicts_on_the_cpu(setup, record, tmp_path):
  name, image_size = setup.export_model
  config = make_config(name, image_size)
  model = train.create_model(config, NUM_CLASSES)
  variables = jax.device_put(random_variables(model, image_size), setup.device)
  images = np.random.default_rng(2).uniform(-1, 1, (3, image_size, image_size, 3)).astype(
      np.float32)
  with jax.default_matmul_precision("highest"):
    expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, jax.device_put(images, setup.device)))

  out = str(tmp_path / "export")
  export.write_export(out, config, {"num_classes": NUM_CLASSES, "loss": "softmax"}, variables,
                      source={"step": 0, "weights": "ema"}, saved_model=False)
  np.save(tmp_path / "images.npy", images)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run([sys.executable, "-c", _PREDICT_ON_CPU, out, str(tmp_path / "images.npy"),
                         str(tmp_path / "logits.npy")], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logits = np.load(tmp_path / "logits.npy")
  scale = float(np.max(np.abs(expected)))
  error = float(np.max(np.abs(logits - expected)) / scale)
  record(test="export_gpu_to_cpu", model=name, image_size=image_size,
         device=setup.device.device_kind, max_abs_logit=scale, error=error, tolerance=TOLERANCE)
  assert logits.shape == (3, NUM_CLASSES)
  assert error <= TOLERANCE
