import sys

from device_client.cli import main

sys.exit(main())
