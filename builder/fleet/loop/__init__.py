"""The re-compression loop: ``policy`` (what a device must achieve), ``controller`` (the pure
decision function) and ``service`` (the stateful loop inside `builder serve`)."""
