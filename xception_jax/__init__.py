"""xception_jax: Xception, Inception V3 and the segment-count spectrum between them, in JAX/Flax.

Where things live:
  models/       Flax Linen modules and the registry `models.create(name, **kwargs)`.
  data/         tfds input pipelines, the embedded datasets, synthetic batches (TF is used there
                and in the SavedModel writer only).
  optim.py      the optax chain (SGD / RMSprop), learning-rate schedules, EMA.
  steps.py      the train state, the sharded train step and the eval step.
  train.py      `train_and_evaluate(config, workdir)`: set-up and the loop, top to bottom.
  main.py       the command-line entry point (flags only).
  export.py     writes an inference export (format: export_format.py; SavedModel: saved_model.py);
  serving.py    reads it back (`load`, `Predictor`); predict.py classifies images with it.
  tools/        model_info, benchmark, input_bench, report (README.md's layout lists every module).
"""
