"""The networks, one file per architecture, and the registry model packages name them by.

A package's ``model.json`` says ``"architecture": "metricunet"`` and the
constructor ``arguments``; `build` turns that into a module. Only inference
parts live here: the training-only losses and samplers are in the training kit
(``training/losses/``, one module per network) and never enter a package.
"""

from __future__ import annotations

from ..errors import ModelPackageError


def _registry() -> dict:
    from .hfunet import HFUNet
    from .hmedn import HMEDN
    from .hmrnet import HMRNet
    from .metricunet import MetricUNet
    from .unet import UNet2p5D

    return {"unet2p5d": UNet2p5D, "metricunet": MetricUNet, "hfunet": HFUNet, "hmedn": HMEDN, "hmrnet": HMRNet}


def architectures() -> list[str]:
    """Names a package may use in ``stages.*.architecture``."""
    return sorted(_registry())


def build(architecture: str, arguments: dict | None = None):
    """A network from its registry name and constructor arguments (clear error for unknown ones)."""
    registry = _registry()
    try:
        cls = registry[architecture]
    except KeyError:
        raise ModelPackageError(
            f"unknown network architecture {architecture!r}; this ProstateSeg knows "
            f"{', '.join(sorted(registry))}. The package may need a newer ProstateSeg."
        ) from None
    try:
        return cls(**(arguments or {}))
    except TypeError as error:
        raise ModelPackageError(f"cannot build {architecture!r} with arguments {arguments}: {error}") from None


def load_state(network, state: dict, what: str) -> None:
    """Load weights strictly; a mismatch names the package stage and what differs."""
    import torch

    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
                         f"instead of {tuple(own[k].shape)})")
        raise ModelPackageError(f"{what}: the weights do not fit the declared architecture: {'; '.join(parts)}.")
    network.load_state_dict({k: v.to(own[k].dtype) if torch.is_floating_point(v) else v for k, v in state.items()})
