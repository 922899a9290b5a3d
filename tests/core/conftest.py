import sys
from pathlib import Path

# The core tests import the toy models next to them.
sys.path.insert(0, str(Path(__file__).parent))
