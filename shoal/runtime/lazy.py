"""Type checks that do not import what they check for.

`torch.distributed.tensor` costs seconds to import; a plain-DDP worker never needs it, and
no tensor can be a DTensor before that module is loaded.
"""

from __future__ import annotations

import sys


def dtensor_type() -> type | tuple:
    """DTensor's class if DTensor is loaded, else an empty tuple (isinstance(x, ()) is False)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else ()
