"""converters: the desktop half.

Imports a trained model into one canonical ONNX graph, quantizes it, validates the result against
the original within an accuracy budget, and writes signed model bundles for device profiles. May
import ``edge_agent`` (bundle format, profiles); never the reverse.
"""

__version__ = "0.1.0"
