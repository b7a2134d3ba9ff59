"""No mechanism: nothing is noised, nothing is accounted (``privacy.mechanism = "none"``)."""

from __future__ import annotations

from fedkd.privacy.mechanism import MECHANISMS, Mechanism


@MECHANISMS.register("none")
class NoMechanism(Mechanism):
    """The default: no differential privacy (a strategy may still be its own mechanism)."""

    @property
    def active(self) -> bool:
        return False
