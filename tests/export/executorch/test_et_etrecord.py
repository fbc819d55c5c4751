"""Graph-only ETRecords (recipe `etrecord: graph`): weights left out, graphs kept usable."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mobile_sd.export.executorch.etrecord import is_placeholder, restore_weights
from mobile_sd.export.executorch.lower import etdump_op_table, export_pte

INPUTS = (torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(0)),)


class Convs(nn.Module):
    """Two convs: (1, 8, 12, 12) -> (1, 16, 12, 12)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 16, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _record(path):
    from executorch.devtools.etrecord import parse_etrecord

    return parse_etrecord(str(path))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("etrecord")
    model = Convs().eval()
    graph = export_pte(model, INPUTS, folder / "graph.pte", etrecord_path=folder / "graph.etr")
    full = export_pte(model, INPUTS, folder / "full.pte", etrecord_path=folder / "full.etr",
                      etrecord_weights=True)
    return model, graph, full


def test_graph_only_record_leaves_the_weights_out(exports):
    from pathlib import Path

    model, graph, full = exports
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    graph_size, full_size = Path(graph.etrecord_path).stat().st_size, Path(full.etrecord_path).stat().st_size
    assert full_size - graph_size > 1.5 * weight_bytes      # full: ATen + Edge copies
    record = _record(graph.etrecord_path)
    state = record.edge_dialect_program.state_dict
    assert set(state) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert all(is_placeholder(t) for t in state.values())
    assert not any(is_placeholder(t) for t in _record(full.etrecord_path)
                   .edge_dialect_program.state_dict.values())


def test_graph_only_record_still_names_ops_in_the_etdump(exports):
    _, graph, _ = exports
    rows = etdump_op_table(graph.pte_path, INPUTS, etrecord_path=graph.etrecord_path)
    assert any(r["name"].startswith("DELEGATE_CALL") and r["backend"] == "XnnpackBackend"
               for r in rows), rows


def test_restore_weights_makes_the_program_run_like_the_module(exports):
    model, graph, _ = exports
    program = _record(graph.etrecord_path).exported_program
    with pytest.raises(RuntimeError):                          # placeholders cannot be loaded
        program.module().load_state_dict(model.state_dict())
    restore_weights(program, model)
    with torch.no_grad():
        assert torch.equal(program.module()(*INPUTS), model(*INPUTS))


def test_restore_weights_names_what_the_module_cannot_supply(exports):
    model, graph, _ = exports
    program = _record(graph.etrecord_path).exported_program
    other = nn.Module()                                        # has none of the weights
    with pytest.raises(ValueError, match=r"graph-only.*a\.weight.*etrecord: full"):
        restore_weights(program, other)


def test_recipe_etrecord_takes_a_mode(tmp_path):
    from mobile_sd.errors import RecipeError
    from mobile_sd.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nformat: executorch\nbackend: xnnpack\ntarget: android\n"
                    "precision: fp32\netrecord: yes-please\n")
    with pytest.raises(RecipeError, match="etrecord.*none.*graph.*full"):
        load_recipe(path)



def test_lean_copy_keeps_the_graph_and_copies_no_weight():
    from mobile_sd.export.executorch.etrecord import lean_copy

    model = Convs().eval()
    program = torch.export.export(model, INPUTS)
    lean = lean_copy(program)
    assert [n.name for n in lean.graph.nodes] == [n.name for n in program.graph.nodes]
    for key, tensor in lean.state_dict.items():
        assert tensor.shape == program.state_dict[key].shape
        assert tensor.untyped_storage().nbytes() == tensor.element_size()   # one element
    assert program.state_dict["a.weight"] is model.a.weight                 # original untouched
