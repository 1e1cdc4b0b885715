"""Data: conversation templates and rendering, record sources, image transforms, datasets and collate."""
