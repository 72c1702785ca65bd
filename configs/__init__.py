"""diffalign's YAML configs, installed with the package as ``diffalign.configs`` (see
:func:`diffalign.config.packaged_config`)."""
