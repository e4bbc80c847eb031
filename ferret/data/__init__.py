"""GRIT-format datasets: loading, mixing, collation, and the synthetic toy world (`toy.py`)."""
