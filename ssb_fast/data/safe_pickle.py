"""Load a pickle that may hold only numpy arrays, dicts, lists, tuples, strings and numbers.

A pickle names the callables that rebuild its objects, and loading calls them, so an ordinary
`pickle.load` of an untrusted file can run anything. This unpickler resolves only the few numpy globals
that rebuild plain arrays and numbers; any other global is refused before it is called.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np

from ssb_fast.data.dataset_format import DataFormatError

# What pickled ndarrays, dtypes and numpy scalars need (numpy 1.x and 2.x module paths, protocols 2-5).
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("collections", "OrderedDict"),
}
_PLAIN = (str, bytes, int, float, bool, type(None), np.generic)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataFormatError(
            self._path,
            f"pickle refers to {module}.{name}; only numpy arrays, dicts, lists, strings and numbers are "
            "allowed, so it was refused without running it",
        )


def _check_plain(obj, path, where: str = "top level", depth: int = 0) -> None:
    if depth > 64:
        raise DataFormatError(path, f"pickle nests deeper than 64 levels at {where}")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise DataFormatError(path, f"object array at {where}; expected numeric arrays")
    elif isinstance(obj, (dict, OrderedDict)):
        for key, value in obj.items():
            if not isinstance(key, _PLAIN):
                raise DataFormatError(path, f"dict key of type {type(key).__name__} at {where}")
            _check_plain(value, path, f"{where}[{key!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, path, f"{where}[{i}]", depth + 1)
    elif not isinstance(obj, _PLAIN):
        raise DataFormatError(path, f"{type(obj).__name__} at {where}; expected arrays, dicts, lists, str, numbers")


def safe_load_pickle(path: str | os.PathLike):
    """Unpickle `path` admitting only numpy arrays, dicts, lists, tuples, strings and numbers.

    Raises DataFormatError (naming the file and the refused global or type) for anything else, and for a
    truncated or corrupt file.
    """
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DataFormatError:
        raise
    except OSError as err:
        raise DataFormatError(path, f"unreadable file ({err.strerror or err})") from err
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise DataFormatError(path, f"not a readable pickle ({type(err).__name__}: {err})") from err
    _check_plain(obj, path)
    return obj
