"""Walking an ONNX graph into the bodies of its If, Loop and Scan nodes (the one place that knows where they are),
who reads each tensor, and a node's attributes."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

__all__ = ["subgraphs", "nested_nodes", "consumed_names", "readers_of", "node_attributes"]


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def nested_nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(node, the top-level node whose body holds it) for every node inside a body of `graph`, at any depth."""
    for node in graph.node:
        for sub in subgraphs(node):
            for inner in sub.node:
                yield inner, node
            for inner, _ in nested_nodes(sub):
                yield inner, node


def consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read by some node of `graph` or of its bodies (which may read outer-scope tensors)."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= consumed_names(sub)
    names.discard("")
    return names


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Every node reading each tensor, counting reads from inside subgraphs (If/Loop bodies) as their parent's."""
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | _subgraph_reads(node):
            if name:
                result.setdefault(name, []).append(node)
    return result


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    return set().union(*(consumed_names(graph) for graph in subgraphs(node)))


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
