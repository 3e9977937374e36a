"""LLaMA (1, 2, 3) on tgis's tensor-parallel tgis_native engine."""
