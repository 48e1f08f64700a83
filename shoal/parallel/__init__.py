"""Spreading one model over the mesh: one file per technique, composed in compose.py."""
