"""Model families, with the same verbs: calibration inputs, the layer list, quantize (from a plan, on a backend),
evaluate, save and load.

- `ctc`: wav2vec2 / HuBERT CTC models;
- `whisper`: Whisper's search and simulation; `whisper_int8`: its INT8 encoder and static-cache decoder step,
  which take a plan made on the HF module names through `graph_layer_names`.
"""
