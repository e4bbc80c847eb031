import sys

from ferret.data.build.command import main

sys.exit(main())
