import sys

from nktrial.cli import main

sys.exit(main())
