"""Inputs and outputs of the loop: one module per kind of source behind the ``Source`` base, and
the result sinks.

``from edge_agent.io import open_source, Source, …`` is the public surface; the modules are
``source`` (the base), ``opencv``, ``rpicam``, ``images``, ``synthetic``, ``sensors``,
``audio``, ``network``, ``process`` (capture tools on a pipe), ``streams`` (several
sources read as one, fairly), ``uri`` and ``sinks``."""

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.errors import SourceError
from edge_agent.io.audio import AlsaSource, WavSource
from edge_agent.io.images import ImageFilesSource
from edge_agent.io.network import UdpSensorSource
from edge_agent.io.opencv import CaptureSource, VideoFileSource
from edge_agent.io.rpicam import Picamera2Source, RpicamSource
from edge_agent.io.sensors import FileSensorSource, StdinSensorSource
from edge_agent.io.source import Frame, Source, SourceStats, SourceTimeout, WindowSpec
from edge_agent.io.streams import StreamSet
from edge_agent.io.synthetic import SyntheticSource
from edge_agent.io.uri import open_source

__all__ = [
    "DEFAULT_BACKOFF",
    "AlsaSource",
    "BackoffPolicy",
    "CaptureSource",
    "FileSensorSource",
    "Frame",
    "ImageFilesSource",
    "Picamera2Source",
    "RpicamSource",
    "Source",
    "SourceError",
    "SourceStats",
    "SourceTimeout",
    "StdinSensorSource",
    "StreamSet",
    "SyntheticSource",
    "UdpSensorSource",
    "VideoFileSource",
    "WavSource",
    "WindowSpec",
    "open_source",
]
