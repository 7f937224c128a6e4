"""The networks, one file per architecture, and the registry model packages name them by.

A package's ``model.json`` says ``"architecture": "metricunet"`` and the
constructor ``arguments``; `build` turns that into a module. Only inference
parts live here: the training-only losses and samplers are in the training kit
(``training/losses/``, one module per network) and never enter a package.
"""

from __future__ import annotations

import math

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


# What a package may ask of a network. Every whole number a package passes to a constructor is a size or a
# count (channels, levels, points, anchors...), so it must be from 1 to MAX_WHOLE_ARGUMENT; lists are short;
# and the network is first built without memory (on torch's "meta" device) so that its parameters can be
# counted before anything is allocated.
MAX_WHOLE_ARGUMENT = 16384
MAX_LIST_ARGUMENT = 16
MAX_PARAMETERS = 200_000_000  # 0.8 GB of float32 weights; the bundled networks have 0.5-4 M


def build(architecture: str, arguments: dict | None = None):
    """A network from its registry name and constructor arguments (clear error for unknown ones).

    Absurd arguments (non-positive or huge sizes, non-finite numbers, a network
    of more than `MAX_PARAMETERS` parameters) are refused before any memory is
    allocated; every refusal is a `ModelPackageError` naming the argument.
    """
    import torch

    registry = _registry()
    try:
        cls = registry[architecture]
    except KeyError:
        raise ModelPackageError(
            f"unknown network architecture {architecture!r}; this ProstateSeg knows "
            f"{', '.join(sorted(registry))}. The package may need a newer ProstateSeg."
        ) from None
    arguments = dict(arguments or {})
    _check_arguments(architecture, arguments, cls)
    with torch.device("meta"):
        counted = _construct(cls, architecture, arguments)
    count = sum(t.numel() for t in [*counted.parameters(), *counted.buffers()])
    if count > MAX_PARAMETERS:
        raise ModelPackageError(
            f"network {architecture!r} with arguments {_brief(arguments)} would have {count:,} parameters "
            f"({count * 4 / 1e9:.1f} GB), more than the {MAX_PARAMETERS:,} a package may ask for: its "
            "arguments are absurd or damaged. Re-export the package with the training kit."
        )
    return _construct(cls, architecture, arguments)


def _construct(cls, architecture: str, arguments: dict):
    try:
        return cls(**arguments)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as error:
        raise ModelPackageError(
            f"cannot build network {architecture!r} with arguments {_brief(arguments)}: {error}. "
            "Fix the stage's arguments in model.json or re-export the package."
        ) from None


def _check_arguments(architecture: str, arguments: dict, cls) -> None:
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    for key, value in arguments.items():
        # A whole number given for a fractional setting (0 for a threshold of 0.0) is a number, not a size.
        measure = isinstance(defaults.get(key), float) and type(value) is int
        problem = _argument_problem(float(value) if measure else value)
        if problem:
            raise ModelPackageError(
                f"network {architecture!r}: argument {key!r} is {_brief(value)}, but {problem}. "
                "Fix the stage's arguments in model.json or re-export the package."
            )


def _argument_problem(value, depth: int = 0) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return "" if not isinstance(value, str) or len(value) <= 64 else "a text argument is at most 64 characters"
    if isinstance(value, int):
        if 1 <= value <= MAX_WHOLE_ARGUMENT:
            return ""
        return f"every whole number (a size or a count) must be from 1 to {MAX_WHOLE_ARGUMENT}"
    if isinstance(value, float):
        return "" if math.isfinite(value) and abs(value) <= 1e6 else "numbers must be finite, at most 1e6 in size"
    if isinstance(value, (list, tuple)):
        if depth or len(value) > MAX_LIST_ARGUMENT:
            return f"a list argument holds at most {MAX_LIST_ARGUMENT} plain values"
        return next((p for p in (_argument_problem(v, depth + 1) for v in value) if p), "")
    return f"{type(value).__name__} is not a constructor argument a package can give"


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_state(network, state: dict, what: str) -> None:
    """Load weights strictly: the same tensor names, shapes and kinds (floating or whole numbers), every
    value finite; a mismatch names the package stage and what differs."""
    import torch

    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    common = sorted(set(own) & set(state))
    wrong = [k for k in common if tuple(own[k].shape) != tuple(state[k].shape)]
    kind = [k for k in common if torch.is_floating_point(own[k]) != torch.is_floating_point(state[k])
            or state[k].dtype in (torch.bool, torch.complex64, torch.complex128)]
    if missing or unexpected or wrong or kind:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
                         f"instead of {tuple(own[k].shape)})")
        if kind:
            k = kind[0]
            parts.append(f"{len(kind)} tensors of the wrong type (e.g. {k}: {state[k].dtype} instead of "
                         f"{own[k].dtype})")
        raise ModelPackageError(f"{what}: the weights do not fit the declared architecture: {'; '.join(parts)}. "
                                "Reinstall or re-export the package.")
    converted = {k: v.to(own[k].dtype) if torch.is_floating_point(v) else v for k, v in state.items()}
    bad = [k for k, v in converted.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelPackageError(
            f"{what}: {len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]}): the weights are "
            "damaged (a diverged training run, or a broken export). Reinstall or re-export the package."
        )
    network.load_state_dict(converted)
