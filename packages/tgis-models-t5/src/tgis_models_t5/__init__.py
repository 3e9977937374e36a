"""T5, flan-t5, mT5 and mT0 on tgis's tensor-parallel tgis_native engine."""
