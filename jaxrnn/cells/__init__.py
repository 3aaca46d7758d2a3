"""Recurrent cells: one interface (`Cell`), three classic cells."""
from jaxrnn.cells.base import Cell, step, zeros_carry
from jaxrnn.cells.elman import elman
from jaxrnn.cells.gru import gru
from jaxrnn.cells.lstm import lstm
from jaxrnn.cells.mingru import mingru

__all__ = ["Cell", "elman", "gru", "lstm", "mingru", "step", "zeros_carry"]
