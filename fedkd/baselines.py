"""Attribution baselines reported beside a federated run (``baseline = [...]``).

- ``local``: the same students trained on their private data alone (strategy ``local``);
- ``transfer``: FedMD's control, public-set transfer learning then private training,
  no collaboration (strategy ``transfer``; FedMD's own epochs when the run is FedMD);
- ``fedavg``: FedAvg on the same clients (homogeneous students only);
- ``centralised``: the upper bound, one model per student architecture trained on all
  clients' private data pooled, with the clients' recipe and the same number of epochs
  (``rounds x clients.local_epochs``), evaluated on the same test set every round.

Each runs in-process after the federation (no Flower), honest (no faults, no per-client
strategies), and is written to ``baseline.jsonl`` (local) or ``baseline-<name>.jsonl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fedkd.assignment import resolve_device, student_spec
from fedkd.config import Config, Spec, load_config
from fedkd.data import FederatedData
from fedkd.data.transforms import train_augment
from fedkd.federation import ErrorLog, Federation, Interrupted, StopSignal
from fedkd.inline import InlineTransport
from fedkd.models import build_model
from fedkd.recipes import Recipe
from fedkd.results.records import ClientRecord, RoundRecord
from fedkd.seeding import derive_seed, torch_generator
from fedkd.selection import server_strategy
from fedkd.training import evaluate, make_optimizer, to_tensor, train_supervised

#: the label of each in tables
LABELS = {
    "local": "local-only",
    "transfer": "transfer-only",
    "fedavg": "FedAvg",
    "centralised": "centralised",
}

#: the local-only baseline's name (its records are the run's ``baseline``)
LOCAL = "local"


def baseline_config(cfg: Config, name: str) -> Config:
    """The config a strategy baseline runs with: every client honest and on the
    baseline's strategy (no per-client strategies, no faults, no further baselines)."""
    d = cfg.to_dict()
    d["clients"] = {**d["clients"], "strategies": {}}
    d.pop("faults", None)
    d["baseline"] = False
    d["seeds"] = []
    strategy: dict = {"name": name}
    if name == "transfer":  # the transfer phases it shares with the strategy (FedMD's)
        keep = _param_names(name) & _param_names(cfg.strategy.name)
        strategy.update({k: v for k, v in cfg.strategy.params.items() if k in keep})
    d["strategy"] = strategy
    return load_config(d)


def _param_names(strategy: str) -> set[str]:
    """The parameter names of a server strategy's ``Params`` dataclass."""
    from dataclasses import fields, is_dataclass

    from fedkd.strategy import SERVER_STRATEGIES

    params = SERVER_STRATEGIES.get(strategy).Params
    return {f.name for f in fields(params)} if is_dataclass(params) else set()


def baseline_file(name: str) -> str:
    """The run-folder file that baseline ``name``'s rounds are written to."""
    return "baseline.jsonl" if name == LOCAL else f"baseline-{name}.jsonl"


def check_baseline(cfg: Config, name: str) -> None:
    """Raise ConfigError if strategy baseline ``name`` cannot run under ``cfg``."""
    if name == "centralised":
        return
    server_strategy(baseline_config(cfg, name))


def run_baseline(
    name: str,
    cfg: Config,
    data: FederatedData,
    data_path: str,
    stop: StopSignal,
    on_round: Callable[[RoundRecord], None],
    errors: ErrorLog,
) -> None:
    """Run baseline ``name`` in-process, passing each round's record to ``on_round``."""
    if name == "centralised":
        run_centralised(cfg, data, stop, on_round)
        return
    base = baseline_config(cfg, name)
    Federation(base, data).run(InlineTransport(base, data_path), on_round, stop=stop, errors=errors)


def run_centralised(
    cfg: Config,
    data: FederatedData,
    stop: StopSignal | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """One model per student architecture on the pooled private data of all clients.

    Each round trains ``clients.local_epochs`` epochs with the clients' optimizer,
    schedule, clipping, label smoothing and augmentation, then evaluates; every client
    is reported with its architecture's model (so means weigh architectures as the
    federation does)."""
    device = resolve_device(cfg)
    rows = torch.as_tensor(sorted(int(r) for part in data.parts for r in part), dtype=torch.long)
    x = to_tensor(data.private_x, device)[rows.to(device)]
    y = to_tensor(data.private_y, device)[rows.to(device)]
    test_x, test_y = to_tensor(data.test_x, device), to_tensor(data.test_y, device)
    specs = {cid: student_spec(cfg, cid) for cid in range(cfg.clients.count)}
    models, optimizers = _central_models(cfg, data, specs, device)
    augment = train_augment(cfg.data)
    records: list[RoundRecord] = []
    for rnd in range(1, cfg.rounds + 1):
        if stop is not None and stop.is_set():
            raise Interrupted(f"centralised baseline stopped before round {rnd}")
        start = time.perf_counter()
        accuracy = {}
        for i, (key, model) in enumerate(models.items()):
            gen = torch_generator(cfg.seed, "central", rnd, i)
            aug_gen = torch_generator(cfg.seed, "central-augment", rnd, i)
            train_supervised(
                model,
                optimizers[key],
                x,
                y,
                epochs=cfg.clients.local_epochs,
                batch_size=cfg.clients.batch_size,
                generator=gen,
                recipe=Recipe.of(cfg.clients, rnd, cfg.rounds, cfg.amp),
                augment=augment.bound(aug_gen),
            )
            accuracy[key] = evaluate(model, test_x, test_y)
        record = _central_record(rnd, start, specs, accuracy, len(rows))
        records.append(record)
        if on_round is not None:
            on_round(record)
    return records


def _central_models(
    cfg: Config, data: FederatedData, specs: dict[int, Spec], device: torch.device
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    """One model and its optimizer per distinct student architecture, keyed by spec."""
    models, optimizers = {}, {}
    for key, spec in {str(spec): spec for spec in specs.values()}.items():
        model = build_model(
            spec, data.input_shape, data.num_classes, seed=derive_seed(cfg.seed, f"central:{key}")
        ).to(device)
        models[key], optimizers[key] = (
            model,
            make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr),
        )
    return models, optimizers


def _central_record(
    rnd: int,
    start: float,
    specs: dict[int, Spec],
    accuracy: dict[str, dict[str, float]],
    num_examples: int,
) -> RoundRecord:
    """Round ``rnd``'s record: each client reported with its architecture's model."""
    clients = {
        cid: ClientRecord(
            cid=cid,
            model=str(spec),
            accuracy=accuracy[str(spec)]["accuracy"],
            loss=accuracy[str(spec)]["loss"],
            num_examples=num_examples,
            bytes_up=0,
            bytes_down=0,
        )
        for cid, spec in specs.items()
    }
    return RoundRecord(
        round=rnd,
        seconds=time.perf_counter() - start,
        sampled=tuple(specs),
        clients=clients,
        failures=(),
        server=None,
        bytes_up=0,
        bytes_down=0,
    )
