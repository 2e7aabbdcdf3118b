import sys

from fastkd.bench.kernels import main

sys.exit(main())
