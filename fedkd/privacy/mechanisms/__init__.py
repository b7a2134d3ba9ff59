"""The built-in privacy mechanisms, one module each, registered in
:data:`fedkd.privacy.mechanism.MECHANISMS` on import."""

from fedkd.privacy.mechanisms import client_gaussian, dpsgd, none

__all__ = ["client_gaussian", "dpsgd", "none"]
