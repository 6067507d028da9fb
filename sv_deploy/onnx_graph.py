"""Pure ONNX graph edits around the exported network: the PixelShuffle3D local function, stage
boundaries, metadata, and per-stage sub-models.

Kept free of torch so ONNX Runtime and TensorRT users read the file with onnx alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from . import shuffle_op

MAX_IR_VERSION = 10  # ONNX Runtime 1.31 reads at most IR 13; TensorRT 10 parsers want <= 10
META_FORMAT = "sv-deploy-onnx"
META_KEYS = ("format", "config", "stages", "factors", "stage_tensors", "halo", "precision", "folded_ensemble",
             "source_sha256", "versions", "sha256", "model_sha256")
# sha256 covers graph, functions and metadata, as every release has checked it (so older releases
# still read newer exports); model_sha256 covers sha256 with the IR version and the opsets the graph
# is read with (a changed opset changes what its operators mean). Exports of releases before it
# have no model_sha256 and are checked over what they covered.


def shuffle_function(opset: int) -> onnx.FunctionProto:
    """PixelShuffle3D as standard ops: Shape/Concat -> Reshape -> 8-D Transpose -> Reshape."""
    factors = helper.make_node("Constant", [], ["f"])
    ref = AttributeProto(name="value_ints", ref_attr_name="factors", type=AttributeProto.INTS)
    factors.attribute.append(ref)
    nodes = [
        factors,
        helper.make_node("Shape", ["input"], ["n"], start=0, end=1),
        helper.make_node("Shape", ["input"], ["c"], start=1, end=2),
        helper.make_node("Shape", ["input"], ["dhw"], start=2),
        helper.make_node("ReduceProd", ["f"], ["phases"], keepdims=1),
        helper.make_node("Div", ["c", "phases"], ["oc"]),
        helper.make_node("Concat", ["n", "oc", "f", "dhw"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["input", "split_shape"], ["split"]),
        helper.make_node("Transpose", ["split"], ["interleaved"], perm=list(shuffle_op.PERMUTATION)),
        helper.make_node("Mul", ["dhw", "f"], ["out_dhw"]),
        helper.make_node("Concat", ["n", "oc", "out_dhw"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["interleaved", "out_shape"], ["output"]),
    ]
    return helper.make_function(
        shuffle_op.DOMAIN,
        shuffle_op.NAME,
        ["input"],
        ["output"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["factors", "plugin_namespace", "plugin_version"],
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def shuffle_nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == shuffle_op.DOMAIN and n.op_type == shuffle_op.NAME]


def name_stage_outputs(model: onnx.ModelProto) -> List[str]:
    """Give each stage's output (a shuffle output) a stable name; return [input, stage1, ..., output].

    Stages form a chain, so the shuffles appear in stage order in the topologically sorted graph.
    """
    graph = model.graph
    shuffles = shuffle_nodes(model)
    final = graph.output[0].name
    if not shuffles or shuffles[-1].output[0] != final:
        raise ValueError("the graph must end in a PixelShuffle3D node")
    names = [graph.input[0].name]
    elem = graph.input[0].type.tensor_type.elem_type
    for i, node in enumerate(shuffles[:-1], start=1):
        old, new = node.output[0], f"stage{i}_output"
        node.output[0] = new
        for other in graph.node:
            for k, name in enumerate(other.input):
                if name == old:
                    other.input[k] = new
        graph.value_info.append(
            helper.make_tensor_value_info(new, elem, ["N", 1, f"D{i}", f"H{i}", f"W{i}"])
        )
        names.append(new)
    names.append(final)
    return names


def finish(model: onnx.ModelProto, metadata: Dict[str, str]) -> onnx.ModelProto:
    """Attach the local function, pin the IR version, write metadata, and run the full checker."""
    opset = default_opset(model)
    if not any(f.domain == shuffle_op.DOMAIN and f.name == shuffle_op.NAME for f in model.functions):
        model.functions.append(shuffle_function(opset))
    if not any(o.domain == shuffle_op.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(shuffle_op.DOMAIN, 1))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    seal(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def seal(model: onnx.ModelProto, metadata: Dict[str, str]) -> None:
    """Write `metadata` into the model with its digests over the model as it is now."""
    metadata = {k: v for k, v in metadata.items() if k not in ("sha256", "model_sha256")}
    metadata["sha256"] = digest(model, metadata)
    metadata["model_sha256"] = model_digest(model, metadata["sha256"])
    del model.metadata_props[:]
    helper.set_model_props(model, {f"sv_deploy.{k}": v for k, v in metadata.items()})


def digest(model: onnx.ModelProto, metadata: Dict[str, str]) -> str:
    """SHA-256 of the graph, its functions and our metadata (all but the digests).

    An ONNX file is plain protobuf that any tool can edit; the digest lets a reader refuse an export
    whose weights or stored config were changed afterwards, as the .svmodel checksum does.
    """
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for function in model.functions:
        h.update(function.SerializeToString(deterministic=True))
    for key in sorted(metadata):
        if key not in ("sha256", "model_sha256"):
            h.update(json.dumps([key, metadata[key]]).encode())
    return h.hexdigest()


def model_digest(model: onnx.ModelProto, sha256: str) -> str:
    """SHA-256 of `digest` with the IR version and the opsets."""
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    return hashlib.sha256(json.dumps(["model", sha256, model.ir_version, opsets]).encode()).hexdigest()


def verify(model: onnx.ModelProto) -> Dict[str, str]:
    """Our metadata, once the digests over graph, weights, metadata and opsets match (ValueError if not)."""
    meta = read_metadata(model)
    if "sha256" not in meta:
        raise ValueError("it has no checksum (made by an older sv-deploy)")
    if digest(model, meta) != meta["sha256"]:
        raise ValueError("its graph, weights or metadata were changed after export")
    if "model_sha256" in meta and model_digest(model, meta["sha256"]) != meta["model_sha256"]:
        raise ValueError("its IR version or operator set versions were changed after export")
    return meta


def read_metadata(model: onnx.ModelProto) -> Dict[str, str]:
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("sv_deploy.format") != META_FORMAT:
        raise ValueError("no sv_deploy.format metadata")
    return {k: props[f"sv_deploy.{k}"] for k in META_KEYS if f"sv_deploy.{k}" in props}


def stage_tensors(model: onnx.ModelProto) -> List[str]:
    return json.loads(read_metadata(model)["stage_tensors"])


def extract_stage(model: onnx.ModelProto, index: int) -> onnx.ModelProto:
    """Sub-model for one stage, so ensemble and back-projection can run between stages."""
    names = stage_tensors(model)
    if len(names) == 2:
        return model
    sub = onnx.utils.Extractor(model).extract_model([names[index]], [names[index + 1]])
    sub.ir_version = model.ir_version
    return sub


def elem_type(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.elem_type


def is_fp16(model: onnx.ModelProto) -> bool:
    return elem_type(model) == TensorProto.FLOAT16


def json_field(values: Sequence) -> str:
    return json.dumps(list(values))


def prelu_as_max(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each PRelu whose slope is a constant written as Mul and Max (and Min).

    prelu(x) = max(x, a*x) wherever a <= 1 and min(x, a*x) wherever a >= 1, so Max with the
    slopes clipped to 1, then Min with them floored at 1 (only when some slope exceeds 1), is
    exact. ONNX Runtime's CPU PRelu ran 5x slower than Mul + Max on a 128-channel 3D map (127 vs
    24 ms), a sixth (3D) to a quarter (2D) of a folded pass (BENCH.md, session 15); the exported
    file keeps PRelu for TensorRT, which has it natively.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for k, node in enumerate(graph.node):
        slope = inits.get(node.input[1]) if node.op_type == "PRelu" else None
        if slope is None:
            nodes.append(node)
            continue
        a = numpy_helper.to_array(slope)
        x, y, tag = node.input[0], node.output[0], f"_prelu{k}"
        low = np.minimum(a, 1).astype(a.dtype)
        graph.initializer.append(numpy_helper.from_array(low, "slope_low" + tag))
        done = y if not (a > 1).any() else "max" + tag
        nodes += [helper.make_node("Mul", [x, "slope_low" + tag], ["ax" + tag]),
                  helper.make_node("Max", [x, "ax" + tag], [done])]
        if done != y:
            graph.initializer.append(numpy_helper.from_array(np.maximum(a, 1).astype(a.dtype), "slope_high" + tag))
            nodes += [helper.make_node("Mul", [done, "slope_high" + tag], ["az" + tag]),
                      helper.make_node("Min", [done, "az" + tag], [y])]
    del graph.node[:]
    graph.node.extend(nodes)
    return out
