import sys
from pathlib import Path

# The plugin's folder, so that its tests run from a checkout before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
