"""An embed chain (patch embeddings -> concatenation -> encoder) joined into one ``openvino.Model``.

Why: at tiny's size a B=1 embed is ~12 ms of compute split over three inferences; each wakes
OpenVINO's threads and hands its output back through host memory, and the host concatenates the
tokens. As one model the concatenation is an in-graph Concat and the whole chain is one inference
(tiny embed B=1 on an AMX Xeon: 21.8 -> 18.3 ms p50, outputs identical; see BENCHMARKS.md).

The ONNX graphs are read as they are; nothing is re-exported. Each patch embedding's ``image``
parameter is renamed to its modality, so the fused model's inputs are ``{modality: image}``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def _result(model: Any, name: str) -> Any:
    """``model``'s Result node of the output called ``name``."""
    for port in model.outputs:
        if name in port.get_names():
            return port.get_node()
    raise KeyError(f"model {model.get_friendly_name()!r} has no output {name!r}")


def _output(model: Any, name: str) -> Any:
    """The producer of ``model``'s output called ``name`` (not its Result node)."""
    return _result(model, name).input_value(0)


def fuse_embed_chain(embeddings: Sequence[tuple[str, Any]], encoder: Any, outputs: Sequence[str],
                     prepare: Callable[[str, Any], None] | None = None) -> Any:
    """One model: every ``(modality, patch-embedding model)``'s ``tokens`` concatenated along the
    token axis, in order, into ``encoder``'s ``tokens`` input; its outputs are the encoder's
    ``outputs``, then ``emb``: the embeddings' ``emb`` outputs concatenated the same way.
    ``prepare(modality, model)`` runs on each embedding model first (reshape, rewrites).
    The models given are consumed (their nodes are moved into the result)."""
    import openvino as ov
    import openvino.opset13 as ops

    parameters, tokens, embs = [], [], []
    for modality, model in embeddings:
        if prepare is not None:
            prepare(modality, model)
        (image,) = model.get_parameters()
        image.set_friendly_name(modality)
        image.output(0).set_names({modality})
        parameters.append(image)
        tokens.append(_output(model, "tokens"))
        embs.append(_output(model, "emb"))
    joined, emb = (parts[0] if len(parts) == 1 else ops.concat(parts, axis=1).output(0) for parts in (tokens, embs))
    (encoder_input,) = [p for p in encoder.get_parameters() if "tokens" in p.output(0).get_names()]
    for target in list(encoder_input.output(0).get_target_inputs()):
        target.replace_source_output(joined)
    emb_result = ops.result(emb)
    emb_result.output(0).set_names({"emb"})
    results = [_result(encoder, name) for name in outputs] + [emb_result]
    fused = ov.Model(results, parameters, "embed_chain")
    fused.validate_nodes_and_infer_types()
    return fused
