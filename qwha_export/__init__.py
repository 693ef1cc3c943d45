"""qwha-export: fine-tune, merge, re-quantize, export and serve LLMs adapted with QWHA."""

__version__ = "0.1.0"
