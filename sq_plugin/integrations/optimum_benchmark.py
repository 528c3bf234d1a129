"""optimum-benchmark: the PyTorch backend, with `quant_method: "stablequant"` registered in its worker.

    backend:
      _target_: sq_plugin.integrations.optimum_benchmark.StableQuantPyTorchBackend
      model: sq_plugin/checkpoints/wav2vec2-ref
      quantization_config: {quant_method: stablequant, method: stablequant, calibration: {dataset: corpus-dev}}

optimum-benchmark imports the backend class by its `_target_` inside the benchmark's worker process; importing
this module imports `sq_plugin`, which registers the method with transformers there. Everything else is
optimum-benchmark's own PyTorch backend (`backend: pytorch` works the same where `sq_plugin` is already
imported, e.g. with `launcher: inline` from Python). Recipes: `recipes/optimum-benchmark/`.
"""

import sys

# optimum-benchmark 0.6.0 (the latest) imports `transformers.SpecialTokensMixin`, which transformers 5 removed;
# it only names it in a type alias. The tokenizer base class stands in, and only where the name is missing.
# Importing `transformers.Trainer` (which the PyTorch backend does first) replaces the `transformers` module
# object in sys.modules, so the name is set on the module that is current after that import.
from transformers import Trainer  # noqa: E402, F401

import sq_plugin  # noqa: F401  (registers quant_method "stablequant" with transformers)

_transformers = sys.modules["transformers"]
if not hasattr(_transformers, "SpecialTokensMixin"):
    _transformers.SpecialTokensMixin = _transformers.PreTrainedTokenizerBase
# It also reads a processor's sub-processors from `ProcessorMixin.attributes`, which transformers 5 replaced by
# the classmethod `get_attributes()` (it lists the same names).
if not hasattr(_transformers.ProcessorMixin, "attributes"):
    _transformers.ProcessorMixin.attributes = property(lambda self: type(self).get_attributes())

from optimum_benchmark.backends.pytorch.backend import PyTorchBackend  # noqa: E402
from optimum_benchmark.generators.task_generator import (  # noqa: E402
    TASKS_TO_GENERATORS,
    AutomaticSpeechRecognitionGenerator,
)

# optimum-benchmark files "automatic-speech-recognition" under text generation (Whisper's `generate`), which a CTC
# model does not have. A loaded CTC model is benchmarked as task "audio-ctc" (its own synonym for CTC speech
# recognition): one forward per call, on the random 16 kHz `input_values` of its speech-recognition generator,
# which its input generator does not list under either name.
CTC_TASK = "audio-ctc"
TASKS_TO_GENERATORS.setdefault(CTC_TASK, AutomaticSpeechRecognitionGenerator)


class StableQuantPyTorchBackend(PyTorchBackend):
    """optimum-benchmark's PyTorch backend in a process where `sq_plugin` is imported; a CTC model is timed by
    its forward (task "audio-ctc")."""

    def __init__(self, config: object) -> None:
        super().__init__(config)
        # Inputs are generated before the model loads: decide on the model class the task resolved to.
        if getattr(self.automodel_loader, "__name__", "") == "AutoModelForCTC":
            self.config.task = CTC_TASK


__all__ = ["StableQuantPyTorchBackend"]
