"""Prepares the data a config asks for (placeholder; filled in with the synthetic set)."""


def prepare_data(config, workdir):
  del workdir
  return config
