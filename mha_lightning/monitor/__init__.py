"""Per-head attention entropy: measured (``entropy``, ``callback``), recorded as CSV (``record``) and
plotted (``plots``, ``mha-plot``)."""
