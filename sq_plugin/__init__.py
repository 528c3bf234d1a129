"""sq_plugin: StableQuant layer-adaptive post-training quantization for speech foundation models.

Importing the package imports no optional framework: `sq_plugin.pt2e` needs torchao, `sq_plugin.inc`
needs Intel Neural Compressor (`pip install sq-plugin[inc]`).
"""

__version__ = "0.1.0"
