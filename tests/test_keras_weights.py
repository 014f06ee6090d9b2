"""keras: files: the table agrees with Keras, fetch from a local server, cache, hash and offline errors.

Never touches the network: downloads come from an HTTP server on 127.0.0.1 serving generated
files (or from file:// URLs), pointed at through the documented hook (a `KerasFile` with that URL
and the generated file's md5, or an entry of `keras_weights.FILES` replaced with one).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import socket
import threading

import pytest

from xception_jax import keras_weights
from xception_jax.keras_weights import KerasFile


@pytest.fixture
def server(tmp_path):
  """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (base URL, folder, request log)."""
  folder = tmp_path / "served"
  folder.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet; record instead
      requests.append(self.path)

  httpd = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
  httpd.shutdown()
  httpd.server_close()


def _generated(folder, name="weights.h5", size=300_000):
  data = os.urandom(size)
  (folder / name).write_bytes(data)
  return data, hashlib.md5(data).hexdigest()


def _dead_url(name="x.h5"):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/{name}"


def test_table_matches_installed_keras_source():
  """URLs and md5s as in keras/src/applications/*.py (read as source: keras is not imported)."""
  spec = importlib.util.find_spec("keras")
  if spec is None:
    pytest.skip("keras 3 is not installed")
  root = os.path.join(list(spec.submodule_search_locations)[0], "src", "applications")
  found = {}
  for module, prefix in (("xception", "xception"), ("inception_v3", "inception_v3"),
                         ("imagenet_utils", None)):
    tree = ast.parse(open(os.path.join(root, f"{module}.py")).read())
    constants = {t.id: node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)
                 and isinstance(node.value, ast.Constant)}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
      hashes = [k.value.value for k in call.keywords if k.arg == "file_hash"]
      if not hashes:
        continue
      origin = call.args[1]
      url = constants[origin.id] if isinstance(origin, ast.Name) else origin.value
      name = (keras_weights.CLASS_INDEX if prefix is None else
              prefix + ("_notop" if url.endswith("_notop.h5") else ""))
      found[name] = (url, hashes[0])
  assert found == {name: (f.url, f.md5) for name, f in keras_weights.FILES.items()}
  for name, file in keras_weights.FILES.items():
    assert file.filename == os.path.basename(file.url), name  # Keras caches under the URL's name


def test_download_then_cache_hit_without_network(server, tmp_path):
  base, folder, requests = server
  data, md5 = _generated(folder)
  file = KerasFile("x_weights.h5", f"{base}/weights.h5", md5)
  cache = str(tmp_path / "cache")
  path = keras_weights.fetch(file, cache)
  assert path == os.path.join(cache, "x_weights.h5")
  assert open(path, "rb").read() == data and len(requests) == 1
  assert os.listdir(cache) == ["x_weights.h5"]  # no partial files left behind
  # The cached file is used as is: no request, even with the server unreachable.
  offline = KerasFile("x_weights.h5", _dead_url(), md5)
  assert keras_weights.fetch(offline, cache) == path and len(requests) == 1


def test_file_url_download(tmp_path):
  data, md5 = _generated(tmp_path, "mirror.h5", 1000)
  file = KerasFile("m.h5", (tmp_path / "mirror.h5").as_uri(), md5)
  assert open(keras_weights.fetch(file, str(tmp_path / "c")), "rb").read() == data


def test_default_cache_is_keras_home_models(server, tmp_path, monkeypatch):
  """A file already in Keras's cache ($KERAS_HOME/models) is found without a download."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  assert keras_weights.cache_dir() == str(tmp_path / "keras_home" / "models")
  base, folder, requests = server
  data, md5 = _generated(folder)
  os.makedirs(tmp_path / "keras_home" / "models")
  (tmp_path / "keras_home" / "models" / "xception_weights_tf_dim_ordering_tf_kernels.h5"
   ).write_bytes(data)
  monkeypatch.setitem(keras_weights.FILES, "xception", KerasFile(
      "xception_weights_tf_dim_ordering_tf_kernels.h5", _dead_url(), md5))
  weights, path = keras_weights.fetch_weights("keras:xception")
  assert (weights.model_name, weights.include_top) == ("xception", True)
  assert path == str(tmp_path / "keras_home" / "models" /
                     "xception_weights_tf_dim_ordering_tf_kernels.h5")
  assert not requests


def test_download_with_wrong_hash_is_refused_and_deleted(server, tmp_path):
  base, folder, _ = server
  _generated(folder)
  file = KerasFile("x.h5", f"{base}/weights.h5", "0" * 32)
  cache = tmp_path / "cache"
  with pytest.raises(keras_weights.KerasFileError) as error:
    keras_weights.fetch(file, str(cache))
  message = str(error.value)
  assert f"{base}/weights.h5" in message and "0" * 32 in message
  assert f"place it at {cache / 'x.h5'}" in message
  assert os.listdir(cache) == []


def test_cached_file_with_wrong_hash_is_fetched_again(server, tmp_path):
  base, folder, requests = server
  data, md5 = _generated(folder)
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "x.h5").write_bytes(b"truncated")
  path = keras_weights.fetch(KerasFile("x.h5", f"{base}/weights.h5", md5), str(cache))
  assert open(path, "rb").read() == data and len(requests) == 1


def test_offline_error_names_url_and_path(tmp_path):
  url = _dead_url("xception.h5")
  cache = tmp_path / "cache"
  with pytest.raises(keras_weights.KerasFileError) as error:
    keras_weights.fetch(KerasFile("xception.h5", url, "1" * 32), str(cache))
  message = str(error.value)
  assert f"Cannot download {url}" in message
  assert f"place it at {cache / 'xception.h5'} (md5 {'1' * 32})" in message
  assert os.listdir(cache) == []
  # A stale cached copy is named too.
  (cache / "xception.h5").write_bytes(b"old")
  with pytest.raises(keras_weights.KerasFileError, match="The cached .*xception.h5 has md5"):
    keras_weights.fetch(KerasFile("xception.h5", url, "1" * 32), str(cache))


def test_names_and_model_check():
  assert keras_weights.parse("keras:inception_v3_notop") == keras_weights.KerasWeights(
      "inception_v3_notop", "inception_v3", include_top=False)
  with pytest.raises(ValueError, match="keras:resnet50.*keras:xception, keras:xception_notop"):
    keras_weights.parse("keras:resnet50")
  with pytest.raises(ValueError, match="model_name='xception'.*config.model_name='xception_small'"):
    keras_weights.check_model("keras:xception", "xception_small")


def test_tfds_synsets_are_sorted_and_start_with_tench():
  synsets = keras_weights.tfds_imagenet_synsets()
  if synsets is None:
    pytest.skip("tensorflow-datasets is not installed")
  assert len(synsets) == len(set(synsets)) == 1000
  assert list(synsets) == sorted(synsets)  # Keras's class order is the sorted synset order
  assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"  # Keras's 0 (tench), 999


def test_class_index_is_read_in_numeric_order_and_checked_against_tfds(tmp_path, monkeypatch):
  synsets = keras_weights.tfds_imagenet_synsets() or tuple(f"n{i:08d}" for i in range(1000))
  index = {str(i): [synsets[i], f"name_{i}"] for i in reversed(range(1000))}  # keys unsorted
  path = tmp_path / "served.json"
  path.write_text(json.dumps(index))
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  monkeypatch.setitem(keras_weights.FILES, keras_weights.CLASS_INDEX,
                      KerasFile("imagenet_class_index.json", path.as_uri(), md5))
  classes = keras_weights.imagenet_classes(str(tmp_path / "cache"))
  assert classes.synsets == tuple(synsets)
  assert classes.names[2] == "name_2" and classes.names[10] == "name_10"
  swapped = dict(index, **{"1": index["2"], "2": index["1"]})
  with pytest.raises(ValueError, match="disagree on the class order.*index 1"):
    keras_weights.parse_class_index(swapped, synsets=synsets)
  with pytest.raises(ValueError, match="keys '0'..'999'"):
    keras_weights.parse_class_index({"0": ["n0", "a"]})
