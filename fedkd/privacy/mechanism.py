"""Privacy mechanisms as plug-ins: where each acts, its parameters, what it spends.

A mechanism is a :class:`Mechanism` subclass registered in :data:`MECHANISMS`, or a
user's own class selected by import path (``privacy.mechanism =
"my_lab.dp:LaplaceUpload"``). It declares:

* **where it acts** (:attr:`Mechanism.acts_on`): ``"training"`` (the client's private
  training, e.g. DP-SGD; the private data is then sealed, :mod:`fedkd.privacy.guard`),
  ``"upload"`` (each payload before it leaves the client, :meth:`Mechanism.release`),
  ``"aggregate"`` (the server's aggregate, :meth:`Mechanism.aggregate`), or
  ``"none"``. (``"votes"``: a strategy that is itself the mechanism, such as PATE's
  GNMax, declares ``ServerStrategy.own_mechanism`` and charges the ledger itself.)
* **its parameters**: its own table ``[privacy.params]``, checked against its
  ``Params`` dataclass when the config loads (an error names
  ``privacy.params.<field>``); a mechanism may also take some of them as flat
  ``[privacy]`` keys (:attr:`Mechanism.short_form`: the built-ins' ``clip``,
  ``noise_multiplier``, ...), and setting one both ways is refused;
* **what it spends**: :meth:`Mechanism.charge` after each round and
  :meth:`Mechanism.epsilon` per client (by default through Opacus' accountant from
  :meth:`Mechanism.history`), which :class:`~fedkd.privacy.accounting.PrivacyLedger`
  composes, projects for the budget and reports.

The round loop, the client runtime and the strategies ask the mechanism object
(:func:`make_mechanism`) and never compare its name.

Example:
    >>> @MECHANISMS.register("laplace_upload")       # or by import path, unregistered
    ... class LaplaceUpload(Mechanism):
    ...     Params = LaplaceParams                     # frozen dataclass: [privacy.params]
    ...     acts_on = "upload"
    ...     def release(self, payload, *, noise, rnd, cid): ...
    ...     def charge(self, ledger, cids, metrics): ...
    ...     def epsilon(self, ledger, cid, extra_round): ...
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, ClassVar

from fedkd.config import ConfigError, PrivacyConfig
from fedkd.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedkd.client_node import ClientNode
    from fedkd.config import Config
    from fedkd.data import FederatedData
    from fedkd.payloads import Payload
    from fedkd.privacy.accounting import History, PrivacyLedger
    from fedkd.privacy.noise import NoiseSource

#: the flat [privacy] keys' defaults (a short-form key counts as set when it differs)
_FLAT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PrivacyConfig)}

#: the stages a mechanism may act on
STAGES = ("none", "training", "upload", "aggregate", "votes")


class Mechanism:
    """One differential-privacy mechanism of a run, built from ``[privacy]``.

    Every hook has a harmless default, so a mechanism overrides only those of its stage
    and its accounting. Instances are cheap: the client runtime, the round loop and the
    ledger each build their own; the ledger's (saved with the run's checkpoints) is the
    one :meth:`charge` is called on, so accounting state kept on it survives a resume.
    """

    #: the mechanism's own parameters (``[privacy.params]``), a dataclass; None: none
    Params: ClassVar[type | None] = None
    #: fields of ``Params`` that may also be set as flat ``[privacy]`` keys of the same
    #: name (the short form), e.g. ``privacy.clip`` for ``privacy.params.clip``
    short_form: ClassVar[tuple[str, ...]] = ()
    #: where it acts: one of :data:`STAGES`; an instance may refine it between "upload" and
    #: "aggregate" (client_gaussian's mode), but "training" is declared on the class
    acts_on: str = "none"
    #: the privacy unit it protects, as reported with every epsilon
    unit: str = "none"
    #: for a training-time mechanism: what a strategy calls to train on the sealed data
    trains_with: ClassVar[str] = ""
    #: the accountant named in the records (None: ``privacy.accountant``)
    accountant: ClassVar[str | None] = None

    def __init__(self, privacy: PrivacyConfig) -> None:
        self.privacy = privacy
        self.params = self.parse_params(privacy)

    # --- configuration ---------------------------------------------------------------

    @classmethod
    def parse_params(cls, privacy: PrivacyConfig, path: str = "params") -> Any:
        """``[privacy.params]``, with the flat keys of :attr:`short_form`, as this
        mechanism's ``Params`` (a ConfigError names the field)."""
        values = dict(privacy.params)
        for key in cls.short_form:
            flat = getattr(privacy, key)
            if key in values and flat != _FLAT_DEFAULTS[key]:
                raise ConfigError(
                    f"{path}.{key}",
                    f"set both as privacy.{key} and privacy.{path}.{key}; keep one",
                )
            values.setdefault(key, flat)
        if cls.Params is None:
            if values:
                key = next(iter(values))
                raise ConfigError(
                    f"{path}.{key}", "unknown parameter: this mechanism takes no parameters"
                )
            return None
        from fedkd.config import from_dict

        try:
            return from_dict(cls.Params, values, path)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(path, str(err)) from None

    @property
    def active(self) -> bool:
        """Whether the mechanism does anything (and so is accounted and reported)."""
        return True

    @property
    def seals(self) -> bool:
        """Whether clients' private data is sealed (a training-time mechanism)."""
        return self.acts_on == "training"

    def check_config(self, config: Config, strategy: Any) -> None:
        """Refuse a config or server strategy this mechanism cannot serve (ConfigError)."""

    def check_recipes(self, config: Config) -> None:
        """Refuse training settings that contradict the mechanism (``check_recipes``)."""

    def check_data(self, config: Config, data: FederatedData) -> None:
        """Refuse, once the data is built, students the mechanism cannot train."""

    # --- the runtime's hooks ------------------------------------------------------------

    def student(self, model: torch.nn.Module) -> torch.nn.Module:
        """The client's student as the mechanism trains it (DP-SGD swaps layers)."""
        return model

    def train(self, node: ClientNode, *, epochs: int) -> dict[str, float]:
        """``epochs`` of private training on the sealed data (training-time mechanisms)."""
        raise NotImplementedError(f"{type(self).__name__} does not train")

    def release(self, payload: Payload, *, noise: NoiseSource, rnd: int, cid: int) -> Payload:
        """What client ``cid`` uploads in round ``rnd`` (upload-time mechanisms)."""
        return payload

    def report(self, node: ClientNode) -> dict[str, float]:
        """The client's privacy metrics of the round (e.g. DP-SGD steps, epsilon), added to
        its metrics. Default: none."""
        return {}

    @property
    def hides_payloads(self) -> bool:
        """True if the server strategy sees only :meth:`aggregate`'s release."""
        return self.acts_on == "aggregate"

    def aggregate(
        self, payloads: dict[int, Payload], *, noise: NoiseSource, rnd: int, sampled: int
    ) -> dict[int, Payload]:
        """What the server strategy aggregates (aggregate-time mechanisms release one
        payload, keyed -1, from the ``sampled`` clients' payloads)."""
        return payloads

    # --- accounting --------------------------------------------------------------------

    def history(self, ledger: PrivacyLedger, cid: int, extra_round: bool) -> History:
        """Client ``cid``'s (noise multiplier, sample rate, steps) so far, plus one more
        round if ``extra_round``: what Opacus' accountant composes by default."""
        return []

    def epsilon(self, ledger: PrivacyLedger, cid: int, extra_round: bool) -> float:
        """Client ``cid``'s epsilon at ``privacy.delta`` (plus one more round if
        ``extra_round``). Default: Opacus' accountant over :meth:`history`."""
        from fedkd.privacy.accounting import accountant_epsilon

        p = self.privacy
        return accountant_epsilon(self.history(ledger, cid, extra_round), p.delta, p.accountant)

    def charge(
        self, ledger: PrivacyLedger, cids: list[int], metrics: dict[int, dict[str, float]]
    ) -> None:
        """Account for a finished round: ``cids`` were sampled, ``metrics`` holds every
        client that replied (rejected replies included)."""


def _is_mechanism(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Mechanism)


MECHANISMS: Registry[type[Mechanism]] = Registry(
    "privacy mechanism",
    _is_mechanism,
    autoload="fedkd.privacy.mechanisms",
    group="fedkd.mechanisms",
)


@functools.cache
def mechanism_class(name: str) -> type[Mechanism]:
    """The class ``privacy.mechanism`` names (a registered name or an import path)."""
    return MECHANISMS.get(name)


def make_mechanism(privacy: PrivacyConfig | None) -> Mechanism:
    """The mechanism ``privacy`` configures (None: no privacy)."""
    return mechanism_class("none" if privacy is None else privacy.mechanism)(
        privacy if privacy is not None else PrivacyConfig()
    )


def mechanism_of(config: Config) -> Mechanism:
    """The mechanism of a run's config."""
    return make_mechanism(config.privacy)
