"""Differential privacy: noise, clipping, accounting, DP-SGD and a membership audit.

Two privacy units, never mixed up (each result says which one it reports):

* **client-level** (everything one client contributes in the run):
  ``privacy.mechanism = "client_gaussian"`` clips each client's shared payload to
  L2 norm C and adds Gaussian noise, at the server to the mean (``mode =
  "central"``) or on each client before upload (``mode = "local"``); and the
  ``pate`` strategy, whose noisy-argmax labels change by one vote when a whole
  client (teacher) changes.
* **record-level** (one training example of one client):
  ``privacy.mechanism = "dpsgd"``, Opacus DP-SGD on each client's local training.

Mechanisms are plug-ins (:mod:`fedkd.privacy.mechanism`): each declares where it acts,
its parameters and what it spends; a user's own is selected by import path. Every
mechanism composes over rounds through an Opacus accountant (RDP or PRV) or,
for PATE's GNMax, an RDP curve converted with Opacus' RDP analysis; epsilon at
``privacy.delta`` is written to every round's record.
"""

from fedkd.privacy.accounting import PrivacyError, PrivacyLedger
from fedkd.privacy.mechanism import MECHANISMS, Mechanism, make_mechanism, mechanism_of
from fedkd.privacy.noise import NoiseSource

__all__ = [
    "MECHANISMS",
    "Mechanism",
    "NoiseSource",
    "PrivacyError",
    "PrivacyLedger",
    "make_mechanism",
    "mechanism_of",
]
