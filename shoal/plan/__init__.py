"""Planning a layout: per-rank memory estimates for every valid layout, and a recommendation."""
