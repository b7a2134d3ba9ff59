"""The client side of a round, independent of Flower: build or restore the student,
call the client strategy's hooks, evaluate, and save state.

:class:`ClientRuntime` is what both the Flower ClientApp (:mod:`fedkd.flower`) and
the in-process runner (:mod:`fedkd.inline`) call, so a strategy behaves the same in both.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedkd.config import Config, Spec, parse_id_range
from fedkd.data import load_federated_data
from fedkd.models import build_model
from fedkd.payloads import Payload
from fedkd.privacy.accounting import accountant_epsilon
from fedkd.privacy.dpsgd import HISTORY_KEY
from fedkd.privacy.noise import NoiseSource
from fedkd.seeding import derive_seed, torch_generator
from fedkd.strategy import ClientNode, client_strategy, server_strategy
from fedkd.training import make_optimizer, to_tensor


def student_spec(config: Config, cid: int) -> Spec:
    """Client ``cid``'s architecture: an explicit ``clients.model_groups`` range,
    else round-robin over ``clients.models``."""
    for key, spec in config.clients.model_groups.items():
        if cid in parse_id_range(key, config.clients.count, "clients.model_groups"):
            return spec
    return config.clients.models[cid % len(config.clients.models)]


def resolve_device(config: Config) -> torch.device:
    """``cuda`` when asked for, or when ``auto`` and this process sees a GPU."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class FitReply:
    """What a client returns from a round."""

    cid: int
    payload: Payload | None
    metrics: dict[str, float]


class ClientRuntime:
    """Runs rounds for any client of one experiment (one instance per worker process)."""

    def __init__(self, config: Config, data_path: str) -> None:
        self.config = config
        self.data = load_federated_data(data_path)
        self.device = resolve_device(config)
        # resolve every strategy once: imports users' modules, registering their payload kinds
        server_strategy(config)
        for cid in range(config.clients.count):
            client_strategy(config, cid)
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

    def fit(
        self,
        cid: int,
        rnd: int,
        state: bytes | None,
        targets: Payload | None,
        public_idx: np.ndarray,
    ) -> tuple[FitReply, bytes]:
        """One round for client ``cid``; returns the reply and the client's new state."""
        start = time.perf_counter()
        cfg = self.config
        if not 0 <= cid < cfg.clients.count:
            raise ValueError(f"client id {cid} outside 0..{cfg.clients.count - 1}")
        if targets is not None:
            targets.validate(num_classes=self.data.num_classes)  # PayloadError names the fault
        torch.manual_seed(derive_seed(cfg.seed, "client-global", rnd, cid))
        data = self.data.client(cid)
        model = build_model(
            student_spec(cfg, cid),
            self.data.input_shape,
            self.data.num_classes,
            seed=derive_seed(cfg.seed, "student", cid),
        ).to(self.device)
        if cfg.privacy.mechanism == "dpsgd":
            from fedkd.privacy.dpsgd import make_compatible

            model = make_compatible(model)
        optimizer = make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr)
        extra: dict[str, Any] = {}
        if state is not None:
            saved = torch.load(io.BytesIO(state), weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            extra = saved["extra"]
        dev = self.device
        node = ClientNode(
            cid=cid,
            round=rnd,
            model=model,
            optimizer=optimizer,
            x=to_tensor(data.x, dev),
            y=to_tensor(data.y, dev),
            public_x=to_tensor(data.public_x, dev),
            public_y=to_tensor(data.public_y, dev),
            test_x=to_tensor(data.test_x, dev),
            test_y=to_tensor(data.test_y, dev),
            num_classes=data.num_classes,
            settings=cfg.clients,
            generator=torch_generator(cfg.seed, "client", rnd, cid),
            device=dev,
            state=extra,
            privacy=cfg.privacy if cfg.privacy.mechanism != "none" else None,
            seed=cfg.seed,
        )
        strategy = client_strategy(cfg, cid)
        if state is None:
            strategy.setup(node)
        metrics = {f"train_{k}": float(v) for k, v in strategy.train(node, targets).items()}
        payload = strategy.predict(node, public_idx)
        privacy = cfg.privacy
        if HISTORY_KEY in node.state:  # DP-SGD: this client's accountant, over all its rounds
            history = node.state[HISTORY_KEY]
            metrics["dp_steps"] = float(sum(h[2] for h in history))
            metrics["epsilon"] = accountant_epsilon(history, privacy.delta, privacy.accountant)
        if (
            payload is not None
            and privacy.mechanism == "client_gaussian"
            and privacy.mode == "local"
        ):
            from fedkd.privacy.payload import local_release

            noise = NoiseSource(cfg.seed, privacy.secure_noise)
            sigma = privacy.noise_multiplier
            payload = local_release(payload, privacy.clip, sigma, noise, rnd, cid)
        metrics.update(node.evaluate())
        if privacy.audit:
            from fedkd.privacy.audit import loss_attack

            metrics.update(loss_attack(node.model, (node.x, node.y), (node.test_x, node.test_y)))
        metrics["num_examples"] = float(node.num_examples)
        metrics["seconds"] = time.perf_counter() - start
        buf = io.BytesIO()
        torch.save(
            {
                "model": node.model.state_dict(),
                "optimizer": node.optimizer.state_dict(),
                "extra": node.state,
            },
            buf,
        )
        return FitReply(cid, payload, metrics), buf.getvalue()


_RUNTIMES: dict[tuple[str, str], ClientRuntime] = {}


def get_runtime(config: Config, data_path: str) -> ClientRuntime:
    """The process-wide runtime for this experiment (data loaded once per worker)."""
    key = (repr(config), data_path)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = ClientRuntime(config, data_path)
    return _RUNTIMES[key]
