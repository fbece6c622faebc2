"""``python -m ecu_sidecar``: the ``ecu-sidecar`` command line."""

from ecu_sidecar.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
