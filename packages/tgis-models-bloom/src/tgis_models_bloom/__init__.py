"""BLOOM on tgis's tensor-parallel tgis_native engine."""
