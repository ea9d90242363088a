"""Library versions stored with every record and checkpoint.

No flatprior imports besides the package version, so pipeline.py and checkpoint.py can both use
it without a cycle.
"""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """Versions of flatprior, torch, numpy, scipy and Python."""
    import numpy as np
    import scipy
    import torch

    from flatprior import __version__

    return {
        "flatprior": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }
