"""Importing the adapters is quiet about the frameworks' harmless messages, and hides nothing else."""

import logging
import subprocess
import sys

import sq_plugin  # noqa: F401  (installs the filters)


def test_adapter_imports_print_none_of_the_known_harmless_messages():
    code = "import sq_plugin.backends.pt2e, sq_plugin.backends.inc"
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr
    for message in ("Failed to load", "Auto detect accelerator", "hw aligned scales", "is an Enum subclass"):
        assert message not in stderr, stderr[-2000:]


def test_other_warnings_of_those_loggers_still_show(caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to quantize layer x: a real problem")
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: no CUDA")
        logging.getLogger("neural_compressor").warning("Auto detect accelerator: CPU_Accelerator.")
    assert [r.getMessage() for r in caplog.records] == ["Failed to quantize layer x: a real problem"]
