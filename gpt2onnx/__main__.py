"""python -m gpt2onnx"""

import sys

from .cli import main

sys.exit(main())
