"""The x86 ISA policy: detection, the grid per CPU kind, the op table, and refusals that name the fix.

Most tests set ONEDNN_MAX_CPU_ISA inside the process: that changes the *policy* (which reads the
variable on every call) but not oneDNN's kernels (read once at start), so they test the decisions on
every kind from one machine. The tests that run real kernels use the process's own ISA; CI runs them a
second time in a process started with ONEDNN_MAX_CPU_ISA=AVX2 (see .ci/run).
"""

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from sq_plugin.backends import x86_isa
from sq_plugin.backends.pt2e import (
    Int8Module,
    calibrate,
    count_quantized_ops,
    graph_grid_bits,
    isa_problems,
    lower_x86,
    prepare_stablequant,
    stablequant_x86_config,
)
from sq_plugin.backends.x86_isa import IsaError, X86IsaPolicy, detect_kind, x86_policy
from sq_plugin.search import SearchConfig

AVX2_EPYC = frozenset({"sse4_2", "avx", "avx2", "fma"})  # family 25 model 1: no AVX512, no VNNI
GENOA = AVX2_EPYC | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
ALDER_LAKE = AVX2_EPYC | {"avx_vnni"}
SAPPHIRE_RAPIDS = GENOA | {"amx_tile", "amx_int8", "amx_bf16"}


@pytest.mark.parametrize(("flags", "cap", "kind"), [
    (AVX2_EPYC, None, "avx2"),
    (GENOA, None, "vnni"),
    (ALDER_LAKE, None, "vnni"),
    (SAPPHIRE_RAPIDS, None, "amx"),
    (SAPPHIRE_RAPIDS, "AVX512_CORE_VNNI", "vnni"),
    (SAPPHIRE_RAPIDS, "AVX2", "avx2"),
    (GENOA, "AVX512_CORE", "avx512"),
    (GENOA, "AVX2_VNNI", "avx2"),  # measured: Genoa has no AVX-VNNI, so oneDNN falls to plain AVX2 and saturates
    (ALDER_LAKE, "AVX512_CORE_VNNI", "avx2"),  # no AVX512 there: the cap leaves no VNNI kernel
    (AVX2_EPYC, "ALL", "avx2"),  # a cap never raises the ISA above the hardware
    (GENOA, "SOMETHING_NEW", "avx2"),  # unknown cap: assume the least (a narrowed grid is right everywhere)
])
def test_kind_is_the_hardware_capped_by_onednn_max_cpu_isa(flags, cap, kind):
    assert detect_kind(flags, cap) == kind


@pytest.mark.parametrize(("kind", "grid", "w_bits", "grouped"), [
    ("avx2", "narrow_weights", 7, True), ("avx512", "narrow_weights", 7, True), ("vnni", "full", 8, True),
    ("amx", "full", 8, False)])
def test_auto_grid_per_kind(kind, grid, w_bits, grouped, monkeypatch):
    flags = {"avx2": AVX2_EPYC, "avx512": GENOA, "vnni": GENOA, "amx": SAPPHIRE_RAPIDS}[kind]
    monkeypatch.setattr(x86_isa, "cpu_flags", lambda: flags)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE" if kind == "avx512" else "ALL")
    policy = x86_policy()
    assert (policy.kind, policy.int8_grid, policy.grouped_conv_int8) == (kind, grid, grouped)
    assert policy.grid_bits(8, 8) == (w_bits, 8)
    assert policy.grid_bits(6, 6) == (6, 6)  # narrower grids fit already
    assert policy.describe(w_bits, 8).startswith(f"{kind}: {w_bits}-bit weights, 8-bit activations")
    assert x86_policy("narrow_activations").grid_bits(8, 8) == (8, 7)


def test_full_grid_without_vnni_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(IsaError, match=r"int8_grid='full' needs .*VNNI.*ONEDNN_MAX_CPU_ISA=AVX2.*"
                                       r"Fix: use int8_grid='auto' or 'narrow_weights'"):
        x86_policy("full").grid_bits(8, 8)
    with pytest.raises(IsaError, match="int8_grid='full'"):
        stablequant_x86_config(int8_grid="full")
    assert x86_policy("full").grid_bits(6, 6) == (6, 6)  # W6A6 on its full grids fits int16 sums
    assert x86_policy("narrow_weights").grid_bits(8, 8) == (7, 8)
    with pytest.raises(ValueError, match="int8_grid must be one of auto, full, narrow_weights, narrow_activations"):
        x86_policy("half")


def test_op_table_bounds_the_int16_pair_sum():
    avx2 = X86IsaPolicy("avx2", "narrow_weights", True)
    assert "saturate" in avx2.op_problem("linear", 255, 128)
    assert avx2.op_problem("linear", 127, 128) is None  # 2*127*128 = 32512 fits int16
    assert avx2.op_problem("linear", 255, 64) is None  # 7-bit weights with full activations fit too
    assert X86IsaPolicy("vnni", "full", True).op_problem("linear", 255, 128) is None
    amx = X86IsaPolicy("amx", "full", False)
    assert "grouped INT8 conv" in amx.op_problem("conv1d", 255, 128, groups=4)
    assert amx.op_problem("conv1d", 255, 128, groups=1) is None


def test_search_scores_the_grid_that_will_execute(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    config = SearchConfig()
    assert config.int8_grid == "narrow_weights" and config.grid_bits == (7, 8)
    assert config.to_dict()["int8_grid"] == "narrow_weights"  # recorded resolved, not "auto"
    assert SearchConfig(w_bits=6, a_bits=6).grid_bits == (6, 6)
    assert SearchConfig(int8_grid="narrow_activations").grid_bits == (8, 7)
    assert SearchConfig(int8_grid="full").grid_bits == (8, 8)  # a simulation may score it


def _mlp_graph(quantizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval()
    x = torch.randn(8, 256)
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    prepared(x)
    return convert_pt2e(prepared), x


def test_torchao_default_full_grid_graph_is_refused_without_vnni(monkeypatch):
    converted, x = _mlp_graph(X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    assert set(isa_problems(converted, X86IsaPolicy("avx2", "narrow_weights", True))) == {"0", "2"}
    assert isa_problems(converted, X86IsaPolicy("vnni", "full", True)) == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(IsaError, match=r"2 INT8 op\(s\) .* wrong .*avx2.*0\.\.255.*Fix: quantize on this CPU"):
        lower_x86(converted, (x,))


def test_non_x86_cpu_asking_for_the_x86_backend_is_refused(monkeypatch):
    converted, x = _mlp_graph(X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    monkeypatch.setattr(x86_isa.platform, "machine", lambda: "aarch64")
    with pytest.raises(IsaError, match="needs an x86-64 CPU; this machine is aarch64. Fix: use backend 'simulate'"):
        lower_x86(converted, (x,))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_policy_grid_runs_exactly_on_this_cpu():
    """The grid the policy picks is computed right by this process's oneDNN (native, and under the AVX2
    cap in CI): INT8 kernels equal the fake-quant graph to float rounding on an MLP without ties."""
    converted, x = _mlp_graph(X86InductorQuantizer().set_global(stablequant_x86_config()))
    compiled, report = lower_x86(converted, (x,))
    policy = x86_policy()
    assert report.qlinear == 2
    assert report.backend == f"x86-onednn-int8 ({policy.describe(*policy.grid_bits(8, 8))})"
    with torch.no_grad():
        assert _relative_error(compiled(x), converted(x)) < 1e-4


@pytest.mark.skipif(x86_policy().int32_accumulation, reason="oneDNN sums in int32 here (VNNI/AMX): nothing saturates")
def test_full_grid_really_saturates_here():
    """What the policy guards against, on this CPU: the same MLP on the full grid, forced past the check,
    is far from its fake-quant graph (0.089 measured under ONEDNN_MAX_CPU_ISA=AVX2 on an EPYC Genoa)."""
    converted, x = _mlp_graph(X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    module = Int8Module(converted, sum(count_quantized_ops(converted).values()), max_error=None)
    with torch.no_grad():
        assert _relative_error(module(x), converted(x)) > 0.02


def test_kernel_check_message_names_every_known_case():
    converted, x = _mlp_graph(X86InductorQuantizer().set_global(stablequant_x86_config()))
    module = Int8Module(converted, 2, max_error=-1.0)  # any difference fails: shows the message
    with pytest.raises(RuntimeError) as info:
        module(x)
    message = str(info.value)
    assert "without VNNI" in message and "int8_grid='auto'" in message
    assert "AMX: grouped INT8 conv1d" in message and "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI" in message


def test_prepare_stablequant_follows_the_policy_grid(tiny_hubert, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    x = torch.randn(1, 8000) * 0.1
    prepared = prepare_stablequant(tiny_hubert, (x,))
    calibrate(prepared, [x])
    converted = convert_pt2e(prepared)
    assert graph_grid_bits(converted) == (7, 8)
    assert isa_problems(converted) == {}
    weight_ranges = {(n.args[4], n.args[5]) for n in converted.graph.nodes
                     if n.op == "call_function" and "dequantize_per_channel" in str(n.target)}
    assert weight_ranges == {(-64, 63)}
