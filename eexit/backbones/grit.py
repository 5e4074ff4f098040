"""Backbone spec for GRIT (:mod:`eexit.models.grit`), the graph transformer of the JEI-DNN authors' third
experiment (``reference/backbones.md`` §3.4): an exit after every GRIT layer but the last, the model's own graph
head is the final exit.

* An IM reads the mean-pooled node states of each graph after its layer, as the final head does. It is a Linear
  (``head="linear"``, the default), eexit's MLP (``head="mlp"``), or a freshly initialised copy of the model's own
  GraphGym head (``head="graph_head"``: what the authors used).
* Early exit runs layer after layer on the graphs still running; graphs that stop are removed from the batch (their
  nodes and their n² pairs, indices compacted) by :meth:`GRIT.shrink <eexit.models.grit.GRIT.shrink>`, so later
  layers do not run for them (:class:`eexit.graphs.GraphDriver`).
* Costs: a graph's cost grows with n² (attention over every ordered pair). The cost table holds, per exit, the
  exact terms of ``a + b·n + c·n² + d·m`` FLOPs for n nodes and m edges (:func:`eexit.cost.measure_graph_cost_table`),
  and every sample is charged its own cost. ``GRITSpec(costs="uniform")`` charges exit l the fraction (l + 1) / L
  of the graph's full cost instead, the authors' convention. The JEI-DNN objective prices exits with the table at
  the reference graph size (``attach(..., input_size=(nodes, edges))``, default the MNIST-superpixel mean, 71 nodes
  and 565 edges): the fractions barely move with the size, since every layer of one graph costs the same.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import EexitValueError
from .base import BackboneSpec, register_spec

__all__ = ["GRITSpec"]

_MODULE = "eexit.models.grit"


class GRITSpec(BackboneSpec):
    """:class:`~eexit.models.grit.GRIT` graph transformers (any configuration).

    Args:
        costs: ``"flops"`` (each graph's measured FLOPs, default) or ``"uniform"`` (exit after layer l costs
            (l + 1) / L of the graph's full cost, as the JEI-DNN authors set it). Pass the instance to
            ``eexit.attach(model, spec=GRITSpec(costs="uniform"))``.
    """

    name = "grit"
    #: The model reads torch_geometric batches of graphs, not images (eexit.model checks inputs accordingly).
    input_kind = "graphs"

    def __init__(self, costs: str = "flops") -> None:
        if costs not in ("flops", "uniform"):
            raise EexitValueError(f"GRITSpec(costs=...) must be 'flops' or 'uniform', got {costs!r}.")
        self.costs = costs

    def matches(self, model: nn.Module) -> bool:
        module = sys.modules.get(_MODULE)
        return module is not None and isinstance(model, module.GRIT)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]

    def feature_width(self, model: nn.Module) -> int:
        return int(model.config.hidden)

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.config.num_classes)

    def default_input_size(self, model: nn.Module) -> tuple[int, int]:
        """The reference graph size (nodes, edges) of the cost table: GNN-benchmark MNIST's mean graph."""
        return (71, 565)

    def call(self, model: nn.Module, batch: Any) -> Any:
        return model(batch)

    def pool(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise EexitValueError("grit: exits read GRIT.pool(state) through the graph driver, not pool().")

    def describe(self, model: nn.Module) -> dict[str, Any]:
        info = super().describe(model)
        info["config"] = model.config.to_dict()
        info["costs"] = self.costs
        return info

    # ------------------------------------------------------------------ graph driver
    def head_copy(self, model: nn.Module) -> nn.Module:
        """A freshly initialised module of the model's own head type (GraphGym MLP on the pooled node states)."""
        from ..models.grit import GraphHeadMLP

        cfg = model.config
        return GraphHeadMLP(cfg.hidden, cfg.num_classes, cfg.head_layers)

    def example_graph(self, model: nn.Module, nodes: int, edges: int, seed: int = 0) -> Any:
        """A random graph of ``nodes`` nodes and ``edges`` distinct edges with RRWP (cost measurement, probes)."""
        from torch_geometric.data import Batch, Data

        from ..models.grit import add_rrwp

        cfg = model.config
        g = torch.Generator().manual_seed(seed)
        pairs = torch.randperm(nodes * nodes, generator=g)
        pairs = pairs[(pairs // nodes) != (pairs % nodes)][:edges]  # distinct, no self loops
        if pairs.numel() < edges:
            raise EexitValueError(f"a graph of {nodes} nodes has at most {nodes * (nodes - 1)} edges, asked {edges}.")
        edge_index = torch.stack((pairs // nodes, pairs % nodes))
        data = Data(
            x=torch.rand(nodes, cfg.node_in, generator=g),
            edge_index=edge_index,
            edge_attr=torch.rand(edges, cfg.edge_in, generator=g),
        )
        batch = Batch.from_data_list([add_rrwp(data, cfg.rrwp_steps)])
        param = next(model.parameters())
        batch = batch.to(param.device)
        batch.x = batch.x.to(param.dtype)
        batch.edge_attr = batch.edge_attr.to(param.dtype)
        return batch


register_spec(GRITSpec())
