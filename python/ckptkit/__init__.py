"""ckptkit: inspect, check, verify and convert quantized ML checkpoints exactly.

The functions are the library's (a Rust extension, ``ckptkit._ckptkit``);
each returns the same fields as the ``migrate`` command's ``--json``:

>>> import ckptkit
>>> ckptkit.check("checkpoint.safetensors", against="quanto_qmap.json")["compatible"]  # doctest: +SKIP
False
>>> ckptkit.convert("checkpoint.safetensors", "fixed/model.safetensors",
...                 like="quanto_qmap.json")  # doctest: +SKIP

``ckptkit.load(path, like=...)`` returns a checkpoint's state dict converted
in memory to the layout of a reference (or "plain"); ``ckptkit.open(path)`` reads stored tensors lazily into numpy arrays or
torch tensors, checking each against its recorded hash.

Errors are ``ckptkit.Error`` or one of its subclasses, with ``file``,
``layer``, ``tensor`` and ``offset`` attributes saying where.
"""

from ckptkit._ckptkit import (
    AmbiguousLayoutError,
    CorruptFileError,
    Error,
    HashMismatchError,
    LayoutError,
    LossyRelayoutError,
    OutputExistsError,
    PendingCommitError,
    UnknownFamilyError,
    UsageError,
    __version__,
    check,
    convert,
    Reader,
    inspect,
    load as _load,
    open,
    verify,
)

__all__ = [
    "AmbiguousLayoutError",
    "CorruptFileError",
    "Error",
    "HashMismatchError",
    "LayoutError",
    "LossyRelayoutError",
    "OutputExistsError",
    "PendingCommitError",
    "UnknownFamilyError",
    "UsageError",
    "__version__",
    "check",
    "convert",
    "Reader",
    "inspect",
    "load",
    "verify",
]
# `open` is not in __all__: `from ckptkit import *` must not shadow the builtin


def load(path, *, like=None, like_qmap=None, **kwargs):
    """The state dict of the checkpoint at ``path`` in the layout of ``like``,
    converted in memory (see ``ckptkit._ckptkit.load`` for every option).

    ``like`` is a reference checkpoint, container or ``quanto_qmap.json``
    path; a target spelling such as ``"plain"``; or a model's
    ``state_dict()`` (a mapping of tensors: only their keys, dtypes and
    shapes are used), in which case ``like_qmap`` may give the model's quanto
    map (a path, or the dict ``optimum.quanto.quantization_map(model)``)
    for layers the tensors alone cannot tell apart. The result loads with
    ``model.load_state_dict(..., strict=True)``.
    """
    from collections.abc import Mapping

    if not isinstance(like, Mapping):
        if like_qmap is not None:
            raise UsageError("like_qmap goes with like=<a state dict>")
        return _load(path, like=like, **kwargs)
    described = [
        (str(k), str(v.dtype), [int(d) for d in v.shape], _small_value(v))
        for k, v in like.items()
        if hasattr(v, "dtype") and hasattr(v, "shape")
    ]
    if isinstance(like_qmap, Mapping):
        import json

        # handed over as text: nothing is written
        return _load(path, like_tensors=described, like_qmap_json=json.dumps(like_qmap), **kwargs)
    return _load(path, like_tensors=described, like_qmap=like_qmap, **kwargs)


_INTEGER_DTYPES = {"int64", "int32", "int16", "int8", "uint8", "bool"}


def _small_value(v):
    """The bytes of a small integer tensor of a state dict (a layout's stored shape or
    constant, such as compressed-tensors' ``weight_shape`` or bitsandbytes'
    ``weight_format``), which detection reads; None for the rest and for meta tensors."""
    if str(v.dtype).removeprefix("torch.") not in _INTEGER_DTYPES:
        return None
    if getattr(getattr(v, "device", None), "type", "cpu") == "meta":
        return None
    n = 1
    for d in v.shape:
        n *= int(d)
    if n > 64:
        return None
    if hasattr(v, "detach"):  # torch
        v = v.detach().cpu().contiguous().numpy()
    import numpy as np

    return np.ascontiguousarray(v).tobytes()
