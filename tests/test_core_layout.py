"""The core reads as the plug-in API it is: one public module for strategy authors,
no import cycles among the runtime's modules, and the pre-run refusal of a loss list
for a strategy that trains with its own loss."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import fedkd.strategy as api
from fedkd.config import ConfigError, load_config
from fedkd.selection import server_strategy
from fedkd.strategy import ClientNode, ClientStrategy, Logits, Metrics

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedkd"

#: cycles that remain, through imports inside functions: the data readers and their
#: downloader, and config validation that asks the registries (see DESIGN.md)
KNOWN = [
    {"fedkd.data", "fedkd.data.datasets", "fedkd.data.download", "fedkd.data.femnist",
     "fedkd.data.prepare", "fedkd.data.readers"},
    {"fedkd.config", "fedkd.privacy.accounting", "fedkd.privacy.mechanism", "fedkd.registry",
     "fedkd.results.records", "fedkd.results.rundir"},
]  # fmt: skip


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every fedkd module ``path`` imports, at module level or inside functions
    (imports under ``if TYPE_CHECKING:`` excluded)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom) and child.module:
                candidates = [child.module, *(f"{child.module}.{a.name}" for a in child.names)]
                out.update(c for c in candidates if c in modules)
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _cycles() -> list[set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_no_new_import_cycles():
    cycles = _cycles()
    unexpected = [sorted(c) for c in cycles if c not in KNOWN]
    assert not unexpected, f"import cycles: {unexpected}"
    runtime = {"fedkd.client", "fedkd.client_node", "fedkd.strategy", "fedkd.federation"}
    assert not any(runtime & c for c in cycles)


def test_the_public_api_is_one_module():
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing
    for name in ("ClientNode", "ServerNode", "ClientStrategy", "ServerStrategy", "make_params"):
        assert name in api.__all__


@dataclass(frozen=True)
class _P:
    weight: float = 1.0


class OwnLossClient(ClientStrategy):
    """A client strategy that trains with a step loss of its own."""

    Params = _P
    own_loss = "CE + my own term"

    def train(self, node: ClientNode, targets: object) -> Metrics:
        return node.train_private()

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Logits:
        return Logits(public_idx, node.public_logits(public_idx))


HERE = "tests.test_core_layout"


def test_own_loss_refuses_a_configured_list_naming_its_path(small_config):
    ok = load_config(small_config, [f'clients.strategies={{"0-1" = "{HERE}:OwnLossClient"}}'])
    server_strategy(ok)  # no list: accepted
    entry = f'{{ name = "{HERE}:OwnLossClient", losses = [{{ name = "ce" }}] }}'
    cfg = load_config(small_config, [f'clients.strategies={{"0-1" = {entry}}}'])
    with pytest.raises(ConfigError) as err:
        server_strategy(cfg)
    assert str(err.value).startswith("clients.strategies.0-1.losses: ")
    assert "OwnLossClient trains with its own loss (CE + my own term)" in str(err.value)
