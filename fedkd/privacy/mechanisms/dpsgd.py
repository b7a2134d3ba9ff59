"""Record-level DP-SGD on each client's local training, through Opacus
(``privacy.mechanism = "dpsgd"``; the training loop is :mod:`fedkd.privacy.dpsgd`).
Parameters (:class:`DPSGDParams`): ``noise_multiplier`` and ``max_grad_norm``, in
``[privacy.params]`` or as the flat ``privacy.<key>`` short form; also reads
``privacy.secure_noise``.

It acts on the training step: clients' private data is sealed, and the only training
path on it is ``node.train_private(...)`` (:mod:`fedkd.privacy.guard`), for built-in
and custom strategies alike. Accounting: each client's Opacus history of
(noise multiplier, Poisson sample rate, steps), composed by Opacus' accountant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedkd.config import ConfigError
from fedkd.privacy.accounting import accountant_epsilon, dpsgd_steps_per_round
from fedkd.privacy.mechanism import MECHANISMS, Mechanism

if TYPE_CHECKING:
    import torch

    from fedkd.client_node import ClientNode
    from fedkd.config import Config
    from fedkd.data import FederatedData
    from fedkd.privacy.accounting import History, PrivacyLedger


@dataclass(frozen=True)
class DPSGDParams:
    """``[privacy.params]`` of dpsgd (or the flat ``privacy.<key>`` short form)."""

    noise_multiplier: float = 1.0  # sigma: noise std / max_grad_norm
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.max_grad_norm > 0):
            raise ValueError("noise_multiplier and max_grad_norm must be > 0")


@MECHANISMS.register("dpsgd")
class DPSGD(Mechanism):
    """Opacus DP-SGD: per-sample clipping to ``max_grad_norm``, Gaussian noise."""

    Params = DPSGDParams
    short_form = ("noise_multiplier", "max_grad_norm")

    acts_on = "training"
    unit = "record-level (DP-SGD on each client's local training)"
    trains_with = "node.train_private(...), which runs DP-SGD"

    def check_config(self, config: Config, strategy: Any) -> None:
        if self.privacy.secure_noise:
            from fedkd.privacy.dpsgd import check_secure_mode

            check_secure_mode()

    def check_recipes(self, config: Config) -> None:
        if config.clients.grad_clip > 0:
            raise ConfigError(
                "clients.grad_clip",
                "under DP-SGD each sample's gradient is clipped to privacy.max_grad_norm; a "
                "clip of the summed, noised gradient would add nothing; set "
                "clients.grad_clip = 0",
            )

    def check_data(self, config: Config, data: FederatedData) -> None:
        from fedkd.privacy.dpsgd import check_models

        check_models(config, data.input_shape, data.num_classes)

    def student(self, model: torch.nn.Module) -> torch.nn.Module:
        from fedkd.privacy.dpsgd import make_compatible

        return make_compatible(model)

    def train(self, node: ClientNode, *, epochs: int) -> dict[str, float]:
        from fedkd.privacy.dpsgd import dp_train

        return dp_train(node, epochs=epochs, params=self.params)

    def report(self, node: ClientNode) -> dict[str, float]:
        from fedkd.privacy.dpsgd import HISTORY_KEY

        history = node.dp_history()
        if history is None:
            return {}
        p = self.privacy  # this client's accountant, as the runtime kept it
        node.state[HISTORY_KEY] = history  # saved as kept, whatever the strategy wrote
        return {
            "dp_steps": float(sum(h[2] for h in history)),
            "epsilon": accountant_epsilon(history, p.delta, p.accountant),
        }

    def history(self, ledger: PrivacyLedger, cid: int, extra_round: bool) -> History:
        c = ledger.config.clients
        q, per_round = dpsgd_steps_per_round(ledger.sizes.get(cid, 1), c.batch_size, c.local_epochs)
        per_round = max(per_round, ledger.dp_last.get(cid, 0))  # e.g. a warm-up round
        steps = ledger.dp_steps.get(cid, 0) + (per_round if extra_round else 0)
        return [(self.params.noise_multiplier, q, steps)]

    def charge(
        self, ledger: PrivacyLedger, cids: list[int], metrics: dict[int, dict[str, float]]
    ) -> None:
        for cid, m in metrics.items():
            if "dp_steps" in m:
                ledger.dp_last[cid] = int(m["dp_steps"]) - ledger.dp_steps.get(cid, 0)
                ledger.dp_steps[cid] = int(m["dp_steps"])
