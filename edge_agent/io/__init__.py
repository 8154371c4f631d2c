"""Inputs and outputs of the loop: one module per kind of source behind the ``Source`` base, and
the result sinks."""
