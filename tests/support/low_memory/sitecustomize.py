"""Loaded by every process of a test server (put this folder on its PYTHONPATH): the
reload's memory check reads the free memory from the file that
``HOTSWAP_TEST_FREE_BYTES_FILE`` names, while that file exists, so a test can make the
check fail on a real engine; without the file it reads the real figure."""

import os

_path = os.environ.get("HOTSWAP_TEST_FREE_BYTES_FILE")
if _path:
    from vllm_lora_hotswap.weights import reload as _reload

    _measured = _reload.free_bytes

    def _free_bytes(device, path=_path):  # type: ignore[no-untyped-def]
        try:
            with open(path) as file:
                return int(file.read())
        except FileNotFoundError:
            return _measured(device)

    _reload.free_bytes = _free_bytes
