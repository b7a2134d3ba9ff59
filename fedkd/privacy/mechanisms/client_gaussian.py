"""Client-level Gaussian mechanism on shared payloads (``privacy.mechanism =
"client_gaussian"``): each client's payload clipped to L2 norm ``clip``, with
Gaussian noise added at the server to the mean (``mode = "central"``, acts on the
aggregate) or by each client before upload (``mode = "local"``, acts on the upload).
The maths is in :mod:`fedkd.privacy.release`. Parameters (:class:`ClientGaussianParams`):
``mode``, ``clip``, ``noise_multiplier``, in ``[privacy.params]`` or as the flat
``privacy.<key>`` short form.

Accounting: one Gaussian release (sensitivity-normalised noise ``noise_multiplier``,
sample rate 1) per participation, composed by Opacus' accountant; no amplification by
client sampling (the sample is drawn from the run seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedkd.config import ConfigError, PrivacyConfig
from fedkd.privacy.accounting import merge
from fedkd.privacy.mechanism import MECHANISMS, Mechanism
from fedkd.privacy.release import FIELDS, central_mean, local_release

if TYPE_CHECKING:
    from fedkd.config import Config
    from fedkd.payloads import Payload
    from fedkd.privacy.accounting import History, PrivacyLedger
    from fedkd.privacy.noise import NoiseSource


@dataclass(frozen=True)
class ClientGaussianParams:
    """``[privacy.params]`` of client_gaussian (or the flat ``privacy.<key>`` short form)."""

    mode: str = "central"  # central (the server adds noise) | local (each client does)
    clip: float = 1.0  # L2 bound C on each client's payload per round
    noise_multiplier: float = 1.0  # sigma: noise std / sensitivity

    def __post_init__(self) -> None:
        if self.mode not in ("central", "local"):
            raise ValueError(f"mode must be central or local, got {self.mode!r}")
        if not (self.clip > 0 and self.noise_multiplier > 0):
            raise ValueError("clip and noise_multiplier must be > 0")


@MECHANISMS.register("client_gaussian")
class ClientGaussian(Mechanism):
    """Clip each client's payload, add Gaussian noise centrally or locally."""

    Params = ClientGaussianParams
    short_form = ("mode", "clip", "noise_multiplier")

    def __init__(self, privacy: PrivacyConfig) -> None:
        super().__init__(privacy)
        self.acts_on = "aggregate" if self.params.mode == "central" else "upload"
        self.unit = f"client-level ({self.params.mode} Gaussian on shared payloads)"

    def check_config(self, config: Config, strategy: Any) -> None:
        bad = [t for t in strategy.accepts if not issubclass(t, tuple(FIELDS))]
        if bad:
            kinds = ", ".join(getattr(t, "kind", t.__name__) for t in bad)
            raise ConfigError(
                "privacy.mechanism",
                f"client_gaussian clips and noises logits, soft labels or class logits; "
                f"strategy {config.strategy.name!r} exchanges {kinds}",
            )
        if self.acts_on == "aggregate" and not strategy.aggregates_by_mean():
            raise ConfigError(
                "privacy.mode",
                f"central noise is calibrated to a plain mean, and strategy "
                f"{config.strategy.name!r} does not aggregate by one; use mode = 'local'",
            )
        if self.acts_on == "aggregate" and config.server.aggregator.name != "mean":
            raise ConfigError(
                "server.aggregator",
                f"{config.server.aggregator.name!r} cannot apply under central noise: the "
                "server releases one noisy mean of the clipped payloads; use mode = 'local' "
                "or aggregator = 'mean'",
            )

    def release(self, payload: Payload, *, noise: NoiseSource, rnd: int, cid: int) -> Payload:
        if self.acts_on != "upload":
            return payload
        p = self.params
        return local_release(payload, p.clip, p.noise_multiplier, noise, rnd, cid)

    def aggregate(
        self, payloads: dict[int, Payload], *, noise: NoiseSource, rnd: int, sampled: int
    ) -> dict[int, Payload]:
        if self.acts_on != "aggregate" or not payloads:
            return payloads
        p = self.params
        return {-1: central_mean(payloads, p.clip, p.noise_multiplier, noise, rnd, sampled)}

    def history(self, ledger: PrivacyLedger, cid: int, extra_round: bool) -> History:
        sigma = self.params.noise_multiplier
        return [*ledger.per_client.get(cid, []), *([(sigma, 1.0, 1)] if extra_round else [])]

    def charge(
        self, ledger: PrivacyLedger, cids: list[int], metrics: dict[int, dict[str, float]]
    ) -> None:
        # central: every sampled client is in the release (a missing payload counts as a
        # zero vector); local: every client that uploaded released its noisy payload
        charged = cids if self.acts_on == "aggregate" else list(metrics)
        for cid in charged:
            ledger.per_client[cid] = merge(self.history(ledger, cid, True))
