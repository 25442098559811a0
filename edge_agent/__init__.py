"""edge-agent: faces from a camera to MQTT events, on the device."""

__version__ = "0.1.0"
