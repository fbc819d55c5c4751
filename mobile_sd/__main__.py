"""``python -m mobile_sd``: the ``mobile-sd`` command."""
import sys

from mobile_sd.commands.cli import main

sys.exit(main())
