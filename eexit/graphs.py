"""The graph driver: early exit per graph on a graph transformer (GRIT, :mod:`eexit.models.grit`).

A batch of graphs is a torch_geometric ``Batch``: each graph has its own node count n_g, and the attention runs
over its n_g² ordered pairs. The driver runs the layers one after the other on a
:class:`~eexit.models.grit.GraphState`; after each exit layer it hands the mean-pooled node states of every
running graph to the call's sink (:mod:`eexit.recorder`, shared with the image drivers), and when the sink keeps
only some graphs, the state is shrunk to them (their nodes and pairs, indices compacted), so later layers never
run for the graphs that left. After the last layer the model's own graph head is the final exit.

Nothing is hooked or edited: the driver calls the model's own steps (``start``, ``run_layer``, ``pool``,
``shrink``), the same ones its ``forward`` is made of.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbones.base import BackboneSpec
from .config import ExitConfig
from .errors import EexitValueError
from .heads import ExitHead
from .recorder import STOP, ExitSink

__all__ = ["GraphDriver", "graph_sizes", "num_graphs"]


def num_graphs(batch: Any) -> int:
    """The number of graphs in a torch_geometric ``Batch`` (1 for a single ``Data``)."""
    count = getattr(batch, "num_graphs", None)
    return int(count) if count is not None else 1


def graph_sizes(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes per graph ``[G]``, edges per graph ``[G]``) of a batch of graphs, on the batch's device."""
    x, edge_index = batch.x, batch.edge_index
    node_graph = getattr(batch, "batch", None)
    if node_graph is None:
        device = x.device
        return torch.tensor([x.shape[0]], device=device), torch.tensor([edge_index.shape[1]], device=device)
    g = num_graphs(batch)
    nodes = torch.bincount(node_graph, minlength=g)
    edges = torch.bincount(node_graph[edge_index[0]], minlength=g)
    return nodes, edges


class GraphDriver:
    """Runs a graph backbone layer by layer, each exit's pooled node states to the sink, shrinking the graphs.

    Args:
        backbone: the user's model (used in place).
        spec: its description (a :class:`~eexit.backbones.grit.GRITSpec`).
        exit_blocks: the layers an IM reads.
    """

    reads_earlier_exits = False
    has_head = True

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, exit_blocks: list[int], config: ExitConfig) -> None:
        layers = len(spec.blocks(backbone))
        if any(b >= layers - 1 for b in exit_blocks):
            raise EexitValueError(
                f"{type(backbone).__name__}'s last layer {layers - 1} feeds its own graph head, the final exit; put "
                f"IMs on layers 0..{layers - 2}, got exit_blocks={tuple(exit_blocks)}."
            )
        if config.head == "graph_head" and config.head_hidden is not None:
            raise EexitValueError(
                "head='graph_head' copies the model's own head, whose widths are fixed; drop head_hidden."
            )
        self.backbone = backbone
        self.spec = spec
        self.exit_blocks = list(exit_blocks)
        self.width = spec.feature_width(backbone)

    # ------------------------------------------------------------------ structure
    def build_heads(self, num_classes: int, config: ExitConfig) -> nn.ModuleList:
        if config.head == "graph_head":
            return nn.ModuleList(self.spec.head_copy(self.backbone) for _ in self.exit_blocks)
        return nn.ModuleList(
            ExitHead(self.width, num_classes, config.head, config.head_hidden) for _ in self.exit_blocks
        )

    def exit_names(self) -> list[str]:
        names = [self.spec.blocks(self.backbone)[b][0] for b in self.exit_blocks]
        return [*names, "<backbone head>"]

    def feature_widths(self) -> list[int]:
        return [self.width] * len(self.exit_blocks)

    def classify(
        self, heads: nn.ModuleList, k: int, feature: torch.Tensor, earlier: list[torch.Tensor]
    ) -> torch.Tensor:
        return heads[k](feature)

    def check_input(self, batch: Any, input_shape: list[int] | None) -> None:
        """Graph sizes may vary freely: each graph is charged its own cost."""

    def exit_classifier_state_dict(self, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
        raise EexitValueError(
            f"{type(self.backbone).__name__}'s IMs are new heads, not copies of trained exits; use "
            "ee.adapter_state_dict() for their tensors."
        )

    def install(self) -> None:
        """Nothing to install: :meth:`run` calls the model's steps."""

    def remove(self) -> None:
        pass

    # ------------------------------------------------------------------ running
    def run(self, batch: Any, sink: ExitSink) -> torch.Tensor | None:
        """Run the layers, each exit's pooled features to ``sink``, shrinking the graphs as it says.

        Returns:
            The model head's logits of the graphs that reached it, or ``None`` when the sink stopped the model.
        """
        model = self.backbone
        exits = {b: k for k, b in enumerate(self.exit_blocks)}
        state = model.start(batch)
        for i in range(len(model.layers)):
            state = model.run_layer(i, state)
            k = exits.get(i)
            if k is None:
                continue
            step = sink.add(k, model.pool(state))
            if step is STOP:
                return None
            if step is not None:
                state = model.shrink(state, step)
        return model.forward_head(state)
