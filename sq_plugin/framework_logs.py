"""Silence the frameworks' known-harmless import messages, and nothing else.

Importing torchao on a CPU-only machine logs that its CUDA-only kernel libraries (`_C_mxfp8`,
`_C_cutlass_90a`) cannot load, and torch's pytree logs a deprecation for torchao's own enums; INC logs
"Auto detect accelerator: CPU_Accelerator." twice and that hardware-aligned scales need a GPU. None of
them concerns what this project runs. Each filter drops exactly those messages (matched by text, on
the logger that emits them); every other warning of these loggers still shows.
"""

from __future__ import annotations

import logging

_HARMLESS: dict[str, tuple[str, ...]] = {
    # torchao/__init__.py: CUDA kernels that a CPU machine cannot load.
    "torchao": ("_C_mxfp8", "_C_cutlass"),
    # torch/utils/_pytree.py: torchao's enums registered as pytree constants.
    "torch.utils._pytree": ("<enum 'KernelPreference'>", "<enum 'ScaleCalculationMode'>"),
    # neural_compressor/common/utils/logger.py: accelerator probing on a CPU machine.
    "neural_compressor": ("Auto detect accelerator: CPU", "hw aligned scales not supported for device"),
}


class _DropHarmless(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    """Add the filters once (idempotent); call before importing the framework."""
    for name, fragments in _HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(fragments))
