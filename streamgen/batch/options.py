"""How a batch runs: the order requests go to the engine, how far it reads ahead, the price of the machine.

Light on purpose (the command line reads ORDERS when it builds its parser).
"""

from __future__ import annotations

from dataclasses import dataclass

# prefix: by prompt token ids (shared prefixes run together, for the prefix cache), longest first once the
# input has ended; longest: most work first; arrival: the file's order. runner.Window applies them.
ORDERS = ("prefix", "longest", "arrival")
READ_AHEAD = 4  # requests read ahead of the engine, per slot


@dataclass(frozen=True, slots=True)
class BatchOptions:
    order: str = "prefix"  # ORDERS
    read_ahead: int = READ_AHEAD  # per slot
    price_per_hour: float | None = None  # USD; each answer's usage then carries cost_usd

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.read_ahead < 1:
            raise ValueError(f"read_ahead must be at least 1, got {self.read_ahead}")
