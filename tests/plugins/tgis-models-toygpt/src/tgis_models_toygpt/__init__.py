"""A third-party model plugin, as someone outside tgis would publish it (tests only)."""
