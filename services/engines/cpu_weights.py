"""Weight updates for the CPU engine: validate everything first, then swap by reference.

`prepare_update` (any thread, no lock) verifies the directory's hashes, loads it, and checks
every tensor against the live model: no unknown names, identical shapes, every parameter
covered (tied weights count once), dtypes converted to the live ones. Only then does
`apply_update` (engine worker thread, between steps) replace each parameter's `.data` — pure
reference assignments that cannot fail half-way, so the model is never left mixed. Any
problem before that raises WeightUpdateError and the old weights keep serving.
"""

from __future__ import annotations

import torch
from torch import nn

from protocol.weights import WeightsError, load_weights_dir
from services.engines.base import WeightUpdateError

# (module, attribute name, is_parameter, new tensor)
Prepared = list[tuple[nn.Module, str, bool, torch.Tensor]]


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool, torch.Tensor]]:
    """state_dict name -> where the live tensor sits (tied aliases map to the same tensor)."""
    wanted = set(model.state_dict().keys())
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None and prefix + attr in wanted:
                out[prefix + attr] = (mod, attr, True, p)
        for attr, b in mod._buffers.items():
            if b is not None and prefix + attr in wanted:
                out[prefix + attr] = (mod, attr, False, b)
    return out


def prepare_update(model: nn.Module, weights_dir: str, sha256: str | None) -> Prepared:
    try:
        state = load_weights_dir(weights_dir, sha256)
    except WeightsError as e:
        raise WeightUpdateError(f"refused weights at {weights_dir}: {e}") from e
    slots = _slots(model)
    unknown = sorted(set(state) - set(slots))
    if unknown:
        raise WeightUpdateError(f"refused: {len(unknown)} tensors the model does not have, e.g. {unknown[:3]}")
    bad = [
        f"{n}: {tuple(t.shape)} vs live {tuple(slots[n][3].shape)}"
        for n, t in state.items()
        if t.shape != slots[n][3].shape
    ]
    if bad:
        raise WeightUpdateError(f"refused: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]}")
    # Group aliases by the live tensor they share (tied embeddings); each group needs a value.
    groups: dict[int, list[str]] = {}
    for n, (_, _, _, live) in slots.items():
        groups.setdefault(id(live), []).append(n)
    missing = [names[0] for names in groups.values() if not any(n in state for n in names)]
    if missing:
        raise WeightUpdateError(f"refused: {len(missing)} model tensors missing, e.g. {sorted(missing)[:3]}")
    prepared: Prepared = []
    for names in groups.values():
        src = next(n for n in names if n in state)
        new = state[src]
        for n in names:
            mod, attr, is_param, live = slots[n]
            if new.is_floating_point() != live.is_floating_point():
                raise WeightUpdateError(f"refused: {src} is {new.dtype}, live {n} is {live.dtype}")
            prepared.append((mod, attr, is_param, new.to(live.dtype).contiguous()))
            new = prepared[-1][3]  # aliases keep sharing one tensor
    return prepared


def apply_update(prepared: Prepared) -> None:
    for mod, attr, is_param, new in prepared:
        if is_param:
            mod._parameters[attr].data = new
        else:
            mod._buffers[attr] = new
