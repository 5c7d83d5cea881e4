"""The garbage collector while the command line starts.

Importing torch, diffusers and transformers makes ~400,000 objects (modules, classes, functions) that live as long
as the process. With Python's default thresholds the collector scans them again and again while they load: ~0.7 s
of a ~5 s start on a 2-core CPU, paid by every `linfusion` process (each of a farm's tasks, each process of a split
image). So the CLI raises the threshold while it starts, and once the heavy imports are done it freezes what they
made (later full collections skip it) and collects as usual. Only the CLI does this: a program that imports the
library keeps its collector as it set it.
"""

from __future__ import annotations

import gc

STARTUP_THRESHOLD = 100_000  # allocations between young collections while starting (Python's default: 700)
_usual: tuple[int, ...] = gc.get_threshold()


def starting() -> None:
    """At the CLI's entry: collect rarely until `started`. Never off: a command that does not call `started` still
    collects, only less often."""
    global _usual
    _usual = gc.get_threshold()
    gc.set_threshold(STARTUP_THRESHOLD, *_usual[1:])


def started() -> None:
    """After a command's heavy imports: freeze what exists now, restore the usual thresholds. Does nothing unless
    `starting` ran (a command run in-process by a test, the Python API)."""
    if gc.get_threshold()[0] != STARTUP_THRESHOLD:
        return
    gc.freeze()
    gc.set_threshold(*_usual)
