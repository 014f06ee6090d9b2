"""Turns a manifest of (image path -> label ids) into a tfds dataset, e.g. JFT-like data.

    python -m xception_jax.data.manifest --name=my_photos \\
        --train=train.csv --eval=val.jsonl [--class_names=classes.txt] [--data_dir=DIR]

then train with `--config.dataset=my_photos --config.data_dir=DIR`.

Manifest formats (paths relative to the manifest's folder unless absolute):
  * CSV: `path,labels` per line, labels separated by spaces or ';' (an optional header line
    whose first field is 'image', 'path' or 'filename' is skipped);
  * JSON lines: {"image": "path", "labels": [3, 17]} (or "label": 3).
Labels are integer ids, or class names when --class_names lists one name per line.
A dataset where every image has exactly one label is stored as single-label ('label':
ClassLabel), otherwise (or with --multi_label) as multi-label ('labels': Sequence(ClassLabel)),
which the input pipeline turns into multi-hot vectors.

Files are checked before anything is written (the same checks as image folders): bad ones are
skipped with a warning naming each (--bad_files=skip) or stop the command (--bad_files=error).
Encoded bytes are stored as they are, without re-encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from xception_jax.data import imagefolder

FLAGS = flags.FLAGS
flags.DEFINE_string("name", None, "Dataset name (lower_snake_case), used as config.dataset.")
flags.DEFINE_string("train", None, "Manifest of the train split (.csv or .jsonl).")
flags.DEFINE_string("eval", None, "Manifest of the validation split (.csv or .jsonl).")
flags.DEFINE_string("data_dir", "", "tfds data dir to write into ('' = ~/tensorflow_datasets).")
flags.DEFINE_string("class_names", "", "Optional text file, one class name per line.")
flags.DEFINE_integer("num_classes", 0, "Number of classes (0 = from --class_names or max id + 1).")
flags.DEFINE_bool("multi_label", False, "Store as multi-label even if every image has one label.")
flags.DEFINE_enum("bad_files", "skip", ["skip", "error"], "What to do with unreadable images.")


def read_manifest(
  path: str, class_ids: dict[str, int] | None = None
) -> list[tuple[str, list[int]]]:
  """[(absolute image path, label ids)] from a CSV or JSON-lines manifest."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Manifest {path!r} does not exist.")
  base = os.path.dirname(os.path.abspath(path))
  rows: list[tuple[str, list]] = []
  with open(path, newline="") as f:
    if path.endswith((".jsonl", ".json")):
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
          labels = item["labels"] if "labels" in item else [item["label"]]
          rows.append((item["image"], list(labels) if isinstance(labels, list) else [labels]))
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(
            f'{path}:{number}: expected {{"image": path, "labels": [ids]}}, '
            f"got {line.strip()!r} ({e})."
          ) from e
    else:
      for number, fields in enumerate(csv.reader(f), 1):
        if not fields or not "".join(fields).strip():
          continue
        if number == 1 and fields[0].strip().lower() in ("image", "path", "filename"):
          continue
        if len(fields) != 2:
          raise ValueError(f"{path}:{number}: expected 'path,labels', got {fields!r}.")
        rows.append((fields[0].strip(), fields[1].replace(";", " ").split()))
  result = []
  for image, labels in rows:
    ids = []
    for label in labels:
      if class_ids is not None and str(label) in class_ids:
        ids.append(class_ids[str(label)])
      else:
        try:
          ids.append(int(label))
        except ValueError:
          raise ValueError(
            f"{path}: label {label!r} of {image!r} is not an integer id"
            + (
              " nor a name in --class_names" if class_ids else " (pass --class_names to use names)"
            )
          ) from None
    result.append((image if os.path.isabs(image) else os.path.join(base, image), sorted(set(ids))))
  if not result:
    raise ValueError(f"Manifest {path!r} lists no images.")
  return result


def _check(rows, split: str, bad_files: str):
  problems = {
    path: imagefolder.check_image(path) if os.path.isfile(path) else "missing file"
    for path, _ in rows
  }
  bad = [(p, why) for p, why in problems.items() if why]
  if bad and bad_files == "error":
    raise ValueError(
      f"{len(bad)} bad image(s) in the {split} manifest:\n"
      + "\n".join(f"  {p}: {why}" for p, why in bad[:20])
    )
  for path, why in bad:
    logging.warning("Skipping %s: %s", path, why)
  if bad:
    logging.warning("Skipped %d bad image(s) of %d in the %s manifest.", len(bad), len(rows), split)
  return [(p, labels) for p, labels in rows if not problems[p]]


def build(
  name: str,
  manifests: dict[str, str],
  data_dir: str = "",
  class_names: Sequence[str] | None = None,
  num_classes: int = 0,
  multi_label: bool = False,
  bad_files: str = "skip",
):
  """Writes the tfds dataset `name` with the given {split: manifest path}; returns its builder."""
  import tensorflow_datasets as tfds

  class_ids = {n: i for i, n in enumerate(class_names)} if class_names else None
  splits = {
    split: _check(read_manifest(path, class_ids), split, bad_files)
    for split, path in manifests.items()
  }
  max_id = max(max(labels, default=-1) for rows in splits.values() for _, labels in rows)
  num_classes = num_classes or (len(class_names) if class_names else max_id + 1)
  if max_id >= num_classes or min(min(l, default=0) for r in splits.values() for _, l in r) < 0:
    raise ValueError(f"Label ids must be in [0, {num_classes}); found up to {max_id}.")
  multi_label = multi_label or any(len(l) != 1 for r in splits.values() for _, l in r)
  class_label = (
    tfds.features.ClassLabel(names=list(class_names))
    if class_names
    else tfds.features.ClassLabel(num_classes=num_classes)
  )
  key = "labels" if multi_label else "label"
  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(),
      key: tfds.features.Sequence(class_label) if multi_label else class_label,
    }
  )

  def examples(rows):
    for index, (path, labels) in enumerate(rows):
      with open(path, "rb") as f:
        encoded = f.read()
      yield index, {"image": encoded, key: labels if multi_label else labels[0]}

  class ManifestBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
    # No code folder to look for checksums in; also sidesteps tfds 4.9.10 resolving it through
    # the `importlib_resources` backport, which it does not declare on Python >= 3.9.
    code_path = None

  builder = ManifestBuilder(
    name=name,
    version="1.0.0",
    features=features,
    split_datasets={split: examples(rows) for split, rows in splits.items()},
    # tfds shuffles the stored order (by a hash of the keys): a manifest sorted by class still
    # gives every process's contiguous shard a mix of classes.
    data_dir=data_dir or None,
    disable_shuffling=False,
    description=f"Made by xception_jax.data.manifest from {manifests}.",
  )
  if builder.is_prepared():
    raise FileExistsError(
      f"Dataset {name!r} already exists in {builder.data_dir}; delete that "
      "folder or pick another --name."
    )
  builder.download_and_prepare()
  return builder


def main(argv: Sequence[str]) -> None:
  del argv
  if not FLAGS.name or not FLAGS.train:
    raise app.UsageError("--name and --train are required (and usually --eval).")
  manifests = {"train": FLAGS.train}
  if FLAGS.eval:
    manifests["validation"] = FLAGS.eval
  class_names = None
  if FLAGS.class_names:
    with open(FLAGS.class_names) as f:
      class_names = [line.strip() for line in f if line.strip()]
  builder = build(
    FLAGS.name,
    manifests,
    FLAGS.data_dir,
    class_names,
    FLAGS.num_classes,
    FLAGS.multi_label,
    FLAGS.bad_files,
  )
  data_dir = FLAGS.data_dir or "~/tensorflow_datasets"
  print(
    f"Wrote {FLAGS.name} to {builder.data_dir}: {dict(builder.info.splits)}. "
    f"Train with --config.dataset={FLAGS.name} --config.data_dir={data_dir}",
    file=sys.stdout,
  )


if __name__ == "__main__":
  app.run(main)
