import sys

from sslbench.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
