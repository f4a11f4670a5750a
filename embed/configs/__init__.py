"""Configurations of the embedding job: one file per encoder, each with ``get_config()``."""
