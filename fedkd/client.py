"""The client side of a round, independent of Flower: build or restore the student,
call the client strategy's hooks, evaluate, and save state.

:class:`ClientRuntime` is what both the Flower ClientApp (:mod:`fedkd.flower`) and
the in-process runner (:mod:`fedkd.inline`) call, so a strategy behaves the same in both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedkd.assignment import client_losses, resolve_device, student_spec
from fedkd.client_node import LOSSES_KEY, ClientNode
from fedkd.config import Config
from fedkd.contracts import HookError, check_metrics, check_payload, describe
from fedkd.data import load_federated_data
from fedkd.data.transforms import train_augment
from fedkd.faults import byzantine_clients, byzantine_payload, flip_labels
from fedkd.kd.step import RoutedLoss
from fedkd.models import build_model
from fedkd.payloads import Payload, PayloadError
from fedkd.privacy.mechanism import mechanism_of
from fedkd.privacy.noise import NoiseSource
from fedkd.seeding import derive_seed, seed_client_round, torch_generator
from fedkd.selection import client_strategy, server_strategy
from fedkd.state_codec import decode_state, encode_state
from fedkd.state_store import DiskStateStore, MemoryStateStore, StateStore
from fedkd.strategy import ClientStrategy
from fedkd.training import logit_metrics, make_optimizer, predict_logits, to_tensor


@dataclass
class TrainReply:
    """What a client returns from a round."""

    cid: int
    payload: Payload | None
    metrics: dict[str, float]


class TargetsError(RuntimeError):
    """The server's targets could not be read or validated by the client (the server's
    fault, so the failure is recorded against the server side)."""


def load_state(blob: bytes) -> dict[str, Any]:
    """A saved client state, decoded without running code (:mod:`fedkd.state_codec`; also
    reads the ``torch.save`` states of runs saved before it)."""
    return decode_state(blob)


def dump_state(node: ClientNode) -> bytes:
    """Client ``node``'s student, optimizer and extra state, as :func:`load_state` reads
    them (fails, naming the key, on a value ``node.state`` may not hold)."""
    state = {
        "model": node.model.state_dict(),
        "optimizer": node.optimizer.state_dict(),
        "extra": node.state,
    }
    return encode_state(state)


class ClientRuntime:
    """Runs rounds for any client of one experiment (one instance per worker process).

    Client state lives in ``store`` between rounds (see :mod:`fedkd.state_store`).
    """

    def __init__(self, config: Config, data_path: str, store: StateStore | None = None) -> None:
        self.config = config
        self.data = load_federated_data(data_path)
        self.device = resolve_device(config)
        self.store: StateStore = store if store is not None else MemoryStateStore()
        # resolve every strategy once: imports users' modules, registering their payload
        # kinds, and validates each client's params (incl. its loss list) here, not per round
        server_strategy(config)
        self._strategies: dict[int, tuple[type[ClientStrategy], Any]] = {}
        for cid in range(config.clients.count):
            strategy = client_strategy(config, cid)
            self._strategies[cid] = (type(strategy), strategy.params)
        self.byzantine = frozenset(byzantine_clients(config))
        self.augment = train_augment(config.data)
        self.mechanism = mechanism_of(config)  # the privacy mechanism, asked, never named
        torch.set_num_threads(config.simulation.threads)

    def warm_up(self) -> None:
        """Pay one-off costs (lazy imports, first optimizer step) before round 1."""
        if getattr(self, "_warm", False):
            return
        with torch.random.fork_rng(devices=[]):
            model = build_model(
                self.config.clients.models[0], self.data.input_shape, self.data.num_classes, seed=0
            ).to(self.device)
            opt = make_optimizer(self.config.clients.optimizer, model, self.config.clients.lr)
            model(to_tensor(self.data.public_x[:2], self.device)).sum().backward()
            opt.step()
        self._warm = True

    def _node(self, cid: int, rnd: int, state: bytes | None, strategy: Any) -> ClientNode:
        """Client ``cid``'s student (restored from ``state``), data and settings."""
        cfg, dev = self.config, self.device
        data = self.data.client(cid)
        model = build_model(
            student_spec(cfg, cid),
            self.data.input_shape,
            self.data.num_classes,
            seed=derive_seed(cfg.seed, "student", cid),
        ).to(dev)
        model = self.mechanism.student(model)  # e.g. layers DP-SGD can train
        optimizer = make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr)
        extra: dict[str, Any] = {}
        if state is not None:
            saved = load_state(state)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            extra = saved["extra"]
        y = to_tensor(data.y, dev)
        public_y = to_tensor(data.public_y, dev)
        if cid in self.byzantine and cfg.faults.attack == "labelflip":
            pub = self.data.public_classes  # > 0: a union label space, public classes first
            y = flip_labels(y, data.num_classes, first=pub)
            # FedMD trains on public labels; they flip among the public classes
            public_y = flip_labels(public_y, pub or data.num_classes)
        return ClientNode(
            cid=cid,
            round=rnd,
            model=model,
            optimizer=optimizer,
            x=to_tensor(data.x, dev),
            y=y,
            public_x=to_tensor(data.public_x, dev),
            public_y=public_y,
            test_x=to_tensor(data.test_x, dev),
            test_y=to_tensor(data.test_y, dev),
            num_classes=data.num_classes,
            settings=cfg.clients,
            generator=torch_generator(cfg.seed, "client", rnd, cid),
            device=dev,
            state=extra,
            privacy=cfg.privacy if self.mechanism.active else None,
            seed=cfg.seed,
            strategy_name=type(strategy).__name__,
            rounds=cfg.rounds,
            augment=self.augment,
            augment_generator=torch_generator(cfg.seed, "augment", rnd, cid),
            amp=cfg.amp,
            losses=self._losses(cid, extra),
        )

    def strategy_of(self, cid: int) -> tuple[type[ClientStrategy], Any]:
        """Client ``cid``'s strategy class and params."""
        return self._strategies[cid]

    def fresh_node(self, cid: int, rnd: int = 1) -> tuple[ClientStrategy, ClientNode]:
        """Client ``cid``'s strategy and a newly built node, as in its first round (no
        state, no ``setup``): to inspect what the client would train with."""
        cls, params = self._strategies[cid]
        strategy = cls(params)
        return strategy, self._node(cid, rnd, None, strategy)

    def _losses(self, cid: int, extra: dict[str, Any]) -> RoutedLoss | None:
        """The configured training loss (``strategy.losses``) of client ``cid``, with its
        learnable parts as the client last saved them."""
        configured = client_losses(self.config, cid)
        if configured is None:
            return None
        specs, path = configured
        seed = derive_seed(self.config.seed, "kd-losses", cid)
        return RoutedLoss.from_config(specs, path, seed=seed, state=extra.get(LOSSES_KEY))

    def train(
        self,
        cid: int,
        rnd: int,
        targets: Payload | None,
        public_idx: np.ndarray,
        store: StateStore | None = None,
    ) -> TrainReply:
        """One round for client ``cid``: restore, train, predict, release, evaluate, save
        (in ``store``, default the runtime's: e.g. the state a message carries)."""
        start = time.perf_counter()
        self._check_targets(targets)
        strategy, node = self._begin(cid, rnd, store)
        trained = check_metrics(strategy, "train", strategy.train(node, targets))
        return self._finish(strategy, node, trained, public_idx, store, start)

    def train_many(
        self,
        cids: Sequence[int],
        rnd: int,
        targets: Payload | None,
        public_idx: np.ndarray,
        store: StateStore | None = None,
        *,
        together: bool = False,
    ) -> dict[int, TrainReply | Exception]:
        """Several clients' rounds in this process (one message's worth: no task per
        client). Each client's reply, or the exception that ended its round (the others
        go on). ``together``: clients of the same strategy and params are trained by one
        call of :meth:`ClientStrategy.train_group` (e.g. vectorised, :mod:`fedkd.vectorize`);
        otherwise one after another, exactly as :meth:`train`."""
        out: dict[int, TrainReply | Exception] = {}
        for group in self._groups(cids) if together else [[cid] for cid in cids]:
            if len(group) == 1:  # exactly as train()
                out[group[0]] = self._one(group[0], rnd, targets, public_idx, store)
            else:
                out.update(self._train_group(group, rnd, targets, public_idx, store))
        return {cid: out[cid] for cid in cids}

    def _groups(self, cids: Sequence[int]) -> list[list[int]]:
        """``cids`` grouped by strategy class and params where the strategy trains in groups
        (:meth:`ClientStrategy.train_group`); the others alone. First-seen order."""
        groups: dict[Any, list[int]] = {}
        for cid in cids:
            cls, params = self._strategies[cid]
            key = (cls, repr(params)) if cls.trains_in_groups() else cid
            groups.setdefault(key, []).append(cid)
        return list(groups.values())

    def _one(
        self,
        cid: int,
        rnd: int,
        targets: Payload | None,
        public_idx: np.ndarray,
        store: StateStore | None,
    ) -> TrainReply | Exception:
        try:
            return self.train(cid, rnd, targets, public_idx, store)
        except Exception as err:  # a failing client must not end the others' rounds
            return err

    def _train_group(
        self,
        cids: list[int],
        rnd: int,
        targets: Payload | None,
        public_idx: np.ndarray,
        store: StateStore | None,
    ) -> dict[int, TrainReply | Exception]:
        """Clients of one strategy and params: each restored, all trained by one call of
        :meth:`ClientStrategy.train_group`, each finished alone. A client is charged its
        own time plus an equal share of the group's training."""
        out: dict[int, TrainReply | Exception] = {}
        try:
            self._check_targets(targets)
        except TargetsError as err:
            return {cid: err for cid in cids}
        begun: dict[int, tuple[ClientStrategy, ClientNode, float]] = {}
        for cid in cids:
            start = time.perf_counter()
            try:
                strategy, node = self._begin(cid, rnd, store)
                begun[cid] = (strategy, node, time.perf_counter() - start)
            except Exception as err:  # this client only
                out[cid] = err
        if not begun:
            return out
        start = time.perf_counter()
        try:
            trained = self._trained_together(begun, targets)
        except Exception as err:  # the group trained as one: each of its clients failed
            return {**out, **{cid: err for cid in begun}}
        share = (time.perf_counter() - start) / len(begun)
        for (cid, (strategy, node, spent)), metrics in zip(begun.items(), trained, strict=True):
            began = time.perf_counter() - spent - share  # as if it had run alone
            try:
                out[cid] = self._finish(strategy, node, metrics, public_idx, store, began)
            except Exception as err:
                out[cid] = err
        return out

    @staticmethod
    def _trained_together(
        begun: dict[int, tuple[ClientStrategy, ClientNode, float]], targets: Payload | None
    ) -> list[dict[str, float]]:
        """One call of the first strategy's ``train_group`` on all the nodes, checked."""
        strategy = next(iter(begun.values()))[0]
        nodes = [node for _, node, _ in begun.values()]
        trained = strategy.train_group(nodes, targets)
        if not isinstance(trained, list) or len(trained) != len(nodes):
            raise HookError(
                f"{type(strategy).__name__}.train_group returned {describe(trained)}; the "
                f"contract expects a list of {len(nodes)} metrics dicts, one per node"
            )
        return [check_metrics(strategy, "train_group", m) for m in trained]

    def _check_targets(self, targets: Payload | None) -> None:
        if targets is not None:
            try:
                targets.validate(num_classes=self.data.num_classes)
            except PayloadError as err:
                why = f"invalid {targets.kind} targets from the server: {err}"
                raise TargetsError(why) from err

    def _begin(
        self, cid: int, rnd: int, store: StateStore | None
    ) -> tuple[ClientStrategy, ClientNode]:
        """Client ``cid``'s strategy (a fresh instance) and node, restored from ``store``
        (set up by the strategy where the client is new)."""
        cfg = self.config
        if not 0 <= cid < cfg.clients.count:
            raise ValueError(f"client id {cid} outside 0..{cfg.clients.count - 1}")
        seed_client_round(cfg.seed, rnd, cid)
        cls, params = self._strategies[cid]
        strategy = cls(params)  # a fresh instance each round: no state outside node.state
        state = (self.store if store is None else store).load(cid, rnd)
        node = self._node(cid, rnd, state, strategy)
        if state is None:
            strategy.setup(node)
        return strategy, node

    def _finish(
        self,
        strategy: ClientStrategy,
        node: ClientNode,
        trained: dict[str, float],
        public_idx: np.ndarray,
        store: StateStore | None,
        start: float,
    ) -> TrainReply:
        """After training: predict, release, evaluate, save; the reply."""
        metrics = {f"train_{k}": v for k, v in trained.items()}
        payload = check_payload(strategy, "predict", strategy.predict(node, public_idx))
        metrics.update(self.mechanism.report(node))  # e.g. DP-SGD's steps and epsilon
        payload = self._release(node, payload)
        metrics.update(self._evaluate(node))
        extra = check_metrics(strategy, "evaluate", strategy.evaluate(node))
        metrics.update({f"eval_{k}": v for k, v in extra.items()})
        metrics["num_examples"] = float(node.num_examples)
        metrics["seconds"] = time.perf_counter() - start
        (self.store if store is None else store).save(node.cid, node.round, dump_state(node))
        return TrainReply(node.cid, payload, metrics)

    def _release(self, node: ClientNode, payload: Payload | None) -> Payload | None:
        """What leaves the client: the payload after local DP noise, or, from a Byzantine
        client, its attack on that (an attacker does not clip its own upload)."""
        cfg, cid, rnd = self.config, node.cid, node.round
        if payload is not None:  # e.g. local DP: clipped and noised before upload
            noise = NoiseSource(cfg.seed, cfg.privacy.secure_noise)
            payload = self.mechanism.release(payload, noise=noise, rnd=rnd, cid=cid)
        if payload is not None and cid in self.byzantine:
            payload = byzantine_payload(cfg, rnd, cid, payload, self.data.num_classes)
        return payload

    def _evaluate(self, node: ClientNode) -> dict[str, float]:
        """Test metrics of the student, and the membership audit where asked for."""
        logits = predict_logits(node.model, node.test_x)  # once, for both metrics
        metrics = logit_metrics(logits, node.test_y)  # what node.evaluate() gives
        metrics["own_accuracy"] = own_accuracy(node, logits)
        if self.config.privacy.audit:
            from fedkd.privacy.audit import loss_attack

            members = node.private_data()
            metrics.update(loss_attack(node.model, members, (node.test_x, node.test_y)))
        return metrics


def own_accuracy(node: ClientNode, logits: torch.Tensor | None = None) -> float:
    """The student's accuracy on the client's own test distribution: per-class accuracy
    on the global test set, weighted by the client's private label shares (FedMD and
    DS-FL report per-client accuracy; the global test set has every class). ``logits``:
    the student's on the test set, if already computed. A measurement of the simulator
    (like the membership audit), not a release."""
    _, y = node.private_data()
    if logits is None:
        logits = predict_logits(node.model, node.test_x)
    return label_weighted_accuracy(logits, node.test_y, y, node.num_classes)


def label_weighted_accuracy(
    logits: torch.Tensor, test_y: torch.Tensor, private_y: torch.Tensor, num_classes: int
) -> float:
    """Per-class test accuracy of ``logits`` weighted by the label shares of ``private_y``
    (classes the test set lacks carry no weight; the rest are renormalised)."""
    shares = torch.bincount(private_y.cpu(), minlength=num_classes).double()
    shares = shares / shares.sum().clamp(min=1)
    pred = logits.argmax(-1).cpu()
    test_y = test_y.cpu()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(
        0, test_y, (pred == test_y).double()
    )
    counts = torch.bincount(test_y, minlength=num_classes).double()
    present = counts > 0
    per_class = torch.where(present, hits / counts.clamp(min=1), torch.zeros_like(hits))
    weight = shares * present
    return float((weight * per_class).sum() / weight.sum()) if weight.sum() > 0 else 0.0


_RUNTIMES: dict[tuple[str, str, str], ClientRuntime] = {}


def get_runtime(config: Config, data_path: str, state_dir: str) -> ClientRuntime:
    """The process-wide runtime for this experiment (data loaded once per worker)."""
    key = (repr(config), data_path, state_dir)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = ClientRuntime(config, data_path, DiskStateStore(state_dir))
    return _RUNTIMES[key]
