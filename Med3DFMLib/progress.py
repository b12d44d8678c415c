"""Progress reporting shared by every long job.

`--progress json` prints one JSON object per line on stdout (what the Slicer module parses);
`tqdm` draws a bar on a terminal; `none` is silent. Stages are short words ("load", "infer", ...).
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Optional


class Progress:
    """Reports (stage, fraction, message) to a JSON-lines stream, a tqdm bar, or nowhere."""

    def __init__(self, mode: str = "none", stream: Optional[IO[str]] = None) -> None:
        if mode not in ("none", "json", "tqdm"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        self._bar_stage: Optional[str] = None

    def update(self, stage: str, fraction: float, message: str = "", **extra: Any) -> None:
        """Report that `stage` is `fraction` (0..1) done."""
        fraction = float(min(max(fraction, 0.0), 1.0))
        if self.mode == "json":
            record = {"stage": stage, "fraction": round(fraction, 4), "message": message}
            record.update(extra)
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.mode == "tqdm":
            from tqdm import tqdm

            if self._bar is None or self._bar_stage != stage:
                self.close()
                self._bar = tqdm(total=1000, desc=stage, file=sys.stderr, leave=False)
                self._bar_stage = stage
            self._bar.n = int(fraction * 1000)
            if message:
                self._bar.set_postfix_str(message, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_stage = None


def default_mode() -> str:
    """tqdm on an interactive terminal, silence otherwise."""
    return "tqdm" if sys.stderr.isatty() else "none"
