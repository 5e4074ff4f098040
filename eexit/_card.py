"""The model card (README.md) written next to a saved adapter.

Hub conventions (``reference/ecosystem.md`` §1.3): YAML front matter with ``library_name: eexit``,
``base_model`` plus ``base_model_relation: adapter`` (so the Hub's model tree links the adapter to its backbone)
and tags. The body is built from the saved config only, so a card written by ``save_pretrained`` and one pushed
by ``push_to_hub`` say the same. The plot is drawn in text: an image would be a fourth file, and an adapter is
exactly three.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["render_card"]

_BAR = 30  # width of the text plot's bars, in characters


def _front_matter(meta: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData  # lazy: keep `import eexit` light

    backbone = meta["backbone"]
    family = backbone.get("family", "")
    framework = "transformers" if family.startswith("hf") else "timm" if family.startswith("timm") else None
    # Graph backbones (GRIT) classify graphs, not images: the Hub's task for them is graph machine learning.
    task = "graph-ml" if _graphs(meta) else "image-classification"
    tags = ["eexit", "early-exit", "jei-dnn", task, *([framework] if framework else [])]
    # Only a Hub id ("org/name") links the model tree; a bare architecture name (timm's, for a model built
    # without pretrained weights) would be flagged as invalid metadata by the Hub.
    base = backbone.get("base_model") if "/" in str(backbone.get("base_model") or "") else None
    data = ModelCardData(
        library_name="eexit",
        base_model=base,
        tags=tags,
        pipeline_tag=task,
    )
    if base:
        data.base_model_relation = "adapter"
    return f"---\n{data.to_yaml()}\n---\n"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _exit_rows(meta: dict[str, Any]) -> list[list[str]]:
    table = meta["cost_table"]
    flops, full = table["exit_flops"], table["backbone_flops"]
    names = meta.get("exit_names") or [str(i) for i in range(len(flops))]
    rows = enumerate(zip(names, flops, strict=False))
    return [[str(i), f"`{name}`", f"{f / 1e6:.3g}", f"{f / full:.3f}"] for i, (name, f) in rows]


def _graphs(meta: dict[str, Any]) -> bool:
    return meta["cost_table"].get("size_terms") is not None


def _size_note(meta: dict[str, Any]) -> str:
    """For graph backbones: the table is at the reference graph size; every graph is charged its own cost."""
    if not _graphs(meta):
        return ""
    table = meta["cost_table"]
    nodes, edges = (table.get("input_shape") or [None, None])[:2]
    return (
        f" at the reference graph size ({nodes} nodes, {edges} edges); each graph is charged its own cost, "
        "a + b·n + c·n² + d·m FLOPs for n nodes and m edges (`size_terms` in `eexit_config.json`)"
    )


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(evaluation: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in evaluation.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _per_exit(flat: dict[str, Any], num_exits: int) -> dict[str, list[Any]]:
    return {
        k: v
        for k, v in flat.items()
        if isinstance(v, list) and len(v) == num_exits and all(x is None or isinstance(x, (int, float)) for x in v)
    }


def _text_plot(meta: dict[str, Any], per_exit: dict[str, list[Any]]) -> str:
    """Bars of each exit's cost fraction next to its accuracy (or exit rate), one line per exit."""
    table = meta["cost_table"]
    fractions = [f / table["exit_flops"][-1] for f in table["exit_flops"]]
    metric = next((k for k in per_exit if "accuracy" in k), next(iter(per_exit), None))
    lines = [f"exit  cost (fraction of last exit){' ' * 3}{metric or ''}"]
    for i, fraction in enumerate(fractions):
        bar = "#" * max(1, round(fraction * _BAR))
        value = per_exit[metric][i] if metric else None
        shown = "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
        lines.append(f"{i:>4}  {bar:<{_BAR}} {fraction:5.2f}   {shown if metric else ''}")
    return "```text\n" + "\n".join(lines) + "\n```"


def _results(meta: dict[str, Any]) -> str:
    evaluation = meta.get("evaluation")
    if not evaluation:
        return (
            "No evaluation was stored with this adapter. Set `ee.evaluation = eexit.evaluate(...).to_dict()` and "
            "save again to add one.\n"
        )
    flat = _flatten(evaluation)
    num_exits = len(meta["cost_table"]["exit_flops"])
    per_exit = _per_exit(flat, num_exits)
    scalars = [[f"`{k}`", _number(v)] for k, v in flat.items() if k not in per_exit and not isinstance(v, list)]
    parts = []
    if scalars:
        parts.append(_markdown_table(["metric", "value"], scalars))
    if per_exit:
        rows = [
            [str(i)] + [_number(v[i]) if v[i] is not None else "n/a" for v in per_exit.values()]
            for i in range(num_exits)
        ]
        parts.append(_markdown_table(["exit", *[f"`{k}`" for k in per_exit]], rows))
    parts.append(_text_plot(meta, per_exit))
    return "\n\n".join(parts) + "\n"


def _peft_rows(peft: dict[str, Any] | None) -> list[list[str]]:
    """Card rows for a PEFT-wrapped backbone: which adapter, and where its weights are (next to the exits)."""
    if not peft:
        return []
    return [
        ["PEFT adapter", f"{peft.get('peft_type')} `{peft.get('adapter_name')}` on `{peft.get('target_modules')}`"],
        ["PEFT weights", "`peft_adapter/` (part of the fingerprint; loaded by `eexit.from_pretrained`)"],
    ]


def _training(meta: dict[str, Any]) -> str:
    fit = meta.get("fit_config")
    if not fit:
        return "The exits were not trained with `eexit.fit` (no training settings were recorded).\n"
    keys = ("lam", "epochs", "warmup_epochs", "im_weighting", "optimizer", "lr", "train_backbone", "seed")
    rows = [[f"`{k}`", _number(fit[k])] for k in keys if k in fit]
    text = _markdown_table(["setting", "value"], rows) + "\n"
    if fit.get("train_backbone") == "lora":
        text += (
            "\nThe backbone's LoRA (PEFT) adapter was trained with the exits; it is saved next to them in "
            "`peft_adapter/`, and `eexit.from_pretrained(base_model, ...)` loads both.\n"
        )
    elif fit.get("train_backbone"):
        text += (
            "\nThe backbone was fine-tuned with the exits: this adapter only works on those fine-tuned "
            "weights, which are not part of it.\n"
        )
    return text


def render_card(meta: dict[str, Any], exits: str) -> str:
    """The README.md of an adapter, from its saved config dict (see ``adapters/README.md``).

    ``exits`` describes the IMs from the live model (what they are, the width of each exit's features), which the
    config does not record.
    """
    backbone = meta["backbone"]
    base = backbone.get("base_model")
    exit_cfg = meta["exit_config"]
    usage = (
        "```python\nimport eexit\n\n"
        f"model = ...  # the backbone this adapter was trained on{f' ({base})' if base else ''}\n"
        'ee = eexit.from_pretrained(model, "<this repo id or folder>")\n'
        + ("out = ee(graphs)  # a torch_geometric Batch; " if _graphs(meta) else "out = ee(images)  # ")
        + "out.logits, out.exit_index, out.cost\n```"
    )
    sections = [
        _front_matter(meta),
        f"# eexit adapter: early exits for {f'`{base}`' if base else 'a ' + backbone.get('model_class', 'backbone')}\n",
        "Early-exit heads (IMs) and learned exit gates trained with JEI-DNN (Regol, Chataoui & Coates, "
        "ICLR 2024, arXiv:2310.09163), made with "
        f"eexit {meta.get('eexit_version', '')}. Only the exits are stored "
        "here; load them onto your copy of the backbone.\n",
        "## Usage\n\n" + usage + "\n",
        "## Backbone\n\n"
        + _markdown_table(
            ["field", "value"],
            [
                ["family", f"`{backbone.get('family')}`"],
                ["class", f"`{backbone.get('model_class')}`"],
                ["base model", f"`{base}`" if base else "unknown"],
                ["revision", f"`{backbone.get('revision')}`" if backbone.get("revision") else "unknown"],
                ["weights fingerprint", f"`{backbone.get('fingerprint')}`"],
                *_peft_rows(backbone.get("peft")),
            ],
        )
        + "\n\n`eexit.from_pretrained` refuses a backbone whose weights have another fingerprint.\n",
        "## Exits\n\n"
        f"{len(meta['exit_blocks'])} IMs ({exits}), {meta['num_classes']} classes, "
        f"{exit_cfg.get('gates', 'paper')} gates, gate threshold "
        f"{exit_cfg.get('threshold')}. Cost per sample, measured with `torch.utils.flop_counter`"
        + _size_note(meta)
        + ":\n\n"
        + _markdown_table(["exit", "after", "MFLOPs", "fraction of backbone"], _exit_rows(meta))
        + "\n",
        "## Training\n\n" + _training(meta),
        "## Results\n\n" + _results(meta),
    ]
    return "\n".join(sections)
