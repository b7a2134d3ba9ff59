"""Record-level DP-SGD for a client's local training, through Opacus.

Each call wraps the client's student and optimizer in Opacus (per-sample gradient
clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``,
Poisson-sampled batches of expected size ``clients.batch_size``), trains the given
epochs of cross-entropy on the private data, then unwraps them, so the student is
a plain module again for prediction, payloads and saving. The accountant's history
is kept by the runtime (mirrored in ``node.state``, saved and restored next round),
so epsilon composes over all the rounds a client took part in.

The private data is read only here, through ``node.private_data()`` (it is sealed
from strategies, :mod:`fedkd.privacy.guard`); the KD steps that may follow touch only
public inputs (:meth:`fedkd.strategy.ClientNode.train_private`).
"""

from __future__ import annotations

import traceback
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedkd.config import Config, PrivacyConfig
from fedkd.seeding import torch_generator

if TYPE_CHECKING:
    from collections.abc import Callable

    from fedkd.client_node import ClientNode
    from fedkd.recipes import Recipe

HISTORY_KEY = "dpsgd_history"


def make_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """Replace layers Opacus cannot handle (e.g. BatchNorm -> GroupNorm)."""
    from opacus.validators import ModuleValidator

    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    return model


def check_models(config: Config, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse, before anything runs, students with BatchNorm under DP-SGD: BatchNorm mixes
    the samples of a batch, so per-sample gradients (and their clipping) are undefined;
    Opacus refuses it. Swapping in another norm silently would train another model than
    the one configured (and FedAvg could not load the server's BatchNorm weights)."""
    from fedkd.assignment import student_spec
    from fedkd.config import ConfigError
    from fedkd.models import MODELS, build_model

    seen: set[str] = set()
    for cid in range(config.clients.count):
        spec = student_spec(config, cid)
        if str(spec) in seen:
            continue
        seen.add(str(spec))
        model = build_model(spec, input_shape, num_classes, seed=0)
        norms = [
            name
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        if not norms:
            continue
        field = "clients.models"
        for key, group in config.clients.model_groups.items():
            if group == spec:
                field = f"clients.model_groups.{key}"
        twin = f"{spec.name}_gn"
        hint = (
            f"use its GroupNorm variant '{twin}'"
            if twin in MODELS.names()
            else "use a model without BatchNorm (e.g. GroupNorm, as the *_gn zoo models)"
        )
        raise ConfigError(
            field,
            f"{spec} has BatchNorm layers ({len(norms)}, first {norms[0]!r}), which "
            "privacy.mechanism = 'dpsgd' cannot train: BatchNorm mixes the samples of a "
            f"batch, so per-sample gradients cannot be clipped (Opacus refuses it); {hint}",
        )


def check_secure_mode() -> None:
    """Opacus' secure mode needs torchcsprng; say so before anything runs."""
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        from fedkd.config import ConfigError

        raise ConfigError(
            "privacy.secure_noise",
            "DP-SGD's secure mode needs the torchcsprng package (Opacus' secure RNG), "
            "which is not installed",
        ) from None


def _check_budget(
    node: ClientNode, privacy: PrivacyConfig, sigma: float, history: list, epochs: int
) -> None:
    """Refuse DP-SGD steps that would take this client past ``privacy.target_epsilon``
    (the server also stops rounds ahead; this catches extra private epochs, e.g. a
    strategy's warm-up, that it could not foresee)."""
    if privacy.target_epsilon <= 0 or epochs <= 0:
        return
    from fedkd.privacy.accounting import (
        PrivacyError,
        accountant_epsilon,
        dpsgd_steps_per_round,
    )

    q, steps = dpsgd_steps_per_round(node.num_examples, node.settings.batch_size, epochs)
    eps = accountant_epsilon([*history, (sigma, q, steps)], privacy.delta, privacy.accountant)
    if eps > privacy.target_epsilon:
        raise PrivacyError(
            f"client {node.cid}: {epochs} more DP-SGD epochs would raise epsilon to {eps:.3g} "
            f"> target {privacy.target_epsilon:g}; nothing was trained or released"
        )


def dp_train(node: ClientNode, *, epochs: int, params: Any = None) -> dict[str, Any]:
    """``epochs`` of DP-SGD cross-entropy on the client's private data, under the node's
    own (locked) privacy settings, the mechanism's ``params`` (``noise_multiplier``,
    ``max_grad_norm``; default: those the node's settings configure) and the
    runtime-kept accountant history.

    Refuses, before touching the data, steps past the budget and a student or optimizer
    that anything but Opacus could watch (:func:`fedkd.privacy.guard.check_untampered`).
    """
    try:
        return _dp_steps(node, epochs, params)
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # no private batch stays reachable from it
        raise


def _dp_steps(node: ClientNode, epochs: int, params: Any) -> dict[str, Any]:
    """The checks, then Opacus wraps the student, trains ``epochs`` and is removed; the
    steps taken are accounted even if training fails part-way."""
    from fedkd.privacy import guard

    privacy = node.privacy
    if privacy is None or privacy.mechanism != "dpsgd":
        raise ValueError("dp_train needs a node under privacy.mechanism = 'dpsgd'")
    if params is None:
        from fedkd.privacy.mechanism import make_mechanism

        params = make_mechanism(privacy).params
    history = list(guard.stored(node, HISTORY_KEY))
    _check_budget(node, privacy, params.noise_multiplier, history, epochs)
    guard.check_untampered(node)
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Secure RNG turned off": we say so in the docs
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=privacy.secure_noise)
    engine.accountant.history = history
    prior_steps = int(sum(h[2] for h in history))
    loader = DataLoader(
        TensorDataset(*node.private_data()), batch_size=node.settings.batch_size, shuffle=False
    )
    noise = _noise_generator(node, privacy, prior_steps)
    model, optimizer, private_loader = engine.make_private(
        module=node.model,
        optimizer=node.optimizer,
        data_loader=loader,
        noise_multiplier=params.noise_multiplier,
        max_grad_norm=params.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
    )
    recipe = node.recipe  # rate schedule and label smoothing (clipping is DP-SGD's own)
    augment = node.augmenter()  # per-sample transforms: the accounting is unchanged
    model.train()
    try:
        total, steps = _dp_epochs(model, optimizer, private_loader, epochs, recipe, augment)
    finally:
        model.cleanup()  # remove Opacus' hooks: node.model is a plain module again
        for p in node.model.parameters():
            p.grad_sample = None
            p.grad = None
        history = [tuple(h) for h in engine.accountant.history]
        guard.store(node, HISTORY_KEY, history)
        guard.store(node, "dp_ran", True)
        node.state[HISTORY_KEY] = list(history)
    return {"ce": total / max(steps, 1), "dp_steps_round": float(steps)}


def _noise_generator(
    node: ClientNode, privacy: PrivacyConfig, prior_steps: int
) -> torch.Generator | None:
    """The seeded generator of the DP noise on the node's device (None: secure noise)."""
    # keyed by the steps taken so far too: two calls in one round never share noise
    noise = None
    if not privacy.secure_noise:
        noise = torch_generator(node.seed, "dpsgd", node.round, node.cid, prior_steps)
        if node.device.type != "cpu":
            noise = torch.Generator(device=node.device).manual_seed(int(noise.initial_seed()))
    return noise


def _dp_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    private_loader: DataLoader,
    epochs: int,
    recipe: Recipe,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[float, int]:
    """``epochs`` of DP-SGD cross-entropy with Opacus' model and optimizer: (summed loss, steps)."""
    total, steps = 0.0, 0
    planned = epochs * len(private_loader)  # expected steps: the step clock's length
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(epochs):
            for x, y in private_loader:
                recipe.set_lr(optimizer, epoch=epoch, epochs=epochs, step=steps, steps=planned)
                optimizer.zero_grad(set_to_none=True)
                out = model(x if augment is None or not len(x) else augment(x))
                # Poisson sampling can draw an empty batch: still a (noise-only) step
                loss = (
                    F.cross_entropy(out, y, label_smoothing=recipe.label_smoothing)
                    if len(y)
                    else out.sum() * 0.0
                )
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
    return total, steps
