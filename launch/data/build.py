"""data.name -> a DataBundle. File datasets are imported only when used."""

from __future__ import annotations

from launch.data.types import DataBundle


def build_data(cfg) -> DataBundle:
    name = cfg.data.name
    if name == "toy":
        from launch.data.synthetic import toy

        return toy()
    if name == "synthetic":
        from launch.data.synthetic import synthetic

        return synthetic(cfg.data)
    if name in ("csv", "npz"):
        from launch.data import tabular

        return tabular.build_csv(cfg) if name == "csv" else tabular.build_npz(cfg)
    if name == "tokens":
        from launch.data import tokens

        return tokens.build(cfg)
    if name == "mnist":
        from launch.data import mnist

        return mnist.build(cfg)
    from launch.data.custom import from_import_path  # validate() allows only the names above or 'pkg.module:Class'

    return from_import_path(cfg)
