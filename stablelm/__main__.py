"""`python -m stablelm ...`: see stablelm/cli.py."""
import sys

from .cli import main

sys.exit(main())
