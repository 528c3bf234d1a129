"""sq_plugin: StableQuant layer-adaptive post-training quantization for speech foundation models.

Importing the package imports no optional framework: `sq_plugin.backends.pt2e` needs torchao, `sq_plugin.backends.inc`
needs Intel Neural Compressor (`pip install sq-plugin[inc]`).
"""

from sq_plugin import framework_logs, integrations

__version__ = "0.1.0"
# Before any framework import through sq_plugin: drop the frameworks' known-harmless import messages.
framework_logs.install()
# `quant_method: "stablequant"` in transformers' from_pretrained, once its quantizer registry is imported.
integrations.install()


def __getattr__(name: str):  # lazy: `import sq_plugin` must not import torchao
    if name in ("save", "load"):
        from sq_plugin.backends import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'sq_plugin' has no attribute {name!r}")
