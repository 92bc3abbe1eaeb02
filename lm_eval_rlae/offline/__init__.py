"""What runs with no model hub: member presets shipped on PyPI (`presets`, with the specialists'
committed LoRA adapters in `adapters/`) and benchmark data installed from PyPI (`data`).

Imported at start-up paths: nothing here may import torch or transformers at import time.
"""
