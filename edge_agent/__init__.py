"""edge_agent: the on-device half. Runs on a Raspberry Pi or a Jetson with only the device
dependencies installed; it never imports ``converters``, onnx, tensorflow, torch or sklearn."""

__version__ = "0.1.0"
