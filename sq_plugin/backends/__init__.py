"""Backends: each applies a `QuantPlan` (or a framework's own rules, for its baselines) to a model.

- `pt2e`: torchao PT2E, lowered to oneDNN INT8 kernels through Inductor (`lower_x86`); its CPU rules live in
  `x86_isa`, and `artifact` saves / loads its converted graphs;
- `cuda`: torchao's `Int8StaticActivationInt8WeightConfig` per layer (`torch._int_mm`);
- `inc`: StableQuant registered as an Intel Neural Compressor 3.x algorithm, and INC's static quant;
- `quanto`: the optimum-quanto W8A8 baseline;
- `simulate`: fake-quant in float, labelled simulated wherever it is reported.

Backends import no speech code: the model families (`sq_plugin.families`) feed them inputs.
"""
