"""Runs gcp-storage-emulator for tests/test_faults.py, with one gap in its GCS API filled.

  python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=B

Real GCS returns an object's generation in the `x-goog-generation` header of a media download;
the emulator does not, so tensorstore (orbax's array writer) reads generation 0 and its
conditional writes of an OCDBT manifest fail with "Malformed StorageGeneration". The wrapper
adds the header (and `x-goog-metageneration`); everything else is the emulator as installed.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (not found: the 404 is already set)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", 1))


objects.download = download

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top
  sys.exit(main())
