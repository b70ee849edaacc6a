"""A progress bar for people watching a terminal, and nothing at all in a log file.

Batch jobs redirect stdout to a file, where a bar's carriage returns turn into thousands of
partial lines between the log lines that scrapers read; so the bar appears only when stdout
is a terminal (or when asked for). Both kinds of bar have the same methods, so the train loop
never checks which one it holds; `write` prints a log line without breaking the bar.
"""

from __future__ import annotations

import sys
from typing import Any


class NullProgressBar:
    """The bar when stdout is not a terminal: updates do nothing, `write` just prints."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _TerminalBar:
    """tqdm on stdout, with `write` routed through tqdm so the bar is redrawn below the line."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self._tqdm_class = tqdm
        self._bar = tqdm(total=total, initial=initial, file=sys.stdout, unit="it", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self._bar.set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def write(self, line: str) -> None:
        self._tqdm_class.write(line, file=sys.stdout)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "_TerminalBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stdout_is_terminal() -> bool:
    """True when stdout is an interactive terminal (False for files, pipes, a closed stream)."""
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, initial: int, enabled: bool | None = None) -> _TerminalBar | NullProgressBar:
    """A tqdm bar over `total` iterations starting at `initial` (a resumed run) when stdout is a
    terminal or `enabled` is True; otherwise a bar that does nothing."""
    if enabled is None:
        enabled = stdout_is_terminal()
    return _TerminalBar(total, initial) if enabled else NullProgressBar()
