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
    load,
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
