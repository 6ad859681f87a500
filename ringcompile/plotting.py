"""matplotlib for the pictures (``ringcompile trace``'s timeline, ``plan --plot``), from the optional
``plot`` extra: loaded headless on demand, and a figure saved the same way everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MissingDependencyError


def pyplot(what: str) -> Any:
    """``matplotlib.pyplot`` with the Agg backend; MissingDependencyError naming ``what`` needs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs matplotlib: pip install 'ringcompile[plot]' "
                                     "(or matplotlib)") from exc
    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write (parents made) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
