"""The fleet database: the MQTT streams kept in PostgreSQL (issue 17).

One module per concern:

- :mod:`edgectl.fleetdb.db`: connecting (``--db``, a password from a file, never a flag) and the
  versioned schema (``migrations/NNNN_*.sql``, applied at start under an advisory lock).
- :mod:`edgectl.fleetdb.rows`: an MQTT message -> a row of its stream's table (typed columns
  and the idempotency key). Pure Python: no psycopg.
- :mod:`edgectl.fleetdb.writer`: batched, idempotent writes.
- :mod:`edgectl.fleetdb.queries`: what ``edgectl status``, ``export`` and ``history`` read.

The service around them is :mod:`edgectl.collector`. psycopg comes with the ``fleet`` extra
(``pip install 'edge-inference[fleet]'``); a device never needs it.
"""
