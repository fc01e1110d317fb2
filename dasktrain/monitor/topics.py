"""Names the workers, the client and the dashboard page share: the topics of
the scheduler's event log that dasktrain writes to, and how worker
addresses are ordered in its tables.

This module imports nothing but the standard library: the scheduler imports
it (through :mod:`dasktrain.monitor.dashboard`) to serve the page, and
should not have to import the training code for that.
"""

from __future__ import annotations

import re

__all__ = ["BATCH_KEY", "EVENT_TOPIC", "MEMORY_TOPIC", "ROWS_TOPIC", "address_order"]

#: Topics of the scheduler's event log the step rows go to: the dashboard
#: page's, and the one the client that runs a segment subscribes to.
EVENT_TOPIC = "dasktrain"
ROWS_TOPIC = "dasktrain-rows"
#: The key of a batch of step rows in an event (distinct from a row's ``rows``).
BATCH_KEY = "step_rows"
#: Topic that gets one per-worker memory table per epoch end (read by the
#: dashboard page).
MEMORY_TOPIC = "dasktrain-memory"


def address_order(address: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of worker addresses: text in order, numbers by value, so that
    ``tcp://10.0.0.2:9`` comes before ``tcp://10.0.0.10:8``.

    Examples
    --------
    >>> sorted(["tcp://h:10001", "tcp://h:9999"], key=address_order)
    ['tcp://h:9999', 'tcp://h:10001']
    """
    parts = re.split(r"(\d+)", address)
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in parts if p)
