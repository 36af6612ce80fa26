"""Dante: a bilingual Italian/English (+code) LLaMA-style language model pipeline.

Nine numbered scripts at the repository root run the stages in order; this package holds all logic,
one module per concern (see ../shared/ARCHITECTURE.md and the README's stage table).
"""

__version__ = "0.1.0"
