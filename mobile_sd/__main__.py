"""``python -m mobile_sd``: the ``mobile-sd`` command."""
import sys

from mobile_sd.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
