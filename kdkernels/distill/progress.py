"""Progress bars: tqdm when enabled and installed, otherwise a bar that shows nothing."""
from __future__ import annotations


def progress_bar(total: int, description: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is an optional dependency
            enabled = False
        else:
            return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
    return NoBar()


class NoBar:
    def update(self, _n: int = 1) -> None:
        pass

    def set_postfix(self, **_values) -> None:
        pass

    def close(self) -> None:
        pass
