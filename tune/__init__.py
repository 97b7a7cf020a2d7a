"""tune: the (BG, FG) threshold-search system built on the wsss pipeline library."""
