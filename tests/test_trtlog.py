"""Parsing TensorRT's (Sparsity) builder lines and mapping layer names back to ONNX nodes.

Log lines and layer names are quoted from public reports (NVIDIA/TensorRT issues and others);
where a report cut a line off, the quote stops at a layer boundary.
"""

from __future__ import annotations

from onnx_sparse.handoff.trtlog import (
    ELIGIBLE_MARKER,
    PICKED_MARKER,
    layer_nodes,
    layer_onnx_names,
    map_layers_to_nodes,
    parse_trt_log,
    split_layer_list,
)

# NVIDIA/TensorRT#4054 / #4056 (trtexec --verbose, TensorRT 8.6), first layers of the list.
TRTEXEC_4054 = (
    "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, "
    "Conv_619 + Relu_620, Conv_622 + Relu_623, Conv_235 + Relu_236, Conv_626, Conv_239, "
    "Conv_621 + Add_627 + Relu_628, Conv_234 + Add_240 + Relu_241"
)

# NVIDIA/TensorRT#2169: the list as pasted into the issue, wrapped mid-name ("Mat" / "Mul_139").
WRAPPED_2169 = """\
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, MatMul_69, MatMul_83, MatMul_93, MatMul_107, MatMul_125, Mat
Mul_139, MatMul_149, MatMul_163, MatMul_181, MatMul_195, MatMul_205, MatMul_219, MatMul_237, MatMul_251, MatMul_261, MatMul_275, MatMul_293, MatMul_307, Mat
Mul_317, MatMul_331, MatMul_349, MatMul_363, MatMul_373, MatMul_387, MatMul_405, MatMul_419, MatMul_429, MatMul_443, MatMul_461, MatMul_475, MatMul_485, Mat
Mul_499, MatMul_517, MatMul_531, MatMul_541, MatMul_555, MatMul_573, MatMul_587, MatMul_597, MatMul_611, MatMul_629, MatMul_643, MatMul_653, MatMul_667, Mat
Mul_685, MatMul_699, MatMul_709, Gemm_725
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
"""

# NVIDIA/TensorRT#1403: TensorRT 8.0's Python logger prefix.
PYTHON_LOGGER_1403 = """\
[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: Conv_0
[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:
"""

# pytorch/TensorRT#1340 (trtexec, TensorRT 8.4): both lists empty, in the middle of the log.
EMPTY_1340 = """\
[09/16/2022-09:55:37] [I] [TRT] Total Activation Memory: 7864832
[09/16/2022-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math:
[09/16/2022-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
[09/16/2022-09:55:37] [I] [TRT] [MemUsageChange] TensorRT-managed allocation in building engine: CPU +0, GPU +512, now: CPU 0, GPU 512 (MiB)
"""

# Layer names as TensorRT prints them (NVIDIA/TensorRT#2525, #2308, #2576; hmorimitsu/ptlflow#65;
# alanli1997/slim-neck-by-gsconv#18).
FUSED = "Conv_8 + Add_9 + Relu_10"
HORIZONTAL = "Conv_68 || Conv_72"
CONV_PWN = "Conv_531 + PWN(LeakyRelu_532)"
PWN_NESTED = "PWN(PWN(Softplus_144, PWN(Tanh_145)), Mul_146)"
PWN_CONSTANT = (
    "PWN(/fnet/rec_stage/blocks/blocks.0/norm_1/Constant_output_0 + (Unnamed Layer* 286) [Shuffle], "
    "/fnet/rec_stage/blocks/blocks.0/norm_1/Pow)"
)
CONV_SLASH = "/update_block/encoder/convc1_1/Conv + /update_block/encoder_1/Relu"
FOREIGN_2308 = "{ForeignNode[ReduceMean_4492...Mul_4557]}"
FOREIGN_UNNAMED = "{ForeignNode[(Unnamed Layer* 1490) [Constant] + (Unnamed Layer* 1491) [Shuffle].../Transpose_5]}"
COPY = "/update_block/decoder/Tanh_output_0 copy"


# --------------------------------------------------------------------------- parse_trt_log


def test_markers_are_the_logged_text() -> None:
    assert ELIGIBLE_MARKER in TRTEXEC_4054
    assert PICKED_MARKER in WRAPPED_2169


def test_trtexec_info_line() -> None:
    log = parse_trt_log(TRTEXEC_4054)
    assert log.eligible == [
        "MatMul_401",
        "Conv_619 + Relu_620",
        "Conv_622 + Relu_623",
        "Conv_235 + Relu_236",
        "Conv_626",
        "Conv_239",
        "Conv_621 + Add_627 + Relu_628",
        "Conv_234 + Add_240 + Relu_241",
    ]
    assert log.eligible_seen and not log.picked_seen
    assert log.picked == []


def test_wrapped_mid_name_is_joined() -> None:
    log = parse_trt_log(WRAPPED_2169)
    assert len(log.eligible) == 50
    assert log.eligible[:8] == [
        "Conv_22",
        "MatMul_51",
        "MatMul_69",
        "MatMul_83",
        "MatMul_93",
        "MatMul_107",
        "MatMul_125",
        "MatMul_139",
    ]
    assert "MatMul_317" in log.eligible and "MatMul_499" in log.eligible and "MatMul_685" in log.eligible
    assert log.eligible[-1] == "Gemm_725"
    assert not any(" " in name for name in log.eligible)
    # An empty picked list is a real "none", and every eligible layer ran dense.
    assert log.picked_seen and log.picked == []
    assert log.not_picked == log.eligible


def test_python_logger_prefix() -> None:
    log = parse_trt_log(PYTHON_LOGGER_1403)
    assert log.eligible == ["Conv_0"] and log.picked == []
    assert log.found


def test_empty_lists_do_not_swallow_the_next_record() -> None:
    log = parse_trt_log(EMPTY_1340)
    assert log.eligible == [] and log.picked == []
    assert log.eligible_seen and log.picked_seen


def test_no_sparsity_lines() -> None:
    log = parse_trt_log("[I] [TRT] Engine generation completed in 1.2 seconds.\n")
    assert not log.found and log.eligible == [] and log.picked == []


def test_polygraphy_verbose_and_trt_verbose_forms() -> None:
    text = """\
[V] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[V] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
[11/26/2026-10:00:00] [V] [TRT] (Sparsity) Layers eligible for sparse math: conv4
"""
    log = parse_trt_log(text)
    assert log.eligible == ["conv1", "conv2", "conv3", "conv4"]
    assert log.picked == ["conv2", "conv3"]
    assert log.not_picked == ["conv1", "conv4"]


def test_polygraphy_multiline_continuation_is_indented() -> None:
    # Polygraphy indents continuation lines of a multi-line message under its prefix.
    text = "[V] (Sparsity) Layers eligible for sparse math: conv1,\n    conv2 + relu2\n[V] next message\n"
    assert parse_trt_log(text).eligible == ["conv1", "conv2 + relu2"]


def test_list_cut_into_records_continues_after_a_comma() -> None:
    text = """\
[I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2,
[I] [TRT] conv3, conv4
[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv1
[I] [TRT] Total Activation Memory: 7864832
"""
    log = parse_trt_log(text)
    assert log.eligible == ["conv1", "conv2", "conv3", "conv4"]
    assert log.picked == ["conv1"]


def test_commas_inside_fused_names_do_not_split() -> None:
    text = f"[I] [TRT] {PICKED_MARKER} {CONV_PWN}, {PWN_NESTED}, {HORIZONTAL}\n"
    assert parse_trt_log(text).picked == [CONV_PWN, PWN_NESTED, HORIZONTAL]


def test_iterable_of_lines_and_duplicates() -> None:
    lines = [f"[I] {ELIGIBLE_MARKER} a, b", f"[I] {ELIGIBLE_MARKER} b, c"]
    assert parse_trt_log(lines).eligible == ["a", "b", "c"]


def test_split_layer_list() -> None:
    assert split_layer_list(f" {FUSED}, {PWN_CONSTANT},  {COPY} ,") == [FUSED, PWN_CONSTANT, COPY]
    assert split_layer_list("") == []
    # Unbalanced brackets: every comma separates.
    assert split_layer_list("a(, b") == ["a(", "b"]


# --------------------------------------------------------------------------- layer names


def test_layer_onnx_names() -> None:
    assert layer_onnx_names(FUSED) == (["Conv_8", "Add_9", "Relu_10"], [])
    assert layer_onnx_names(HORIZONTAL) == (["Conv_68", "Conv_72"], [])
    assert layer_onnx_names(CONV_PWN) == (["Conv_531", "LeakyRelu_532"], [])
    assert layer_onnx_names(PWN_NESTED)[0] == ["Softplus_144", "Tanh_145", "Mul_146"]
    assert layer_onnx_names(PWN_CONSTANT)[0] == [
        "/fnet/rec_stage/blocks/blocks.0/norm_1/Constant_output_0",
        "/fnet/rec_stage/blocks/blocks.0/norm_1/Pow",
    ]
    assert layer_onnx_names(FOREIGN_2308) == ([], [(["ReduceMean_4492"], ["Mul_4557"])])
    assert layer_onnx_names(FOREIGN_UNNAMED) == ([], [([], ["/Transpose_5"])])
    assert layer_onnx_names(COPY)[0] == ["/update_block/decoder/Tanh_output_0"]
    assert layer_onnx_names("269 copy")[0] == ["269"]
    assert layer_onnx_names("Reformatting CopyNode for Input Tensor 0 to Conv_8 + Add_9") == ([], [])
    assert layer_onnx_names("(Unnamed Layer* 12) [Shuffle]") == ([], [])


def test_map_fused_and_horizontal() -> None:
    nodes = ["Conv_8", "Add_9", "Relu_10", "Conv_68", "Conv_72", "Conv_99"]
    mapping = map_layers_to_nodes([FUSED, HORIZONTAL], nodes)
    assert mapping == {
        "Conv_8": [FUSED],
        "Add_9": [FUSED],
        "Relu_10": [FUSED],
        "Conv_68": [HORIZONTAL],
        "Conv_72": [HORIZONTAL],
    }


def test_map_slash_names_pwn_and_copies() -> None:
    nodes = [
        "/update_block/encoder/convc1_1/Conv",
        "/update_block/encoder_1/Relu",
        "/fnet/rec_stage/blocks/blocks.0/norm_1/Constant",
        "/fnet/rec_stage/blocks/blocks.0/norm_1/Pow",
        "/update_block/decoder/Tanh",
    ]
    mapping = map_layers_to_nodes([CONV_SLASH, PWN_CONSTANT, COPY], nodes)
    assert mapping["/update_block/encoder/convc1_1/Conv"] == [CONV_SLASH]
    assert mapping["/fnet/rec_stage/blocks/blocks.0/norm_1/Constant"] == [PWN_CONSTANT]  # via *_output_0
    assert mapping["/fnet/rec_stage/blocks/blocks.0/norm_1/Pow"] == [PWN_CONSTANT]
    assert mapping["/update_block/decoder/Tanh"] == [COPY]


def test_map_matmul_output_tensor_name() -> None:
    mapping = map_layers_to_nodes(["/model/layer.0/MatMul_output_0"], ["/model/layer.0/MatMul"])
    assert mapping == {"/model/layer.0/MatMul": ["/model/layer.0/MatMul_output_0"]}


def test_map_unnamed_node_through_its_output() -> None:
    # The ONNX parser names a node without a name "node_of_<first output>".
    nodes = ["Conv_0", "Relu_1"]
    outputs = {"conv1_out": "Conv_0", "relu_out": "Relu_1"}
    assert map_layers_to_nodes(["node_of_conv1_out + node_of_relu_out"], nodes, outputs) == {
        "Conv_0": ["node_of_conv1_out + node_of_relu_out"],
        "Relu_1": ["node_of_conv1_out + node_of_relu_out"],
    }
    # Without an output map, a node named like its output still resolves.
    assert map_layers_to_nodes(["node_of_conv1"], ["conv1"]) == {"conv1": ["node_of_conv1"]}


def test_foreign_node_range() -> None:
    nodes = ["Conv_1", "ReduceMean_4492", "MatMul_4500", "Add_4501", "Mul_4557", "Conv_5000"]
    named, in_range = layer_nodes(FOREIGN_2308, nodes)
    assert named == ["ReduceMean_4492", "Mul_4557"]
    assert in_range == ["MatMul_4500", "Add_4501"]
    mapping = map_layers_to_nodes([FOREIGN_2308], nodes)
    assert list(mapping) == ["ReduceMean_4492", "MatMul_4500", "Add_4501", "Mul_4557"]
    # One end unresolvable: only the named end.
    assert layer_nodes(FOREIGN_UNNAMED, ["/Transpose_5", "x"]) == (["/Transpose_5"], [])


def test_node_names_with_commas_are_rejoined() -> None:
    log = parse_trt_log(f"[I] {ELIGIBLE_MARKER} weird, name + Relu_1, Conv_2\n")
    assert log.eligible == ["weird", "name + Relu_1", "Conv_2"]
    mapping = map_layers_to_nodes(log.eligible, ["weird, name", "Relu_1", "Conv_2"])
    assert mapping == {
        "weird, name": ["weird, name + Relu_1"],
        "Relu_1": ["weird, name + Relu_1"],
        "Conv_2": ["Conv_2"],
    }


def test_unknown_layers_map_to_nothing() -> None:
    assert map_layers_to_nodes(["Conv_404", "(Unnamed Layer* 3) [Constant]"], ["Conv_1"]) == {}


# --------------------------------------------------------------------------- TensorRT 10 / 11 lines

# NVIDIA TensorRT-Model-Optimizer, examples/sparse_quant_trt/README.md (PR #1664, TensorRT 10.14):
# the two lines as that README documents them (N, M and the lists are placeholders there).
MODELOPT_FORM = """\
(Sparsity) Found N layer(s) eligible to use sparse tactics: ...
(Sparsity) Chose M layer(s) using sparse tactics: ...
"""
# A public 2:4 experiment write-up on GitHub (trtexec, TensorRT 10, Jetson): counts, no names, none chosen.
ZERO_CHOSEN = """\
(Sparsity) Found 39 layer(s) eligible to use sparse tactics
(Sparsity) Chose 0 layer(s) using sparse tactics
"""


def test_trt10_counts_without_names_and_zero_chosen() -> None:
    got = parse_trt_log("[12/01/2025-10:00:00] [I] [TRT] " + ZERO_CHOSEN.replace("\n", "\n[I] [TRT] ", 1))
    assert got.eligible_seen and got.picked_seen
    assert (got.eligible_counts, got.picked_counts) == ([39], [0])
    assert (got.eligible_count, got.picked_count) == (39, 0)
    assert got.eligible == [] and got.eligible_unnamed and not got.eligible_known
    assert got.picked == [] and not got.picked_unnamed and got.picked_known  # "Chose 0" is a complete none


def test_trt10_with_names_repeated_per_region() -> None:
    text = """\
[I] [TRT] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: /l0/fc1/MatMul, /l0/fc2/MatMul
[I] [TRT] (Sparsity) Chose 1 layer(s) using sparse tactics: /l0/fc1/MatMul
[I] [TRT] Total Activation Memory: 1
[I] [TRT] (Sparsity) Found 1 layer(s) eligible to use sparse tactics: {ForeignNode[/l1/fc1/MatMul.../l1/fc2/MatMul]}
[I] [TRT] (Sparsity) Chose 0 layer(s) using sparse tactics:
"""
    got = parse_trt_log(text)
    assert got.eligible == ["/l0/fc1/MatMul", "/l0/fc2/MatMul", "{ForeignNode[/l1/fc1/MatMul.../l1/fc2/MatMul]}"]
    assert got.picked == ["/l0/fc1/MatMul"]
    assert (got.eligible_counts, got.picked_counts) == ([2, 1], [1, 0])
    assert got.eligible_known and got.picked_known and got.eligible_count == 3


def test_trt10_placeholder_form_and_wrapped_list() -> None:
    got = parse_trt_log(MODELOPT_FORM.replace("N", "2", 1).replace("M", "1", 1))
    # "..." is what the README prints in place of names: it parses as one (unknown) layer name
    assert got.eligible_counts == [2] and got.picked_counts == [1] and got.eligible == ["..."]
    wrapped = (
        "[I] [TRT] (Sparsity) Found 3 layer(s) eligible to use sparse tactics: Conv_1 + Relu_2, Conv_3, Mat\n"
        "Mul_4\n[I] [TRT] done\n"
    )
    assert parse_trt_log(wrapped).eligible == ["Conv_1 + Relu_2", "Conv_3", "MatMul_4"]


def test_both_formats_in_one_log() -> None:
    got = parse_trt_log(PYTHON_LOGGER_1403 + ZERO_CHOSEN)
    assert got.eligible == ["Conv_0"] and got.eligible_counts == [39] and got.eligible_unnamed
    assert got.picked == [] and got.picked_counts == [0]


def test_picked_count_without_a_chose_count_counts_picked_names_not_eligible_ones() -> None:
    """A "Found N" count with no "Chose" count: the picked count comes from the picked names (or is 0), never N."""
    older_picked = (
        "[I] [TRT] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: Conv_1, MatMul_2\n"
        "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_1\n"
    )
    got = parse_trt_log(older_picked)
    assert got.eligible_counts == [2] and got.picked_counts == [] and got.picked == ["Conv_1"]
    assert (got.eligible_count, got.picked_count) == (2, 1)
    no_chose = parse_trt_log("[I] [TRT] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: Conv_1, MatMul_2\n")
    assert not no_chose.picked_seen and (no_chose.eligible_count, no_chose.picked_count) == (2, 0)


def test_a_node_name_with_two_commas_is_rejoined_whole() -> None:
    log = parse_trt_log(f"[I] {ELIGIBLE_MARKER} a, b, c + Relu_1, Conv_2\n")
    mapping = map_layers_to_nodes(log.eligible, ["a, b, c", "Relu_1", "Conv_2"])
    assert mapping == {"a, b, c": ["a, b, c + Relu_1"], "Relu_1": ["a, b, c + Relu_1"], "Conv_2": ["Conv_2"]}


def test_only_pwn_wrappers_are_unwrapped() -> None:
    """A plain name that ends in a bracket (exporters write ``f(a, b)``) is one name, not a PWN(...) list."""
    assert layer_onnx_names("f(a, b)") == (["f(a, b)"], [])
    assert layer_onnx_names("PWN(a, b)") == (["a", "b"], [])


def test_an_empty_sparsity_log_knows_nothing() -> None:
    from onnx_sparse.handoff.trtlog import SparsityLog

    empty = SparsityLog()
    assert not empty.found and not empty.eligible_known and not empty.picked_known
    assert parse_trt_log("[I] [TRT] nothing about sparsity\n") == empty
